-- A throttle claim given back (its password never checked) must only undo
-- its own count, never one that began after it: a reset (a success, an
-- operator's EnableAccount) deletes the row and a forgotten count restarts
-- at one, and a give-back from before that would erase failures counted
-- since. count_since is when the row's current count began (microseconds);
-- a give-back only applies to a count that began at or before its claim.
-- Existing rows: their last attempt, the latest their count can have begun
-- (so an older claim in flight across the upgrade is not given back, which
-- errs on the side of the throttle). The default serves inserts by a
-- binary that predates this column during a rolling upgrade.
ALTER TABLE sign_in_throttle ADD COLUMN count_since BIGINT NOT NULL DEFAULT 0;
UPDATE sign_in_throttle SET count_since = last_attempt;
