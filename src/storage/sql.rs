//! The queries, written once. Both backends accept the same SQL (numbered
//! `$n` parameters, which sqlx binds by number on SQLite too), so
//! [`impl_store!`] expands the same method bodies for each; a backend
//! supplies only its pool and its `classify` function for errors.

/// Account columns, aliased where a join would make them ambiguous.
macro_rules! account_cols {
    () => {
        "a.account_id, a.username, a.email, a.kind, a.role, a.password_hash, \
         a.create_time AS account_create_time, a.disable_time, a.credentials_generation"
    };
}

/// Token columns.
macro_rules! token_cols {
    () => {
        "t.token_id, t.account_id AS token_account_id, t.name, t.scopes, \
         t.create_time, t.expire_time, t.revoke_time, t.retire_time, t.family_id, t.replaced_by, \
         t.max_uses, t.uses_remaining, t.last_used_time, t.last_used_address, \
         t.parent_family_id, t.resources"
    };
}

/// Session columns.
macro_rules! session_cols {
    () => {
        "s.session_id, s.account_id AS session_account_id, s.create_time, \
         s.expire_time, s.revoke_time"
    };
}

/// A token's state at `$now` (parameter text), as in `Token::state`: a
/// revocation holds whatever time it names; a grace period ends at its time.
macro_rules! token_state {
    ($now:literal) => {
        concat!(
            "(CASE WHEN t.revoke_time IS NOT NULL OR (t.retire_time IS NOT NULL AND t.retire_time <= ",
            $now,
            ") THEN 'revoked' WHEN t.expire_time IS NOT NULL AND t.expire_time <= ",
            $now,
            " THEN 'expired' WHEN t.uses_remaining = 0 THEN 'exhausted' ELSE 'active' END)"
        )
    };
}

/// The versions of the migrations applied successfully, oldest first.
pub(super) const APPLIED_MIGRATIONS: &str =
    "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version";

pub(super) const INSERT_EVENT: &str = "INSERT INTO audit_events \
    (event_id, event_time, event_type, outcome, actor_account_id, actor_credential_id, \
     subject_account_id, subject_credential_id, subject_username, source_address) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)";
/// `$1`: account id or '' for all; `$2`: `,type,type,` or '' for all;
/// `$3`, `$4`: list events before this time and id (newest first, by time
/// then id); `$5`: limit; `$6`: the range's start (inclusive) and `$7` its
/// end (exclusive), both always bound. The first page starts before (end,
/// ''): every id sorts after the empty string, under any collation.
///
/// The keyset and the range are plain comparisons (a row comparison for the
/// keyset), never `$n IS NULL OR ...`, so that a generic plan on PostgreSQL
/// can still use them as bounds of a backward range scan of
/// `audit_events_time_id_idx`, and a deep page costs what the first does.
pub(super) const LIST_EVENTS: &str = "SELECT event_id, event_time, event_type, outcome, \
    actor_account_id, actor_credential_id, subject_account_id, subject_credential_id, \
    subject_username, source_address FROM audit_events \
    WHERE ($1 = '' OR actor_account_id = $1 OR subject_account_id = $1) \
    AND ($2 = '' OR $2 LIKE ('%,' || event_type || ',%')) \
    AND (event_time, event_id) < ($3, $4) \
    AND event_time >= $6 AND event_time < $7 \
    ORDER BY event_time DESC, event_id DESC LIMIT $5";

pub(super) const INSERT_ACCOUNT: &str = "INSERT INTO accounts \
    (account_id, username, username_key, email, kind, role, password_hash, create_time, disable_time) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
pub(super) const ACCOUNT_BY_ID: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.account_id = $1"
);
pub(super) const ACCOUNT_BY_USERNAME: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.username_key = $1"
);
/// Every id is greater than the empty string, so `$1 = ''` lists from the
/// start.
pub(super) const LIST_ACCOUNTS: &str = concat!(
    "SELECT ",
    account_cols!(),
    " FROM accounts a WHERE a.account_id > $1 ORDER BY a.account_id LIMIT $2"
);
/// Disabling ends what the account's credentials could do, so it moves
/// their generation on (see `INSERT_SESSION`).
pub(super) const DISABLE_ACCOUNT: &str = "UPDATE accounts SET disable_time = $2, \
    credentials_generation = credentials_generation + 1 \
    WHERE account_id = $1 AND disable_time IS NULL";
pub(super) const ENABLE_ACCOUNT: &str =
    "UPDATE accounts SET disable_time = NULL WHERE account_id = $1 AND disable_time IS NOT NULL";
/// Takes the account row's write lock within a transaction, changing
/// nothing, and says (by the rows it affects) whether the account exists:
/// on PostgreSQL a row lock that a deletion (`LOCK_ACCOUNT_FOR_DELETE`)
/// and other token creations for the account wait for, on SQLite the
/// database's write lock, taken before anything is read. Statements after
/// it see every token created before it was granted.
pub(super) const LOCK_ACCOUNT: &str = "UPDATE accounts \
    SET credentials_generation = credentials_generation WHERE account_id = $1";
/// The live (neither revoked nor expired at `$2`, nor used up) tokens of
/// account `$1` that are their family's current token: a rotation's
/// predecessor in its grace period is the same token under an older
/// secret, not one more.
pub(super) const COUNT_LIVE_TOKENS: &str = "SELECT count(*) FROM tokens \
    WHERE account_id = $1 AND replaced_by IS NULL \
    AND (revoke_time IS NULL OR revoke_time > $2) \
    AND (expire_time IS NULL OR expire_time > $2) \
    AND (uses_remaining IS NULL OR uses_remaining > 0)";
/// A deletion locks the account row first, so that whatever is being
/// created for the account (a token, a session, a rotation's successor)
/// either commits before the deletion's statements run (which then see it)
/// or waits for the deletion and finds the account gone. PostgreSQL:
/// `FOR UPDATE`, the lock that also holds off foreign-key checks; SQLite:
/// the write lock, through `LOCK_ACCOUNT`.
pub(super) const PG_LOCK_ACCOUNT_FOR_DELETE: &str =
    "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE";
pub(super) const SQLITE_LOCK_ACCOUNT_FOR_DELETE: &str = LOCK_ACCOUNT;
pub(super) const DELETE_ACCOUNT_SESSIONS: &str = "DELETE FROM sessions WHERE account_id = $1";
pub(super) const DELETE_ACCOUNT_TOKENS: &str = "DELETE FROM tokens WHERE account_id = $1";
pub(super) const DELETE_ACCOUNT: &str = "DELETE FROM accounts WHERE account_id = $1";
/// A new password moves the account's credentials generation on (see
/// `INSERT_SESSION`).
pub(super) const SET_PASSWORD: &str = "UPDATE accounts SET password_hash = $2, \
    credentials_generation = credentials_generation + 1 WHERE account_id = $1";
/// Moves the account's credentials generation on (see `INSERT_SESSION`),
/// before its sessions are ended in the same transaction.
pub(super) const BUMP_CREDENTIALS: &str = "UPDATE accounts \
    SET credentials_generation = credentials_generation + 1 WHERE account_id = $1";

