-- SHA-256 of each attempt's task name and arguments: a job id is an idempotency key, and
-- one reused with different arguments is refused (workers/ledger.py).
ALTER TABLE runs ADD COLUMN args_hash text;
