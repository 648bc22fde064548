-- SQLite flavour of migrations/postgres/0002_lifecycle.sql.
-- The full lifecycle of tokens (rotation families, use limits, last use) and
-- the audit log.

ALTER TABLE tokens ADD COLUMN family_id TEXT NOT NULL DEFAULT '';
UPDATE tokens SET family_id = token_id;
-- The successor of a rotated token; NULL if it was never rotated.
ALTER TABLE tokens ADD COLUMN replaced_by TEXT;
ALTER TABLE tokens ADD COLUMN max_uses INTEGER;
-- Decremented atomically by each successful use; NULL for unlimited tokens.
ALTER TABLE tokens ADD COLUMN uses_remaining INTEGER;
ALTER TABLE tokens ADD COLUMN last_used_time INTEGER;
ALTER TABLE tokens ADD COLUMN last_used_address TEXT NOT NULL DEFAULT '';

CREATE INDEX tokens_family_idx ON tokens (family_id);

-- Append-only: the service inserts and reads, never updates or deletes.
-- No foreign keys, so that events outlive the accounts they mention.
CREATE TABLE audit_events (
    event_id              TEXT   NOT NULL,
    event_time            INTEGER NOT NULL,
    event_type            TEXT   NOT NULL,
    outcome               TEXT   NOT NULL,
    actor_account_id      TEXT,
    actor_credential_id   TEXT,
    subject_account_id    TEXT,
    subject_credential_id TEXT,
    subject_username      TEXT   NOT NULL DEFAULT '',
    source_address        TEXT   NOT NULL DEFAULT '',
    CONSTRAINT audit_events_pkey PRIMARY KEY (event_id)
);

CREATE INDEX audit_events_actor_idx ON audit_events (actor_account_id, event_id);
CREATE INDEX audit_events_subject_idx ON audit_events (subject_account_id, event_id);
