-- A run that failed on a transient database error and was queued again by Celery's retry.
ALTER TABLE runs DROP CONSTRAINT runs_state_check;
ALTER TABLE runs ADD CONSTRAINT runs_state_check
    CHECK (state IN ('running', 'succeeded', 'failed', 'retried', 'interrupted', 'lost'));
