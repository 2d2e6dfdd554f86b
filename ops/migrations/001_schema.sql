-- repoindex schema, version 1.
-- blobs: one row per distinct git blob ever read (deduplicated across repositories and
--        refs); content NULL for binaries. files: what each repository tracks at its
--        indexed commit. runs: the ledger, one row per attempt of every operation.
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE repositories (
    id          bigserial PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    source      text NOT NULL,
    ref         text NOT NULL,
    commit      text,
    files       integer NOT NULL DEFAULT 0,
    indexed_at  timestamptz,
    last_job_id text
);

CREATE TABLE blobs (
    sha     text PRIMARY KEY,
    size    bigint NOT NULL,
    is_binary boolean NOT NULL,
    lines   integer NOT NULL DEFAULT 0,
    lossy   boolean NOT NULL DEFAULT false,   -- not UTF-8: stored decoded with U+FFFD
    content text,
    CHECK (is_binary = (content IS NULL))
);
CREATE INDEX blobs_content_trgm ON blobs USING gin (content gin_trgm_ops);

CREATE TABLE files (
    repo_id  bigint NOT NULL REFERENCES repositories (id) ON DELETE CASCADE,
    path     text NOT NULL,
    sha      text NOT NULL,            -- blob id (commit id for a submodule)
    mode     integer NOT NULL,
    size     bigint,
    language text,
    kind     text NOT NULL CHECK (kind IN ('text', 'binary', 'too_large', 'symlink', 'submodule')),
    target   text,                     -- symlink target, recorded, never followed
    PRIMARY KEY (repo_id, path)
);
CREATE INDEX files_sha ON files (sha);

CREATE TABLE runs (
    id          bigserial PRIMARY KEY,
    job_id      text NOT NULL,
    task        text NOT NULL,
    repository  text,
    attempt     integer NOT NULL,
    worker      text,
    pid         integer,
    state       text NOT NULL
                CHECK (state IN ('running', 'succeeded', 'failed', 'interrupted', 'lost')),
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    counts      jsonb,
    error       text,
    cleanup     jsonb
);
CREATE INDEX runs_job ON runs (job_id);
CREATE INDEX runs_started ON runs (started_at);
