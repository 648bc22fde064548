-- Accounts, sign-in sessions and personal access tokens.
-- SQLite flavour of migrations/postgres/0001_initial.sql.
-- Times are whole microseconds since the Unix epoch (INTEGER), the precision
-- both backends keep exactly. Constraints are named so that the service can
-- recognise them in errors.

CREATE TABLE accounts (
    account_id    TEXT    NOT NULL,
    username      TEXT    NOT NULL,
    -- ASCII-lowercased username: uniqueness is case-insensitive.
    username_key  TEXT    NOT NULL,
    email         TEXT    NOT NULL DEFAULT '',
    kind          TEXT    NOT NULL,
    role          TEXT    NOT NULL,
    -- argon2id PHC string; NULL for robots, which never sign in.
    password_hash TEXT,
    create_time   INTEGER  NOT NULL,
    disable_time  INTEGER,
    CONSTRAINT accounts_pkey PRIMARY KEY (account_id),
    CONSTRAINT accounts_username_key_unique UNIQUE (username_key),
    CONSTRAINT accounts_kind_check CHECK (kind IN ('person', 'robot')),
    CONSTRAINT accounts_role_check CHECK (role IN ('user', 'operator')),
    CONSTRAINT accounts_robot_password_check CHECK (kind = 'person' OR password_hash IS NULL)
);

CREATE TABLE sessions (
    session_id   TEXT   NOT NULL,
    account_id   TEXT   NOT NULL,
    -- SHA-256 of the session token; the token itself is never stored.
    digest       BLOB   NOT NULL,
    create_time  INTEGER NOT NULL,
    expire_time  INTEGER NOT NULL,
    revoke_time  INTEGER,
    CONSTRAINT sessions_pkey PRIMARY KEY (session_id),
    CONSTRAINT sessions_digest_unique UNIQUE (digest),
    CONSTRAINT sessions_account_fkey FOREIGN KEY (account_id) REFERENCES accounts (account_id)
);

CREATE INDEX sessions_account_idx ON sessions (account_id);

CREATE TABLE tokens (
    token_id     TEXT   NOT NULL,
    account_id   TEXT   NOT NULL,
    name         TEXT   NOT NULL,
    -- The name while the token is live, NULL once it is revoked or its name
    -- has been given up after expiry: names are unique among live tokens.
    live_name    TEXT,
    -- SHA-256 of the secret; the secret itself is never stored.
    digest       BLOB   NOT NULL,
    -- Space-separated scope names; empty for full access.
    scopes       TEXT   NOT NULL DEFAULT '',
    create_time  INTEGER NOT NULL,
    expire_time  INTEGER,
    revoke_time  INTEGER,
    CONSTRAINT tokens_pkey PRIMARY KEY (token_id),
    CONSTRAINT tokens_digest_unique UNIQUE (digest),
    CONSTRAINT tokens_live_name_unique UNIQUE (account_id, live_name),
    CONSTRAINT tokens_account_fkey FOREIGN KEY (account_id) REFERENCES accounts (account_id)
);

CREATE INDEX tokens_account_idx ON tokens (account_id, token_id);
