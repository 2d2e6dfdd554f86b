-- Rows written by repoindex.canary, the diagnostic operation: one per completed run.
CREATE TABLE canary (
    job_id     text PRIMARY KEY,
    written_at timestamptz NOT NULL DEFAULT now()
);
