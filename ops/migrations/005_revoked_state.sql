-- A run stopped by revoke(terminate=True) while it ran (workers/revoke.py).
ALTER TABLE runs DROP CONSTRAINT runs_state_check;
ALTER TABLE runs ADD CONSTRAINT runs_state_check
    CHECK (state IN ('running', 'succeeded', 'failed', 'retried', 'interrupted', 'lost',
                     'revoked'));
