-- A rotation's grace deadline gets its own column, so that `revoke_time`
-- means only "explicitly revoked" and holds from the moment it is set,
-- whatever time it names and whatever any replica's clock says. Before
-- this, a rotation wrote its grace deadline to `revoke_time` and a time in
-- the future read as "still valid", which let a rotation pass a revocation
-- committed during its lock wait, and a replica with a slow clock keep
-- honouring a revocation recorded by a faster one.
ALTER TABLE tokens ADD COLUMN retire_time BIGINT;
-- A rotated-out token whose `revoke_time` is still in the future is in its
-- grace period: move the deadline. (An explicit revocation brought such a
-- time forward to its own, which is past by now, so none is taken for a
-- grace deadline. A time in the past is effective either way and stays.)
UPDATE tokens SET retire_time = revoke_time, revoke_time = NULL
    WHERE replaced_by IS NOT NULL
    AND revoke_time > (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT;
CREATE INDEX tokens_retire_time_idx ON tokens (retire_time) WHERE retire_time IS NOT NULL;