/// Inserts a session for account `$2` only if the account still has the
/// credentials generation `$7` (the one the sign-in read before it checked
/// the password) and is not disabled: one statement, which inserts no row
/// otherwise. `$lock` is the backend's row lock on the account. On
/// PostgreSQL (READ COMMITTED) a plain `WHERE EXISTS` would not do: a
/// password change could commit between this statement's snapshot and its
/// commit, and its session revocation would not see the new row. With `FOR
/// SHARE` either this statement waits for the change to commit and then
/// re-checks the row's new version (and inserts nothing), or the change's
/// update of the account waits for this insert to commit, and its
/// revocation, a later statement, sees the session. On SQLite the
/// statement runs under the database's write lock, so nothing commits
/// between its check and its insert.
macro_rules! insert_session {
    ($lock:expr) => {
        concat!(
            "WITH live_account AS (SELECT account_id FROM accounts \
             WHERE account_id = $2 AND credentials_generation = $7 AND disable_time IS NULL",
            $lock,
            ") INSERT INTO sessions \
             (session_id, account_id, digest, create_time, expire_time, revoke_time) \
             SELECT $1, account_id, $3, $4, $5, $6 FROM live_account"
        )
    };
}
pub(super) const PG_INSERT_SESSION: &str = insert_session!(" FOR SHARE");
pub(super) const SQLITE_INSERT_SESSION: &str = insert_session!("");
pub(super) const SESSION_BY_DIGEST: &str = concat!(
    "SELECT ",
    session_cols!(),
    ", ",
    account_cols!(),
    " FROM sessions s JOIN accounts a ON a.account_id = s.account_id WHERE s.digest = $1"
);
pub(super) const REVOKE_SESSION: &str =
    "UPDATE sessions SET revoke_time = $2 WHERE session_id = $1 AND revoke_time IS NULL";
/// Ends an account's live sessions except `$2` ('' to keep none).
pub(super) const REVOKE_ACCOUNT_SESSIONS: &str = "UPDATE sessions SET revoke_time = $3 \
    WHERE account_id = $1 AND session_id <> $2 AND revoke_time IS NULL AND expire_time > $3";

pub(super) const RELEASE_DEAD_NAME: &str = "UPDATE tokens SET live_name = NULL \
    WHERE account_id = $1 AND live_name = $2 \
    AND ((expire_time IS NOT NULL AND expire_time <= $3) OR uses_remaining = 0)";
pub(super) const INSERT_TOKEN: &str = "INSERT INTO tokens \
    (token_id, account_id, name, live_name, digest, scopes, create_time, expire_time, revoke_time, \
     family_id, replaced_by, max_uses, uses_remaining, last_used_time, last_used_address, \
     parent_family_id, retire_time, resources) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)";
pub(super) const TOKEN_BY_ID: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.token_id = $1"
);
pub(super) const TOKEN_BY_DIGEST: &str = concat!(
    "SELECT ",
    token_cols!(),
    ", ",
    account_cols!(),
    " FROM tokens t JOIN accounts a ON a.account_id = t.account_id WHERE t.digest = $1"
);
/// The filters of a token listing (`TokenFilter`), given the numbers of its
/// parameters: `,state,state,` or '' for all; now; expire-before or NULL;
/// last-used-before or NULL.
macro_rules! token_filters {
    ($states:literal, $now:literal, $expire:literal, $used:literal) => {
        concat!(
            " AND (",
            $states,
            " = '' OR ",
            $states,
            " LIKE ('%,' || ",
            token_state!($now),
            " || ',%'))",
            " AND (",
            $expire,
            " IS NULL OR (t.expire_time IS NOT NULL AND t.expire_time < ",
            $expire,
            "))",
            " AND (",
            $used,
            " IS NULL OR COALESCE(t.last_used_time, t.create_time) < ",
            $used,
            ")"
        )
    };
}
/// `$1`: the account; `$2`: after this id ('' from the start); `$3`:
/// limit; `$4` to `$7`: the filters (`token_filters!`).
pub(super) const LIST_TOKENS: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.account_id = $1 AND t.token_id > $2",
    token_filters!("$4", "$5", "$6", "$7"),
    " ORDER BY t.token_id LIMIT $3"
);
/// Every account's tokens, in the same order as `LIST_TOKENS`: a range
/// scan of the primary key from `$1` (after this id, '' from the start);
/// `$2`: limit; `$3` to `$6`: the filters (`token_filters!`). A separate
/// statement rather than `($1 = '' OR account_id = $1)`, so that neither
/// listing's plan is a compromise for the other's.
pub(super) const LIST_ALL_TOKENS: &str = concat!(
    "SELECT ",
    token_cols!(),
    " FROM tokens t WHERE t.token_id > $1",
    token_filters!("$3", "$4", "$5", "$6"),
    " ORDER BY t.token_id LIMIT $2"
);
/// The columns every revoking statement returns, one row per credential it
/// revoked: its id, account and the account's username (for the audit log),
/// and `direct`, 1 if the request named it and 0 if it was revoked as a
/// descendant of one that was. `$direct` must not depend on what the
/// statement changes (SQLite evaluates RETURNING on the updated rows).
/// `live` is 0 for a rotated-out token whose grace period had ended by `$2`:
/// it is revoked too (a revocation must not depend on anyone's clock), but
/// it was dead already, so it gets no audit event of its own.
macro_rules! revoked_cols {
    ($direct:expr) => {
        concat!(
            "token_id AS credential_id, account_id, \
             COALESCE((SELECT a.username FROM accounts a \
             WHERE a.account_id = tokens.account_id), '') AS username, \
             CAST(CASE WHEN ",
            $direct,
            " THEN 1 ELSE 0 END AS BIGINT) AS direct, \
             CAST(CASE WHEN retire_time IS NULL OR retire_time > $2 THEN 1 ELSE 0 END AS BIGINT) \
             AS live"
        )
    };
}

/// A recursive common table expression, `descendants(family_id)`: the
/// rotation families descended from the families `$seed` (a query of
/// family ids) selects, through `parent_family_id` — their children, their
/// children's children, and so on (not the seeds themselves). `UNION`
/// (not `UNION ALL`) visits each family once, so even a cycle, which the
/// service never creates, would end.
macro_rules! descendants_of {
    ($seed:expr) => {
        concat!(
            "descendants(family_id) AS (SELECT c.family_id FROM tokens c \
             WHERE c.parent_family_id IN (",
            $seed,
            ") UNION SELECT c.family_id FROM tokens c \
             JOIN descendants d ON c.parent_family_id = d.family_id)"
        )
    };
}

