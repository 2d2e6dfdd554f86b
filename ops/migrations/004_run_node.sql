-- The Celery node (name@host) of each attempt: with the node's lease in Redis it tells a
-- live attempt of a job from one whose replica is gone (workers/ledger.py).
ALTER TABLE runs ADD COLUMN node text;
