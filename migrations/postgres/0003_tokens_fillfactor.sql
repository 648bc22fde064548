-- Leave room on each page of `tokens` so that recording a token's last use
-- (which touches no indexed column) can be a HOT update: a new row version
-- on the same page, with no index entry to add. Applies to pages written
-- from now on.
ALTER TABLE tokens SET (fillfactor = 70);