/// Revokes a token (recording `$2`) and, if it is its family's live token
/// (not rotated out) or `$3` is 1 (the caller read it as the live token, and
/// a rotation may have landed since), the rest of its family (predecessors
/// still in a rotation's grace period, and successors: the same token under
/// another secret) and every token of every family descended from that
/// family, in one statement. Every statement that revokes sets
/// `revoke_time` only where it is NULL, and compares it with no clock: a
/// revocation holds whatever time it recorded.
pub(super) const REVOKE_TOKEN: &str = concat!(
    "WITH RECURSIVE named(family_id) AS (SELECT p.family_id FROM tokens p \
     WHERE p.token_id = $1 AND (p.replaced_by IS NULL OR $3 = 1)), ",
    descendants_of!("SELECT n.family_id FROM named n"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE (token_id = $1 OR family_id IN (SELECT family_id FROM descendants) \
     OR family_id IN (SELECT n.family_id FROM named n)) \
     AND revoke_time IS NULL RETURNING ",
    revoked_cols!("token_id = $1")
);
/// When an account is deleted its tokens go, and with them every token
/// descended from their families in other accounts (an operator's tokens
/// may have created tokens for anyone): `$1` the account, `$2` now.
pub(super) const REVOKE_ACCOUNT_DESCENDANTS: &str = concat!(
    "WITH RECURSIVE ",
    descendants_of!("SELECT f.family_id FROM tokens f WHERE f.account_id = $1"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE family_id IN (SELECT family_id FROM descendants) AND account_id <> $1 \
     AND revoke_time IS NULL RETURNING ",
    revoked_cols!("1 = 0")
);
/// Revokes every token of a family and of every family descended from it.
pub(super) const REVOKE_FAMILY: &str = concat!(
    "WITH RECURSIVE ",
    descendants_of!("SELECT CAST($1 AS TEXT)"),
    " UPDATE tokens SET revoke_time = $2, live_name = NULL \
     WHERE (family_id = $1 OR family_id IN (SELECT family_id FROM descendants)) \
     AND revoke_time IS NULL RETURNING ",
    revoked_cols!("family_id = $1")
);
/// `$2`: successor; `$3`: when the old token's grace period ends; `$4`:
/// now. A revoked token is never rotated, whatever time its revocation
/// names (on PostgreSQL the condition is re-checked on the row a concurrent
/// revocation committed, after waiting for its lock); the rotation sets the
/// grace deadline, never `revoke_time`.
pub(super) const MARK_ROTATED: &str = "UPDATE tokens SET replaced_by = $2, live_name = NULL, \
    retire_time = $3 \
    WHERE token_id = $1 AND replaced_by IS NULL AND revoke_time IS NULL \
    AND (expire_time IS NULL OR expire_time > $4)";
/// A rotation moves the uses left, not copies them: the successor (`$1`)
/// takes what its predecessor (`$2`) has left, read after `MARK_ROTATED` has
/// locked the predecessor's row (so no use of it can land in between)...
pub(super) const MOVE_USES_TO_SUCCESSOR: &str = "UPDATE tokens SET uses_remaining = \
    (SELECT o.uses_remaining FROM tokens o WHERE o.token_id = $2) \
    WHERE token_id = $1 AND uses_remaining IS NOT NULL";
/// ...and the predecessor keeps none, so that during a rotation's grace
/// period the old secret cannot spend the uses the successor holds.
pub(super) const SPEND_PREDECESSOR_USES: &str = "UPDATE tokens SET uses_remaining = 0 \
    WHERE token_id = $1 AND uses_remaining IS NOT NULL";
/// `$2`: the new expiry (NULL: never); `$3`: now.
pub(super) const RENEW_TOKEN: &str = "UPDATE tokens SET expire_time = $2 \
    WHERE token_id = $1 AND replaced_by IS NULL AND revoke_time IS NULL \
    AND (expire_time IS NULL OR expire_time > $3)";
/// Spends a use of a token that is live at `$2`: neither revoked (a
/// revocation may have landed since the token was read) nor expired.
pub(super) const CONSUME_USE: &str = "UPDATE tokens SET uses_remaining = uses_remaining - 1 \
    WHERE token_id = $1 AND uses_remaining > 0 AND revoke_time IS NULL \
    AND (retire_time IS NULL OR retire_time > $2) \
    AND (expire_time IS NULL OR expire_time > $2) RETURNING uses_remaining";
/// `$4`: the minimum interval between two recorded uses, in microseconds.
pub(super) const RECORD_USE: &str = "UPDATE tokens SET last_used_time = $2, last_used_address = $3 \
    WHERE token_id = $1 AND (last_used_time IS NULL OR last_used_time <= $2 - $4)";
/// Revokes the tokens whose digests `$1` lists (`$match`, the backend's way
/// of matching a bound list) at `$2`, with the whole family of each (a
/// reported secret that was rotated out takes its successors too, as reuse
/// detection does: whoever holds it may have rotated) and every token of the
/// families descended from those families: a whole leak report in one
/// statement.
macro_rules! leak_tokens {
    ($match:expr) => {
        concat!(
            "WITH RECURSIVE leaked AS (SELECT token_id, family_id, replaced_by FROM tokens \
             WHERE ",
            $match,
            " AND revoke_time IS NULL \
             AND (expire_time IS NULL OR expire_time > $2)), ",
            descendants_of!("SELECT l.family_id FROM leaked l"),
            " UPDATE tokens SET revoke_time = $2, live_name = NULL \
             WHERE (token_id IN (SELECT token_id FROM leaked) \
             OR family_id IN (SELECT family_id FROM leaked) \
             OR family_id IN (SELECT family_id FROM descendants)) \
             AND revoke_time IS NULL RETURNING ",
            // Not `token_id IN leaked`: on SQLite the RETURNING clause
            // may see the rows as updated, no longer live.
            revoked_cols!($match)
        )
    };
}

/// The confirming pass of a leak report (see `revoke_until_done`): the
/// members, still live, of the families whose tokens the report revoked (at
/// `$2`, exactly) and of the families descended from them. On PostgreSQL a
/// successor that a rotation committed while the first pass waited for the
/// reported row is invisible to that pass, and found by this one.
macro_rules! leak_descendants {
    ($match:expr) => {
        concat!(
            "WITH RECURSIVE reported AS (SELECT l.family_id FROM tokens l WHERE ",
            $match,
            " AND l.revoke_time = $2), ",
            descendants_of!("SELECT r.family_id FROM reported r"),
            " UPDATE tokens SET revoke_time = $2, live_name = NULL \
             WHERE (family_id IN (SELECT family_id FROM reported) \
             OR family_id IN (SELECT family_id FROM descendants)) \
             AND revoke_time IS NULL RETURNING ",
            revoked_cols!("1 = 0")
        )
    };
}

/// The live token of the family `$1` a new child names, read before the
/// child is inserted (`$lock`: the backend's row lock, so that a concurrent
/// cascade either sees the child or is seen by this read).
macro_rules! parent_live {
    ($lock:expr) => {
        concat!(
            "SELECT revoke_time FROM tokens WHERE family_id = $1 AND replaced_by IS NULL",
            $lock
        )
    };
}

/// Signs out the live sessions whose digests `$1` lists (`$match`, as in
/// [`leak_tokens`]) at `$2`, in one statement. Sessions have no children.
macro_rules! leak_sessions {
    ($match:expr) => {
        concat!(
            "UPDATE sessions SET revoke_time = $2 WHERE ",
            $match,
            " AND revoke_time IS NULL AND expire_time > $2 \
             RETURNING session_id AS credential_id, account_id, \
             COALESCE((SELECT a.username FROM accounts a \
             WHERE a.account_id = sessions.account_id), '') AS username, \
             CAST(1 AS BIGINT) AS direct, CAST(1 AS BIGINT) AS live"
        )
    };
}

/// How PostgreSQL matches a digest against the bound list (a `BYTEA[]`).
macro_rules! pg_digest_in_list {
    () => {
        "digest = ANY($1)"
    };
}
/// How SQLite matches a digest against the bound list (a JSON array of hex
/// strings: SQLite binds no arrays). The unique index on `digest` is probed
/// once per element.
macro_rules! sqlite_digest_in_list {
    () => {
        "digest IN (SELECT unhex(value) FROM json_each($1))"
    };
}
pub(super) const PG_LEAK_TOKENS: &str = leak_tokens!(pg_digest_in_list!());
pub(super) const PG_LEAK_DESCENDANTS: &str = leak_descendants!(pg_digest_in_list!());
pub(super) const PG_PARENT_LIVE: &str = parent_live!(" FOR SHARE");
pub(super) const SQLITE_LEAK_DESCENDANTS: &str = leak_descendants!(sqlite_digest_in_list!());
/// SQLite has no row locks: its writers take turns, and a transaction whose
/// read went stale by the time it writes fails instead of committing.
pub(super) const SQLITE_PARENT_LIVE: &str = parent_live!("");
pub(super) const PG_LEAK_SESSIONS: &str = leak_sessions!(pg_digest_in_list!());
pub(super) const SQLITE_LEAK_TOKENS: &str = leak_tokens!(sqlite_digest_in_list!());
pub(super) const SQLITE_LEAK_SESSIONS: &str = leak_sessions!(sqlite_digest_in_list!());

/// A sign-in counter's count after one more attempt: one if its previous
/// attempt is older than `$8` (forgotten).
macro_rules! throttle_next {
    () => {
        "(CASE WHEN sign_in_throttle.last_attempt < $8 THEN 1 \
         ELSE sign_in_throttle.failures + 1 END)"
    };
}

/// The delay (microseconds) that count arms, as `throttle::Backoff`
/// computes it: none below `$4` (the first delayed count), then `$5 <<
/// (count - $4)`, or the cap `$6` from the shift `$7` on (so the shift never
/// overflows).
macro_rules! throttle_delay {
    () => {
        concat!(
            "(CASE WHEN ",
            throttle_next!(),
            " < $4 THEN 0 WHEN ",
            throttle_next!(),
            " - $4 >= $7 THEN $6 ELSE $5 << CAST(",
            throttle_next!(),
            " - $4 AS INTEGER) END)"
        )
    };
}

/// Counts one attempt against a counter unless it is in backoff (`$3`: now)
/// or locked (`$10` failures), in one statement, so that concurrent attempts
/// serialise on the row and each sees the others' counts. A count that arms
/// no delay leaves `blocked_until` alone: setting it to "now" would refuse a
/// concurrent attempt whose clock reading is a microsecond older. `$9`: the delay a
/// first failure arms. `count_since` says when the current count began:
/// now for a new row or a forgotten count that restarts at one (see
/// [`UNCOUNT_SIGN_IN`]). Returns no row when refused.
pub(super) const CLAIM_SIGN_IN: &str = concat!(
    "INSERT INTO sign_in_throttle \
     (scope, subject, failures, last_attempt, blocked_until, reported_until, count_since) \
     VALUES ($1, $2, 1, $3, CASE WHEN $9 = 0 THEN 0 ELSE $3 + $9 END, 0, $3) \
     ON CONFLICT (scope, subject) DO UPDATE SET failures = ",
    throttle_next!(),
    ", count_since = CASE WHEN sign_in_throttle.last_attempt < $8 THEN $3 \
     ELSE sign_in_throttle.count_since END",
    ", last_attempt = $3, blocked_until = CASE WHEN ",
    throttle_delay!(),
    " = 0 THEN sign_in_throttle.blocked_until ELSE $3 + ",
    throttle_delay!(),
    " END WHERE sign_in_throttle.blocked_until <= $3 AND sign_in_throttle.failures < $10 \
     RETURNING failures"
);
pub(super) const SIGN_IN_COUNTER: &str = "SELECT failures, blocked_until FROM sign_in_throttle \
    WHERE scope = $1 AND subject = $2";
/// Marks a counter's current block as audited; changes nothing (and returns
/// no row) if it already was.
pub(super) const REPORT_SIGN_IN_BLOCK: &str = "UPDATE sign_in_throttle \
    SET reported_until = blocked_until \
    WHERE scope = $1 AND subject = $2 AND reported_until < blocked_until";
pub(super) const RESET_SIGN_IN_ACCOUNT: &str =
    "DELETE FROM sign_in_throttle WHERE scope = 'account' AND subject = $1";
/// Takes back one attempt claimed at `$3`, from the count it was counted in
/// only: a count that began after the claim (the row was deleted by a reset
/// and inserted again, or its count was forgotten and restarted at one)
/// holds none of the claim's failure, and giving it back there would erase
/// a later, checked guess. A later count's `count_since` is past `$3` by
/// construction: it is the instant of a claim that followed the reset,
/// itself after this claim (on one replica's clock; across replicas, up to
/// their clock skew, which errs either way by at most the give-backs of
/// claims made within that skew of a reset).
pub(super) const UNCOUNT_SIGN_IN: &str = "UPDATE sign_in_throttle \
    SET failures = failures - 1 \
    WHERE scope = $1 AND subject = $2 AND failures > 0 AND count_since <= $3";
pub(super) const UNCOUNT_SIGN_IN_ADDRESS: &str = "UPDATE sign_in_throttle \
    SET failures = failures - 1 WHERE scope = 'address' AND subject = $1 AND failures > 0";

/// Whether token `$x` stopped working at or before `$1`: revoked, expired,
/// or used up (when, is known only to the last recorded use, at most the
/// recording interval early).
macro_rules! token_dead {
    ($x:literal) => {
        concat!(
            "((",
            $x,
            ".revoke_time IS NOT NULL AND ",
            $x,
            ".revoke_time <= $1) \
             OR (",
            $x,
            ".retire_time IS NOT NULL AND ",
            $x,
            ".retire_time <= $1) \
             OR (",
            $x,
            ".expire_time IS NOT NULL AND ",
            $x,
            ".expire_time <= $1) \
             OR (COALESCE(",
            $x,
            ".uses_remaining, -1) = 0 \
                 AND COALESCE(",
            $x,
            ".last_used_time, ",
            $x,
            ".create_time) <= $1))"
        )
    };
}

/// Retention (see `domain::retention`): each statement deletes at most `$2`
/// rows. `$1`: the sessions' cutoff.
pub(super) const PURGE_SESSIONS: &str = "DELETE FROM sessions WHERE session_id IN (\
    SELECT session_id FROM sessions \
    WHERE expire_time <= $1 OR (revoke_time IS NOT NULL AND revoke_time <= $1) LIMIT $2)";
/// Tokens dead before `$1` whose whole rotation family is.
pub(super) const PURGE_TOKENS: &str = concat!(
    "DELETE FROM tokens WHERE token_id IN (SELECT t.token_id FROM tokens t WHERE ",
    token_dead!("t"),
    " AND NOT EXISTS (SELECT 1 FROM tokens f WHERE f.family_id = t.family_id AND NOT ",
    token_dead!("f"),
    ") LIMIT $2)"
);
/// `$1`: username counters idle at or before this (NULL: none); `$3`: their
/// lockout; `$4`: address counters idle before this; `$5`: now.
pub(super) const PURGE_SIGN_IN_THROTTLE: &str = "DELETE FROM sign_in_throttle \
    WHERE (scope, subject) IN (SELECT scope, subject FROM sign_in_throttle \
    WHERE blocked_until <= $5 AND ((scope = 'address' AND last_attempt < $4) \
    OR (scope = 'account' AND $1 IS NOT NULL AND last_attempt <= $1 AND failures < $3)) \
    LIMIT $2)";
/// `$1`: events at or before this instant.
pub(super) const PURGE_EVENTS: &str = "DELETE FROM audit_events WHERE event_id IN (\
    SELECT event_id FROM audit_events WHERE event_time <= $1 LIMIT $2)";

/// Implements [`super::Store`] for a backend type, over sqlx database `$db`.
/// The backend module supplies a `pool` field, `MIGRATIONS`, and the
/// functions where backends differ: `classify` (errors), `announce`,
/// `announce_credentials` and `watch_changes` (change notifications),
/// `write_uses` (batched last use), `digest_list` with `LEAK_TOKENS`,
/// `LEAK_DESCENDANTS` and `LEAK_SESSIONS` (a bound list of digests),
/// `PARENT_LIVE` (a row lock where there are any), and the `SHARED`
/// constant.
macro_rules! impl_store {
    ($store:ty, $db:ty) => {
        impl $store {
            /// Appends `event` within the caller's transaction.
            async fn insert_event(
                conn: &mut <$db as sqlx::Database>::Connection,
                event: &AuditEvent,
            ) -> Result<(), StorageError> {
                sqlx::query(sql::INSERT_EVENT)
                    .bind(event.id.as_str())
                    .bind(event.time.as_micros())
                    .bind(event.kind.as_str())
                    .bind(event.outcome.as_str())
                    .bind(event.actor_account.as_ref().map(AccountId::as_str))
                    .bind(event.actor_credential.as_ref().map(TokenId::as_str))
                    .bind(event.subject_account.as_ref().map(AccountId::as_str))
                    .bind(event.subject_credential.as_ref().map(TokenId::as_str))
                    .bind(event.subject_username.as_str())
                    .bind(event.source_address.as_str())
                    .execute(&mut *conn)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            /// Appends `event` and announces `what` to every replica, within
            /// the caller's transaction: both take effect when it commits.
            async fn record(
                conn: &mut <$db as sqlx::Database>::Connection,
                event: &AuditEvent,
                what: &Invalidation,
            ) -> Result<(), StorageError> {
                Self::insert_event(&mut *conn, event).await?;
                Self::announce(conn, what).await
            }

            /// Applies the embedded migrations that the database lacks.
            pub async fn migrate(&self) -> Result<(), StorageError> {
                self.check_schema(true).await?;
                // The backend module's own `MIGRATIONS`.
                super::migrator(MIGRATIONS)
                    .run(&self.pool)
                    .await
                    .map_err(|e| match e {
                        sqlx::migrate::MigrateError::Execute(inner) => Self::classify(inner),
                        sqlx::migrate::MigrateError::VersionMismatch(version) => {
                            StorageError::Schema(format!(
                                "migration {version} as applied to the database differs from \
                                 the one this build carries; released migrations must never change"
                            ))
                        }
                        other => StorageError::Other(Box::new(other)),
                    })
            }

            /// Compares the migrations applied to the database with the ones
            /// this build carries. A database that has a migration this
            /// build does not know was migrated by a newer release: serving
            /// it could write rows the newer schema forbids, so it is
            /// refused. Unless `will_migrate`, a database lacking some of
            /// this build's migrations is refused too, with a pointer to
            /// `identity migrate`.
            pub async fn check_schema(&self, will_migrate: bool) -> Result<(), StorageError> {
                let exists: i64 = sqlx::query_scalar(SCHEMA_TABLE_EXISTS)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                let applied: Vec<i64> = if exists > 0 {
                    sqlx::query_scalar(sql::APPLIED_MIGRATIONS)
                        .fetch_all(&self.pool)
                        .await
                        .map_err(Self::classify)?
                } else {
                    Vec::new()
                };
                let known = super::schema_versions(MIGRATIONS);
                super::compare_schema(&applied, &known, will_migrate)
            }

            /// Whether any of this service's migrations has been applied
            /// to the database: `false` for one nobody migrated yet.
            pub async fn schema_applied(&self) -> Result<bool, StorageError> {
                let exists: i64 = sqlx::query_scalar(SCHEMA_TABLE_EXISTS)
                    .fetch_one(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                if exists == 0 {
                    return Ok(false);
                }
                let applied: Vec<i64> = sqlx::query_scalar(sql::APPLIED_MIGRATIONS)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                Ok(!applied.is_empty())
            }

            /// Runs a revoking statement (one that returns
            /// `revoked_cols!()`) within the caller's transaction; writes
            /// `direct(row)` (when it returns an event) for each credential
            /// the request named, and a `token.revoked` event by the same
            /// actor for each descendant revoked with it; announces every
            /// revoked credential to every replica; and returns their ids.
            async fn revoke_rows<'q>(
                conn: &mut <$db as sqlx::Database>::Connection,
                query: sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                cause: &AuditEvent,
                direct: impl Fn(&rows::Revoked) -> Option<AuditEvent>,
            ) -> Result<Vec<TokenId>, StorageError> {
                let found = query
                    .fetch_all(&mut *conn)
                    .await
                    .map_err(Self::classify)?;
                let mut ids = Vec::with_capacity(found.len());
                for row in &found {
                    let revoked = rows::revoked(row)?;
                    let event = if revoked.direct {
                        direct(&revoked)
                    } else if !revoked.live {
                        None
                    } else {
                        Some(
                            AuditEvent {
                                kind: $crate::domain::audit::EventType::TokenRevoked,
                                // Took effect, even when its cause was a
                                // refused attempt (reuse detection).
                                outcome: $crate::domain::audit::Outcome::Success,
                                ..cause.another()
                            }
                            .account(&revoked.account, &revoked.username)
                            .credential(&revoked.id),
                        )
                    };
                    if let Some(event) = event {
                        Self::insert_event(&mut *conn, &event).await?;
                    }
                    ids.push(revoked.id);
                }
                Self::announce_credentials(&mut *conn, &ids).await?;
                Ok(ids)
            }

            /// Runs the confirming passes of a cascading revocation: `again`
            /// (which revokes only descendants) until it revokes nothing.
            /// On PostgreSQL a child whose creation was in flight when the
            /// first pass took its snapshot is invisible to it, but that
            /// creation holds a share lock on its parent's live row, which
            /// the first pass waited for: the next pass, with a fresh
            /// snapshot, sees the child. Usually one empty pass.
            async fn revoke_until_done<'q>(
                conn: &mut <$db as sqlx::Database>::Connection,
                again: impl Fn() -> sqlx::query::Query<'q, $db, <$db as sqlx::Database>::Arguments<'q>>,
                cause: &AuditEvent,
                revoked: &mut Vec<TokenId>,
            ) -> Result<(), StorageError> {
                loop {
                    let more = Self::revoke_rows(&mut *conn, again(), cause, |_| None).await?;
                    if more.is_empty() {
                        return Ok(());
                    }
                    revoked.extend(more);
                }
            }
        }

        #[async_trait::async_trait]
        impl $crate::storage::Store for $store {
            async fn ping(&self) -> Result<(), StorageError> {
                sqlx::query("SELECT 1")
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            fn shared(&self) -> bool {
                Self::SHARED
            }

            fn watch(&self, sink: std::sync::Arc<dyn InvalidationSink>) {
                self.watch_changes(sink);
            }

            fn pool_usage(&self) -> Option<super::PoolUsage> {
                Some(super::PoolUsage {
                    size: self.pool.size(),
                    idle: u32::try_from(self.pool.num_idle()).unwrap_or(u32::MAX),
                    max: self.pool.options().get_max_connections(),
                })
            }

            async fn create_account(
                &self,
                account: &Account,
                event: &AuditEvent,
            ) -> Result<(), StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                sqlx::query(sql::INSERT_ACCOUNT)
                    .bind(account.id.as_str())
                    .bind(account.username.as_str())
                    .bind(account.username.key())
                    .bind(account.email.as_str())
                    .bind(account.kind.as_str())
                    .bind(account.role.as_str())
                    .bind(account.password_hash.as_ref().map(|h| h.as_str()))
                    .bind(account.create_time.as_micros())
                    .bind(account.disable_time.map(Timestamp::as_micros))
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                Self::insert_event(&mut tx, event).await?;
                tx.commit().await.map_err(Self::classify)
            }

            async fn account_by_id(&self, id: &AccountId) -> Result<Option<Account>, StorageError> {
                let row = sqlx::query(sql::ACCOUNT_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::account).transpose()
            }

            async fn account_by_username(
                &self,
                key: &str,
            ) -> Result<Option<Account>, StorageError> {
                let row = sqlx::query(sql::ACCOUNT_BY_USERNAME)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::account).transpose()
            }

            async fn list_accounts(
                &self,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Account>, StorageError> {
                let found = sqlx::query(sql::LIST_ACCOUNTS)
                    .bind(after.unwrap_or(""))
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::account).collect()
            }

            async fn set_account_disabled(
                &self,
                id: &AccountId,
                at: Option<Timestamp>,
                event: &AuditEvent,
            ) -> Result<Option<Account>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let changed = match at {
                    Some(at) => sqlx::query(sql::DISABLE_ACCOUNT)
                        .bind(id.as_str())
                        .bind(at.as_micros()),
                    None => sqlx::query(sql::ENABLE_ACCOUNT).bind(id.as_str()),
                }
                .execute(&mut *tx)
                .await
                .map_err(Self::classify)?
                .rows_affected();
                if changed > 0 {
                    Self::record(&mut tx, event, &Invalidation::Account(id.clone())).await?;
                }
                let row = sqlx::query(sql::ACCOUNT_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let account = row.as_ref().map(rows::account).transpose()?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(account)
            }

            async fn delete_account(
                &self,
                id: &AccountId,
                event: &AuditEvent,
            ) -> Result<Option<Vec<TokenId>>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                // First the account row, so that nothing is created for it
                // between the statements below (see the query).
                let found = sqlx::query(LOCK_ACCOUNT_FOR_DELETE)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if found == 0 {
                    return Ok(None);
                }
                let at = event.time.as_micros();
                let query = sqlx::query(sql::REVOKE_ACCOUNT_DESCENDANTS)
                    .bind(id.as_str())
                    .bind(at);
                let mut revoked = Self::revoke_rows(&mut tx, query, event, |_| None).await?;
                let again = || {
                    sqlx::query(sql::REVOKE_ACCOUNT_DESCENDANTS)
                        .bind(id.as_str())
                        .bind(at)
                };
                Self::revoke_until_done(&mut tx, again, event, &mut revoked).await?;
                for query in [sql::DELETE_ACCOUNT_SESSIONS, sql::DELETE_ACCOUNT_TOKENS] {
                    sqlx::query(query)
                        .bind(id.as_str())
                        .execute(&mut *tx)
                        .await
                        .map_err(Self::classify)?;
                }
                let deleted = sqlx::query(sql::DELETE_ACCOUNT)
                    .bind(id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if deleted == 0 {
                    return Ok(None);
                }
                Self::record(&mut tx, event, &Invalidation::Account(id.clone())).await?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(Some(revoked))
            }

            async fn set_password(
                &self,
                id: &AccountId,
                hash: &PasswordHash,
                keep: &TokenId,
                at: Timestamp,
                event: &AuditEvent,
            ) -> Result<u64, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                sqlx::query(sql::SET_PASSWORD)
                    .bind(id.as_str())
                    .bind(hash.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let ended = sqlx::query(sql::REVOKE_ACCOUNT_SESSIONS)
                    .bind(id.as_str())
                    .bind(keep.as_str())
                    .bind(at.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                Self::record(&mut tx, event, &Invalidation::Account(id.clone())).await?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(ended)
            }

            async fn revoke_sessions(
                &self,
                account: &AccountId,
                at: Timestamp,
                event: &AuditEvent,
            ) -> Result<u64, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                // The generation first: a sign-in that locks the account
                // after this waits for the commit and finds it moved on; one
                // that locked it before has committed its session by the
                // time the revocation below runs.
                sqlx::query(sql::BUMP_CREDENTIALS)
                    .bind(account.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let ended = sqlx::query(sql::REVOKE_ACCOUNT_SESSIONS)
                    .bind(account.as_str())
                    .bind("")
                    .bind(at.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                Self::record(&mut tx, event, &Invalidation::Account(account.clone())).await?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(ended)
            }

            async fn create_session(
                &self,
                session: &Session,
                digest: &Digest,
                generation: i64,
                event: &AuditEvent,
            ) -> Result<bool, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let inserted = sqlx::query(INSERT_SESSION)
                    .bind(session.id.as_str())
                    .bind(session.account_id.as_str())
                    .bind(&digest.as_bytes()[..])
                    .bind(session.create_time.as_micros())
                    .bind(session.expire_time.as_micros())
                    .bind(session.revoke_time.map(Timestamp::as_micros))
                    .bind(generation)
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if inserted == 0 {
                    return Ok(false);
                }
                Self::insert_event(&mut tx, event).await?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(true)
            }

            async fn session_by_digest(
                &self,
                digest: &Digest,
            ) -> Result<Option<WithAccount<Session>>, StorageError> {
                let row = sqlx::query(sql::SESSION_BY_DIGEST)
                    .bind(&digest.as_bytes()[..])
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref()
                    .map(|r| Ok((rows::session(r)?, rows::account(r)?)))
                    .transpose()
            }

            async fn revoke_session(
                &self,
                id: &TokenId,
                at: Timestamp,
                event: &AuditEvent,
            ) -> Result<(), StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let changed = sqlx::query(sql::REVOKE_SESSION)
                    .bind(id.as_str())
                    .bind(at.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if changed > 0 {
                    Self::record(&mut tx, event, &Invalidation::Credential(id.clone())).await?;
                }
                tx.commit().await.map_err(Self::classify)
            }

            async fn create_token(
                &self,
                new: &NewToken,
                now: Timestamp,
                max_live: u32,
                event: &AuditEvent,
            ) -> Result<(), StorageError> {
                let token = &new.token;
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                // The account row first: a deletion holds it off (or waits
                // for this creation), and creations for the account take
                // turns, so that their count below is exact.
                let found = sqlx::query(sql::LOCK_ACCOUNT)
                    .bind(token.account_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if found == 0 {
                    return Err(StorageError::AccountGone);
                }
                let live: i64 = sqlx::query_scalar(sql::COUNT_LIVE_TOKENS)
                    .bind(token.account_id.as_str())
                    .bind(now.as_micros())
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                if live >= i64::from(max_live) {
                    return Err(StorageError::TooManyTokens(max_live));
                }
                sqlx::query(sql::RELEASE_DEAD_NAME)
                    .bind(token.account_id.as_str())
                    .bind(token.name.as_str())
                    .bind(now.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                if let Some(parent) = &token.parent_family_id {
                    // A child is never born to a revoked family: the
                    // cascade that revoked it could not have seen the child.
                    let live: Vec<Option<i64>> = sqlx::query_scalar(PARENT_LIVE)
                        .bind(parent.as_str())
                        .fetch_all(&mut *tx)
                        .await
                        .map_err(Self::classify)?;
                    // Revoked whatever time the revocation names.
                    if !live.iter().any(Option::is_none) {
                        return Err(StorageError::ParentRevoked);
                    }
                }
                Self::insert_token(&mut tx, new).await?;
                Self::insert_event(&mut tx, event).await?;
                tx.commit().await.map_err(Self::classify)
            }

            async fn token_by_id(&self, id: &TokenId) -> Result<Option<Token>, StorageError> {
                let row = sqlx::query(sql::TOKEN_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref().map(rows::token).transpose()
            }

            async fn token_by_digest(
                &self,
                digest: &Digest,
            ) -> Result<Option<WithAccount<Token>>, StorageError> {
                let row = sqlx::query(sql::TOKEN_BY_DIGEST)
                    .bind(&digest.as_bytes()[..])
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                row.as_ref()
                    .map(|r| Ok((rows::token(r)?, rows::account(r)?)))
                    .transpose()
            }

            async fn list_tokens(
                &self,
                account: &AccountId,
                filter: &TokenFilter,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Token>, StorageError> {
                let found = sqlx::query(sql::LIST_TOKENS)
                    .bind(account.as_str())
                    .bind(after.unwrap_or(""))
                    .bind(i64::from(limit))
                    .bind(rows::states_pattern(&filter.states))
                    .bind(filter.now.as_micros())
                    .bind(filter.expire_before.map(Timestamp::as_micros))
                    .bind(filter.last_used_before.map(Timestamp::as_micros))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::token).collect()
            }

            async fn list_all_tokens(
                &self,
                filter: &TokenFilter,
                after: Option<&str>,
                limit: u32,
            ) -> Result<Vec<Token>, StorageError> {
                let found = sqlx::query(sql::LIST_ALL_TOKENS)
                    .bind(after.unwrap_or(""))
                    .bind(i64::from(limit))
                    .bind(rows::states_pattern(&filter.states))
                    .bind(filter.now.as_micros())
                    .bind(filter.expire_before.map(Timestamp::as_micros))
                    .bind(filter.last_used_before.map(Timestamp::as_micros))
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::token).collect()
            }

            async fn revoke_token(
                &self,
                id: &TokenId,
                seen_live: bool,
                at: Timestamp,
                event: &AuditEvent,
            ) -> Result<Option<(Token, Vec<TokenId>)>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let query = sqlx::query(sql::REVOKE_TOKEN)
                    .bind(id.as_str())
                    .bind(at.as_micros())
                    .bind(i64::from(seen_live));
                let mut revoked =
                    Self::revoke_rows(&mut tx, query, event, |_| Some(event.clone())).await?;
                // On PostgreSQL, a successor inserted by a rotation that this
                // pass waited for (on the live row's lock) is invisible to
                // its snapshot: the next pass sees it.
                let again = || {
                    sqlx::query(sql::REVOKE_TOKEN)
                        .bind(id.as_str())
                        .bind(at.as_micros())
                        .bind(i64::from(seen_live))
                };
                Self::revoke_until_done(&mut tx, again, event, &mut revoked).await?;
                let row = sqlx::query(sql::TOKEN_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let token = row.as_ref().map(rows::token).transpose()?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(token.map(|token| (token, revoked)))
            }

            async fn rotate_token(
                &self,
                old: &TokenId,
                new: &NewToken,
                retire_old_at: Timestamp,
                now: Timestamp,
                event: &AuditEvent,
            ) -> Result<Option<Token>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                // The account row first, as creation and deletion take it:
                // locked after the token row (the successor's foreign key
                // waits for it), a deletion holding it and waiting for the
                // token rows would deadlock with this rotation.
                let found = sqlx::query(sql::LOCK_ACCOUNT)
                    .bind(new.token.account_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if found == 0 {
                    return Err(StorageError::AccountGone);
                }
                let marked = sqlx::query(sql::MARK_ROTATED)
                    .bind(old.as_str())
                    .bind(new.token.id.as_str())
                    .bind(retire_old_at.as_micros())
                    .bind(now.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if marked == 0 {
                    return Ok(None);
                }
                Self::insert_token(&mut tx, new).await?;
                sqlx::query(sql::MOVE_USES_TO_SUCCESSOR)
                    .bind(new.token.id.as_str())
                    .bind(old.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                sqlx::query(sql::SPEND_PREDECESSOR_USES)
                    .bind(old.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                Self::record(&mut tx, event, &Invalidation::Credential(old.clone())).await?;
                let row = sqlx::query(sql::TOKEN_BY_ID)
                    .bind(old.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let previous = row.as_ref().map(rows::token).transpose()?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(previous)
            }

            async fn renew_token(
                &self,
                id: &TokenId,
                expire_time: Option<Timestamp>,
                now: Timestamp,
                event: &AuditEvent,
            ) -> Result<Option<Token>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let renewed = sqlx::query(sql::RENEW_TOKEN)
                    .bind(id.as_str())
                    .bind(expire_time.map(Timestamp::as_micros))
                    .bind(now.as_micros())
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?
                    .rows_affected();
                if renewed == 0 {
                    return Ok(None);
                }
                Self::record(&mut tx, event, &Invalidation::Credential(id.clone())).await?;
                let row = sqlx::query(sql::TOKEN_BY_ID)
                    .bind(id.as_str())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                let token = row.as_ref().map(rows::token).transpose()?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(token)
            }

            async fn revoke_family(
                &self,
                family: &TokenId,
                at: Timestamp,
                event: &AuditEvent,
            ) -> Result<Vec<TokenId>, StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                // One event for the family, written even if it was already
                // revoked; one per descendant.
                Self::insert_event(&mut tx, event).await?;
                let query = sqlx::query(sql::REVOKE_FAMILY)
                    .bind(family.as_str())
                    .bind(at.as_micros());
                let mut revoked = Self::revoke_rows(&mut tx, query, event, |_| None).await?;
                let again = || {
                    sqlx::query(sql::REVOKE_FAMILY)
                        .bind(family.as_str())
                        .bind(at.as_micros())
                };
                Self::revoke_until_done(&mut tx, again, event, &mut revoked).await?;
                tx.commit().await.map_err(Self::classify)?;
                Ok(revoked)
            }

            async fn consume_use(
                &self,
                id: &TokenId,
                now: Timestamp,
            ) -> Result<Option<i64>, StorageError> {
                sqlx::query_scalar(sql::CONSUME_USE)
                    .bind(id.as_str())
                    .bind(now.as_micros())
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(Self::classify)
            }

            async fn record_uses(
                &self,
                uses: &[$crate::storage::TokenUse],
                interval: std::time::Duration,
            ) -> Result<(), StorageError> {
                if uses.is_empty() {
                    return Ok(());
                }
                self.write_uses(
                    uses,
                    i64::try_from(interval.as_micros()).unwrap_or(i64::MAX),
                )
                .await
            }

            async fn revoke_leaked(
                &self,
                tokens: &[Digest],
                sessions: &[Digest],
                at: Timestamp,
                template: &AuditEvent,
            ) -> Result<Vec<TokenId>, StorageError> {
                let reported = |hit: &rows::Revoked| {
                    Some(
                        template
                            .another()
                            .account(&hit.account, &hit.username)
                            .credential(&hit.id),
                    )
                };
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                let mut revoked = Vec::new();
                for (digests, query) in [(tokens, LEAK_TOKENS), (sessions, LEAK_SESSIONS)] {
                    if digests.is_empty() {
                        continue;
                    }
                    let query = sqlx::query(query)
                        .bind(Self::digest_list(digests))
                        .bind(at.as_micros());
                    revoked.extend(Self::revoke_rows(&mut tx, query, template, reported).await?);
                }
                if !tokens.is_empty() {
                    let list = Self::digest_list(tokens);
                    let again = || {
                        sqlx::query(LEAK_DESCENDANTS)
                            .bind(list.clone())
                            .bind(at.as_micros())
                    };
                    Self::revoke_until_done(&mut tx, again, template, &mut revoked).await?;
                }
                tx.commit().await.map_err(Self::classify)?;
                Ok(revoked)
            }

            async fn claim_sign_in(
                &self,
                claims: &[ThrottleClaim],
                now: Timestamp,
            ) -> Result<Option<Vec<ThrottleCounter>>, StorageError> {
                // A counter may stop refusing between the failed claim and
                // the read (its block ends, or a success resets it): then
                // claim again, a few times at most.
                for _ in 0..3 {
                    if Self::try_claim_sign_in(&self.pool, claims, now).await? {
                        return Ok(None);
                    }
                    let mut counters = Vec::with_capacity(claims.len());
                    for claim in claims {
                        let row: Option<(i64, i64)> = sqlx::query_as(sql::SIGN_IN_COUNTER)
                            .bind(claim.scope.as_str())
                            .bind(claim.subject.as_str())
                            .fetch_optional(&self.pool)
                            .await
                            .map_err(Self::classify)?;
                        let Some((failures, blocked_until)) = row else {
                            continue;
                        };
                        let refusing = blocked_until > now.as_micros() || failures >= claim.lockout;
                        let first_refusal = refusing
                            && sqlx::query(sql::REPORT_SIGN_IN_BLOCK)
                                .bind(claim.scope.as_str())
                                .bind(claim.subject.as_str())
                                .execute(&self.pool)
                                .await
                                .map_err(Self::classify)?
                                .rows_affected()
                                > 0;
                        counters.push(ThrottleCounter {
                            scope: claim.scope,
                            failures,
                            blocked_until: Timestamp::from_micros(blocked_until),
                            refusing,
                            first_refusal,
                        });
                    }
                    if counters.iter().any(|c| c.refusing) {
                        return Ok(Some(counters));
                    }
                }
                Err(StorageError::Unavailable(
                    "sign-in counters kept changing under contention".into(),
                ))
            }

            async fn sign_in_succeeded(
                &self,
                username_key: &str,
                address_key: &str,
            ) -> Result<(), StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                sqlx::query(sql::RESET_SIGN_IN_ACCOUNT)
                    .bind(username_key)
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                sqlx::query(sql::UNCOUNT_SIGN_IN_ADDRESS)
                    .bind(address_key)
                    .execute(&mut *tx)
                    .await
                    .map_err(Self::classify)?;
                tx.commit().await.map_err(Self::classify)
            }

            async fn give_back_sign_in(
                &self,
                claims: &[ThrottleClaim],
                claimed_at: Timestamp,
            ) -> Result<(), StorageError> {
                let mut tx = self.pool.begin().await.map_err(Self::classify)?;
                for claim in claims {
                    sqlx::query(sql::UNCOUNT_SIGN_IN)
                        .bind(claim.scope.as_str())
                        .bind(claim.subject.as_str())
                        .bind(claimed_at.as_micros())
                        .execute(&mut *tx)
                        .await
                        .map_err(Self::classify)?;
                }
                tx.commit().await.map_err(Self::classify)
            }

            async fn reset_sign_in_failures(&self, username_key: &str) -> Result<(), StorageError> {
                sqlx::query(sql::RESET_SIGN_IN_ACCOUNT)
                    .bind(username_key)
                    .execute(&self.pool)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }

            async fn record_event(&self, event: &AuditEvent) -> Result<(), StorageError> {
                let mut conn = self.pool.acquire().await.map_err(Self::classify)?;
                Self::insert_event(&mut conn, event).await
            }

            async fn list_events(
                &self,
                filter: &AuditFilter,
                before: Option<(Timestamp, &str)>,
                limit: u32,
            ) -> Result<Vec<AuditEvent>, StorageError> {
                // No bound is a bound past every stored time (which the
                // domain keeps within Timestamp::MIN..=MAX).
                let start = filter.start_time.map_or(i64::MIN, Timestamp::as_micros);
                let end = filter.end_time.map_or(i64::MAX, Timestamp::as_micros);
                let (before_time, before_id) =
                    before.map_or((end, ""), |(time, id)| (time.as_micros(), id));
                let found = sqlx::query(sql::LIST_EVENTS)
                    .bind(filter.account.as_ref().map_or("", AccountId::as_str))
                    .bind(filter.types_pattern())
                    .bind(before_time)
                    .bind(before_id)
                    .bind(i64::from(limit))
                    .bind(start)
                    .bind(end)
                    .fetch_all(&self.pool)
                    .await
                    .map_err(Self::classify)?;
                found.iter().map(rows::event).collect()
            }

            async fn database_time(&self) -> Result<Timestamp, StorageError> {
                self.clock().await
            }

            async fn purge(&self, cutoffs: &PurgeCutoffs) -> Result<Option<Purged>, StorageError> {
                let mut conn = self.pool.acquire().await.map_err(Self::classify)?;
                if !Self::lock_retention(&mut conn).await? {
                    return Ok(None);
                }
                let purged = Self::purge_on(&mut conn, cutoffs).await;
                if Self::unlock_retention(&mut conn).await.is_err() {
                    // Closing the connection releases a lock it may hold.
                    let _ = conn.close().await;
                }
                purged.map(Some)
            }
        }

        impl $store {
            /// Claims the attempt against every counter in one transaction:
            /// `true` if all counted it, `false` (nothing changed) if one
            /// refused. Counters are always claimed in the same order
            /// (username before address), so concurrent claims cannot
            /// deadlock.
            async fn try_claim_sign_in(
                pool: &sqlx::Pool<$db>,
                claims: &[ThrottleClaim],
                now: Timestamp,
            ) -> Result<bool, StorageError> {
                let mut tx = pool.begin().await.map_err(Self::classify)?;
                for claim in claims {
                    let curve = &claim.curve;
                    let counted: Option<i64> = sqlx::query_scalar(sql::CLAIM_SIGN_IN)
                        .bind(claim.scope.as_str())
                        .bind(claim.subject.as_str())
                        .bind(now.as_micros())
                        .bind(curve.first_delayed)
                        .bind(curve.base_micros)
                        .bind(curve.max_micros)
                        .bind(curve.max_shift)
                        .bind(claim.forget_before.as_micros())
                        .bind(curve.delay_micros(1))
                        .bind(claim.lockout)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(Self::classify)?;
                    if counted.is_none() {
                        // Dropping the transaction rolls the others back.
                        return Ok(false);
                    }
                }
                tx.commit().await.map_err(Self::classify)?;
                Ok(true)
            }

            /// Deletes what `cutoffs` say is past retention, in batches of
            /// at most `cutoffs.batch` rows, each its own statement, on
            /// `conn` (which holds the retention lock, where there is one).
            async fn purge_on(
                conn: &mut <$db as sqlx::Database>::Connection,
                cutoffs: &PurgeCutoffs,
            ) -> Result<Purged, StorageError> {
                let batch = i64::from(cutoffs.batch);
                let mut purged = Purged::default();
                if let Some(cutoff) = cutoffs.credentials {
                    for (query, count) in [
                        (sql::PURGE_SESSIONS, &mut purged.sessions),
                        (sql::PURGE_TOKENS, &mut purged.tokens),
                    ] {
                        loop {
                            let deleted = sqlx::query(query)
                                .bind(cutoff.as_micros())
                                .bind(batch)
                                .execute(&mut *conn)
                                .await
                                .map_err(Self::classify)?
                                .rows_affected();
                            *count += deleted;
                            if deleted < cutoffs.batch.into() {
                                break;
                            }
                        }
                    }
                }
                loop {
                    let deleted = sqlx::query(sql::PURGE_SIGN_IN_THROTTLE)
                        .bind(cutoffs.username_counters.map(Timestamp::as_micros))
                        .bind(batch)
                        .bind(cutoffs.lockout)
                        .bind(cutoffs.address_counters.as_micros())
                        .bind(cutoffs.now.as_micros())
                        .execute(&mut *conn)
                        .await
                        .map_err(Self::classify)?
                        .rows_affected();
                    purged.sign_in_throttle += deleted;
                    if deleted < cutoffs.batch.into() {
                        break;
                    }
                }
                if let Some(cutoff) = cutoffs.audit {
                    loop {
                        let deleted = sqlx::query(sql::PURGE_EVENTS)
                            .bind(cutoff.as_micros())
                            .bind(batch)
                            .execute(&mut *conn)
                            .await
                            .map_err(Self::classify)?
                            .rows_affected();
                        purged.audit_events += deleted;
                        if deleted < cutoffs.batch.into() {
                            break;
                        }
                    }
                }
                Ok(purged)
            }

            /// Inserts a token row within the caller's transaction.
            async fn insert_token(
                conn: &mut <$db as sqlx::Database>::Connection,
                new: &NewToken,
            ) -> Result<(), StorageError> {
                let token = &new.token;
                sqlx::query(sql::INSERT_TOKEN)
                    .bind(token.id.as_str())
                    .bind(token.account_id.as_str())
                    .bind(token.name.as_str())
                    .bind(token.revoke_time.is_none().then(|| token.name.as_str()))
                    .bind(&new.digest.as_bytes()[..])
                    .bind(token.scopes.to_stored())
                    .bind(token.create_time.as_micros())
                    .bind(token.expire_time.map(Timestamp::as_micros))
                    .bind(token.revoke_time.map(Timestamp::as_micros))
                    .bind(token.family_id.as_str())
                    .bind(token.replaced_by.as_ref().map(TokenId::as_str))
                    .bind(token.max_uses)
                    .bind(token.uses_remaining)
                    .bind(token.last_used_time.map(Timestamp::as_micros))
                    .bind(token.last_used_address.as_str())
                    .bind(token.parent_family_id.as_ref().map(TokenId::as_str))
                    .bind(token.retire_time.map(Timestamp::as_micros))
                    .bind(token.resources.to_stored())
                    .execute(&mut *conn)
                    .await
                    .map(drop)
                    .map_err(Self::classify)
            }
        }
    };
}

pub(super) use impl_store;
