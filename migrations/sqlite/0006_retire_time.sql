-- A rotation's grace deadline gets its own column, so that `revoke_time`
-- means only "explicitly revoked" and holds from the moment it is set,
-- whatever time it names and whatever the clock says. Before this, a
-- rotation wrote its grace deadline to `revoke_time` and a time in the
-- future read as "still valid", which let a rotation pass a revocation
-- committed while it waited for the write lock.
ALTER TABLE tokens ADD COLUMN retire_time INTEGER;
-- A rotated-out token whose `revoke_time` is still in the future is in its
-- grace period: move the deadline. (An explicit revocation brought such a
-- time forward to its own, which is past by now. A time in the past is
-- effective either way and stays.)
UPDATE tokens SET retire_time = revoke_time, revoke_time = NULL
    WHERE replaced_by IS NOT NULL
    AND revoke_time > CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER);
CREATE INDEX tokens_retire_time_idx ON tokens (retire_time) WHERE retire_time IS NOT NULL;
