-- Recording a token's last use should be a HOT update: a new row version
-- on the same page (0003 leaves room), with no index entry to add. It never
-- was, because tokens_used_up_idx (0006) has last_used_time as its key, and
-- an update that changes any indexed column adds an entry to every index of
-- the table: each recorded use wrote eleven index entries and left eleven
-- dead ones, among them one in the range of tokens_account_live_idx that
-- every creation's live-token count reads (0012), so that count grew dearer
-- with the uses recorded since the last vacuum (the soak's decline).
-- Keyed on create_time, the index still holds only used-up tokens, and no
-- use changes it. (SQLite has no HOT updates; its index stays as it was.)
--
-- The new index is built first, under another name: the build holds off
-- writes to tokens (as 0006 and 0012 did) but not reads, so verification
-- goes on through an upgrade. Only then is the old index dropped, whose
-- lock holds off reads too, for the moment left before the commit.
CREATE INDEX tokens_used_up_by_create_idx ON tokens (create_time) WHERE uses_remaining = 0;
DROP INDEX tokens_used_up_idx;
ALTER INDEX tokens_used_up_by_create_idx RENAME TO tokens_used_up_idx;
