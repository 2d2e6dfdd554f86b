-- What decided the stored index of each repository (tasks/reindex.py): the same commit
-- under the same settings and classifier is not read again, and a new commit is applied
-- as its diff only when these are unchanged. NULL (indexed before this migration): the
-- next index reads the whole tree. skipped / not_utf8: the counts of the stored rows,
-- kept so that an index with nothing to do reports them without counting.
ALTER TABLE repositories ADD COLUMN max_file_bytes bigint;
ALTER TABLE repositories ADD COLUMN max_files integer;
ALTER TABLE repositories ADD COLUMN classifier text;
ALTER TABLE repositories ADD COLUMN skipped jsonb;
ALTER TABLE repositories ADD COLUMN not_utf8 integer;
