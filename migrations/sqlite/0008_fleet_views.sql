-- The operators' fleet-wide views (ListTokens without an account,
-- ListAuditEvents with a time range) stay an index range scan at any depth.
--
-- The audit log is listed newest first by (event_time, event_id), with a
-- keyset on both and the time range on event_time: a range scan of this
-- index, whatever the page's depth or the range. It also serves the
-- retention job's `event_time <= cutoff`, so it replaces the single-column
-- index of 0005. Every account's tokens are listed in token_id order, a
-- range scan of the primary key's index: no index is added for them.
CREATE INDEX audit_events_time_id_idx ON audit_events (event_time, event_id);
DROP INDEX audit_events_time_idx;
