-- The operators' fleet-wide views (ListTokens without an account,
-- ListAuditEvents with a time range) stay an index range scan at any depth.
--
-- The audit log is listed newest first by (event_time, event_id), with a
-- keyset on both and the time range on event_time: a backward range scan of
-- this index, which reads one page's rows whatever the page's depth or the
-- range. It also serves the retention job's `event_time <= cutoff`, so it
-- replaces the single-column index of 0006.
--
-- Every account's tokens are listed in token_id order, a range scan of
-- tokens_pkey: no index is added for them. The stale-token filter
-- (last_used_before) stays a filter on that scan on purpose: an index on
-- last_used_time would make every last-use update a non-HOT update (see
-- 0003), which costs the hot path more than it saves an operator's report.
-- (Not CONCURRENTLY: migrations run in a transaction.)
CREATE INDEX audit_events_time_id_idx ON audit_events (event_time, event_id);
DROP INDEX audit_events_time_idx;
