-- Search reads lines, not blobs (issue 13): one row per line of every text blob, as
-- `git grep -n` numbers them (split at \n only, a CR kept; no phantom line after a final
-- newline), with the trigram index on the line. A pattern with trigrams reads the index
-- and only the matching lines; one without reads the lines, never detoasting or splitting
-- a blob. Written in the transaction that writes the blob, deleted with it. The blobs'
-- own trigram index is dropped: nothing reads it any more.
CREATE TABLE lines (
    sha  text NOT NULL,       -- the blob
    n    integer NOT NULL,    -- 1-based line number
    line text NOT NULL
);
CREATE INDEX lines_sha ON lines (sha);   -- deletes with the blob; B-tree dedup keeps it small
CREATE INDEX lines_trgm ON lines USING gin (line gin_trgm_ops);
INSERT INTO lines
SELECT b.sha, l.n, l.line
  FROM blobs b, unnest(string_to_array(b.content, E'\n')) WITH ORDINALITY AS l(line, n)
 WHERE b.content IS NOT NULL AND l.n <= b.lines;
DROP INDEX IF EXISTS blobs_content_trgm;
