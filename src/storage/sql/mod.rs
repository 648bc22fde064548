//! The store, written once for both databases: [`SqlStore`] implements the
//! domain's [`Store`] over any [`Backend`], with its queries and their
//! transactions grouped by area in the modules below, each next to its SQL.
//! Both backends accept the same SQL (numbered `$n` parameters, which sqlx
//! binds by number on SQLite too); where a statement's text differs (a row
//! lock, how a bound list is matched) the backend supplies it.
//!
//! Column lists and fragments shared by several areas are the macros below:
//! they build constant SQL text with `concat!`, nothing else.

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

/// The ids of every token of the families `$families` (a query of family
/// ids), found through the index on `family_id`. The revocations match
/// their rows by `token_id IN (...)` of this rather than by `family_id IN
/// (...) OR ...`: PostgreSQL cannot use an index for such an `OR` of
/// subqueries and scanned the whole table for every revocation (2 s at
/// 490,000 tokens, the soak's slowdown), and both engines look the ids up
/// in the primary key.
macro_rules! members_of {
    ($families:expr) => {
        concat!(
            "SELECT m.token_id FROM tokens m JOIN (",
            $families,
            ") f ON m.family_id = f.family_id"
        )
    };
}

mod accounts;
mod audit;
mod lookup;
mod retention;
mod revocation;
mod schema;
mod sessions;
mod store;
mod throttle;
mod tokens;

use sqlx::{Pool, Transaction, pool::PoolConnection};

pub(super) use self::{
    accounts::{
        PG_LOCK_ACCOUNT, PG_LOCK_ACCOUNT_FOR_DELETE, PG_LOCK_CREDENTIALS_FOR_DELETE,
        SQLITE_LOCK_ACCOUNT, SQLITE_LOCK_ACCOUNT_FOR_DELETE,
    },
    audit::LIST_EVENTS,
    lookup::{
        PG_SESSIONS_BY_DIGESTS, PG_TOKENS_BY_DIGESTS, SQLITE_SESSIONS_BY_DIGESTS,
        SQLITE_TOKENS_BY_DIGESTS,
    },
    retention::PURGE_TOKENS,
    revocation::{
        PG_LEAK_DESCENDANTS, PG_LEAK_SESSIONS, PG_LEAK_TOKENS, SQLITE_LEAK_DESCENDANTS,
        SQLITE_LEAK_SESSIONS, SQLITE_LEAK_TOKENS,
    },
    sessions::{PG_INSERT_SESSION, SQLITE_INSERT_SESSION},
    tokens::{
        LIST_ALL_TOKENS, LIST_TOKENS, PG_CREATOR_SESSION_LIVE, PG_CREATOR_TOKEN_LIVE,
        PG_PARENT_LIVE, RECORD_USE, SQLITE_CREATOR_SESSION_LIVE, SQLITE_CREATOR_TOKEN_LIVE,
        SQLITE_PARENT_LIVE,
    },
};
use super::{
    PoolUsage, StorageError, Store, TokenFilter, TokenUse, WithAccount,
    backend::{Backend, Exec as _, Query, SqlDatabase as _},
};
use crate::domain::{
    account::{Account, AccountId},
    audit::{AuditEvent, AuditFilter},
    cache::Invalidation,
    credential::Digest,
    password::PasswordHash,
    retention::{PurgeCutoffs, Purged},
    throttle::{ThrottleClaim, ThrottleCounter},
    time::Timestamp,
    token::{Creator, NewToken, Session, Token, TokenId},
};

/// A [`Store`] on the database of backend `B`: its query pool and the
/// backend's own state.
#[derive(Debug)]
pub struct SqlStore<B: Backend> {
    /// The connections queries run on.
    pub(super) pool: Pool<B::Db>,
    /// What the backend keeps beside the pool.
    pub(super) backend: B,
    /// The hot path's lookups by digest, batched on connections of their
    /// own (`lookup`).
    lookups: std::sync::Arc<lookup::Lookups<B>>,
}

// Not derived: a derive would ask for `B::Db: Clone`, which the pool does
// not need.
impl<B: Backend> Clone for SqlStore<B> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            backend: self.backend.clone(),
            lookups: std::sync::Arc::clone(&self.lookups),
        }
    }
}

impl<B: Backend> SqlStore<B> {
    /// A store on `pool`, whose lookups by digest run on
    /// `lookup_connections` connections of their own (0: on the pool).
    pub(super) fn new(pool: Pool<B::Db>, backend: B, lookup_connections: u32) -> Self {
        let lookups = lookup::Lookups::new(pool.clone(), backend.clone(), lookup_connections);
        Self {
            pool,
            backend,
            lookups: std::sync::Arc::new(lookups),
        }
    }

