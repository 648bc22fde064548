-- Indexes for the retention job (see `domain::retention`), which deletes
-- sessions, tokens, sign-in throttle counters and audit events once they
-- are past retention, in small batches. Without them each batch would scan
-- its whole table. Partial where most rows have NULL (live credentials).
-- (Not CONCURRENTLY: migrations run in a transaction. Each index is built
-- once, while writes to its table wait.)
CREATE INDEX sessions_expire_time_idx ON sessions (expire_time);
CREATE INDEX sessions_revoke_time_idx ON sessions (revoke_time) WHERE revoke_time IS NOT NULL;
CREATE INDEX tokens_expire_time_idx ON tokens (expire_time) WHERE expire_time IS NOT NULL;
CREATE INDEX tokens_revoke_time_idx ON tokens (revoke_time) WHERE revoke_time IS NOT NULL;
CREATE INDEX tokens_used_up_idx ON tokens (last_used_time) WHERE uses_remaining = 0;
CREATE INDEX sign_in_throttle_last_attempt_idx ON sign_in_throttle (last_attempt);
CREATE INDEX audit_events_time_idx ON audit_events (event_time);