    /// Begins a transaction.
    async fn begin(&self) -> Result<Transaction<'static, B::Db>, StorageError> {
        self.pool.begin().await.map_err(B::classify)
    }

    /// A transaction for statements that walk token families recursively
    /// (revocations and their cascades), with [`Backend::CASCADE_SETTINGS`].
    async fn begin_cascade(&self) -> Result<Transaction<'static, B::Db>, StorageError> {
        let mut tx = self.begin().await?;
        if let Some(settings) = B::CASCADE_SETTINGS {
            fetch_all::<B>(&mut tx, sqlx::query(settings)).await?;
        }
        Ok(tx)
    }

    /// A connection from the pool, for one statement or a few outside a
    /// transaction: what running a statement on the pool itself does.
    async fn conn(&self) -> Result<PoolConnection<B::Db>, StorageError> {
        self.pool.acquire().await.map_err(B::classify)
    }

    /// Runs `query` on the pool and returns the row it finds, if any.
    async fn fetch_optional(
        &self,
        query: Query<'_, B::Db>,
    ) -> Result<Option<B::Row>, StorageError> {
        if B::alone_in_transaction() {
            let mut tx = self.begin().await?;
            let row = fetch_optional::<B>(&mut tx, query).await?;
            tx.commit().await.map_err(B::classify)?;
            return Ok(row);
        }
        let mut conn = self.conn().await?;
        fetch_optional::<B>(&mut conn, query).await
    }

    /// Runs `query` on the pool and returns the rows it finds.
    async fn fetch_all(&self, query: Query<'_, B::Db>) -> Result<Vec<B::Row>, StorageError> {
        if B::alone_in_transaction() {
            let mut tx = self.begin().await?;
            let rows = fetch_all::<B>(&mut tx, query).await?;
            tx.commit().await.map_err(B::classify)?;
            return Ok(rows);
        }
        let mut conn = self.conn().await?;
        fetch_all::<B>(&mut conn, query).await
    }

    /// Runs `query` on the pool and returns how many rows it changed.
    async fn execute(&self, query: Query<'_, B::Db>) -> Result<u64, StorageError> {
        if B::alone_in_transaction() {
            let mut tx = self.begin().await?;
            let changed = execute::<B>(&mut tx, query).await?;
            tx.commit().await.map_err(B::classify)?;
            return Ok(changed);
        }
        let mut conn = self.conn().await?;
        execute::<B>(&mut conn, query).await
    }

    /// A connection that is a session of its own, for what holds a
    /// session-level lock across statements (see
    /// [`Backend::session_pool`]).
    async fn session_conn(&self) -> Result<PoolConnection<B::Db>, StorageError> {
        self.backend
            .session_pool()
            .unwrap_or(&self.pool)
            .acquire()
            .await
            .map_err(B::classify)
    }
}

/// Runs `query` within the caller's transaction and returns how many rows
/// it changed.
async fn execute<B: Backend>(
    conn: &mut B::Connection,
    query: Query<'_, B::Db>,
) -> Result<u64, StorageError> {
    B::statement(query)
        .execute(conn.exec())
        .await
        .map(|done| B::Db::rows_affected(&done))
        .map_err(B::classify)
}

/// Runs `query` within the caller's transaction and returns the row it
/// finds, if any.
async fn fetch_optional<B: Backend>(
    conn: &mut B::Connection,
    query: Query<'_, B::Db>,
) -> Result<Option<B::Row>, StorageError> {
    B::statement(query)
        .fetch_optional(conn.exec())
        .await
        .map_err(B::classify)
}

/// Runs `query` within the caller's transaction and returns the rows it
/// finds.
async fn fetch_all<B: Backend>(
    conn: &mut B::Connection,
    query: Query<'_, B::Db>,
) -> Result<Vec<B::Row>, StorageError> {
    B::statement(query)
        .fetch_all(conn.exec())
        .await
        .map_err(B::classify)
}

/// The end of every audited change, after the caller's statements changed
/// what they did within `tx`: if `changed` names an event and what it
/// changed, appends the event and announces the change to every replica
/// (see [`audit::record`]); then re-reads what the caller returns with
/// `reread`, if any, so that it is what this transaction left; and commits.
/// The event, the announcement and the change take effect together or not
/// at all.
async fn commit_change<B: Backend>(
    backend: &B,
    mut tx: Transaction<'static, B::Db>,
    changed: Option<(&AuditEvent, &Invalidation)>,
    reread: Option<Query<'_, B::Db>>,
) -> Result<Option<B::Row>, StorageError> {
    if let Some((event, what)) = changed {
        audit::record(backend, &mut tx, event, what).await?;
    }
    let row = match reread {
        Some(query) => fetch_optional::<B>(&mut tx, query).await?,
        None => None,
    };
    tx.commit().await.map_err(B::classify)?;
    Ok(row)
}
