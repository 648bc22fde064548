//! The production store: PostgreSQL through a sqlx connection pool.
//!
//! Many stateless replicas share one database. Migrations take an advisory
//! lock, so replicas that start together apply them once.
//!
//! The database URL may name a pooler in transaction mode (PgBouncer), with
//! the statement cache off (`PoolOptions::statement_cache`): statements are
//! then sent unnamed, each outside a transaction in one of its own, and
//! whatever needs a session of its own (`LISTEN`, the migrations' and the
//! retention's advisory locks) uses the listen URL instead.

use std::{
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::ConnectOptions as _;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

mod feed;
mod poll;

use feed::CHANNEL;

mod replica;

pub use replica::{Ticket, Watermark};

use super::{
    ChangeFeed, ClockOffset, Conflict, PoolOptions, StorageError, TokenUse,
    backend::{Backend, Query},
    sql::{self, SqlStore},
};
use crate::domain::{
    cache::{Invalidation, InvalidationSink},
    credential::Digest,
    time::Timestamp,
    token::TokenId,
};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "lifecycle",
        include_str!("../../../migrations/postgres/0002_lifecycle.sql"),
    ),
    (
        3,
        "tokens fillfactor",
        include_str!("../../../migrations/postgres/0003_tokens_fillfactor.sql"),
    ),
    (
        4,
        "sign-in throttle",
        include_str!("../../../migrations/postgres/0004_sign_in_throttle.sql"),
    ),
    (
        5,
        "token parent",
        include_str!("../../../migrations/postgres/0005_token_parent.sql"),
    ),
    (
        6,
        "retention indexes",
        include_str!("../../../migrations/postgres/0006_retention.sql"),
    ),
    (
        7,
        "rotation grace deadline",
        include_str!("../../../migrations/postgres/0007_retire_time.sql"),
    ),
    (
        8,
        "credentials generation",
        include_str!("../../../migrations/postgres/0008_credentials_generation.sql"),
    ),
    (
        9,
        "fleet views",
        include_str!("../../../migrations/postgres/0009_fleet_views.sql"),
    ),
    (
        10,
        "sign-in count start",
        include_str!("../../../migrations/postgres/0010_sign_in_count_since.sql"),
    ),
    (
        11,
        "token resources",
        include_str!("../../../migrations/postgres/0011_token_resources.sql"),
    ),
    (
        12,
        "live token count index",
        include_str!("../../../migrations/postgres/0012_tokens_live_count_idx.sql"),
    ),
    (
        13,
        "change feed table",
        include_str!("../../../migrations/postgres/0013_change_feed.sql"),
    ),
    (
        14,
        "HOT last-use writes",
        include_str!("../../../migrations/postgres/0014_hot_last_use.sql"),
    ),
];

/// A [`super::Store`] on PostgreSQL.
pub type PgStore = SqlStore<PgBackend>;

/// What the PostgreSQL store keeps beside its query pool.
#[derive(Debug, Clone)]
pub struct PgBackend {
    /// One connection of its own for `LISTEN`, outside `pool`: a listener
    /// holds its connection for good, and taken from `pool` it would leave
    /// one connection fewer for queries than configured (none at all with
    /// `IDENTITY_DB_MAX_CONNECTIONS=1`). On the listen URL.
    listen_pool: PgPool,
    /// One more connection on the listen URL, when there is one, for the
    /// migrations and the retention purge, which hold advisory locks of
    /// their session across statements and transactions.
    session_pool: Option<PgPool>,
    /// When the database was last seen to drop connections.
    losses: Arc<ConnectionLosses>,
    /// The hot standby cache-miss verifications may be read from, and the
    /// watermark it is held to (`replica.rs`), when there is one.
    replica: Option<Arc<replica::Replica>>,
    /// How changes are announced and heard: `NOTIFY`/`LISTEN` (`feed.rs`)
    /// or the table of changes, polled (`poll.rs`).
    change_feed: ChangeFeed,
}

/// When the change channel's connection was last lost, which (whatever
/// else it means) is when the database last dropped its connections: a
/// restart, a failover, a network cut. Idle connections opened before then
/// are presumed dead and replaced when next acquired, so that once the
/// database is back no call fails on a connection that died while it was
/// away. The check is a clock comparison, not a ping: the hot path pays
/// nothing for it. Each loss also wakes the health watcher
/// ([`PgStore::connection_lost`]), so that health follows a failover at
/// once rather than at its next probe.
#[derive(Debug)]
struct ConnectionLosses {
    origin: std::time::Instant,
    /// Microseconds from `origin` to the last loss, plus one; 0 for never.
    last: AtomicU64,
    /// Woken (one waiter, or the next one) by each loss.
    lost: tokio::sync::Notify,
}

impl ConnectionLosses {
    fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
            last: AtomicU64::new(0),
            lost: tokio::sync::Notify::new(),
        }
    }

    /// Records a loss now.
    fn record(&self) {
        let now = micros(self.origin.elapsed()).saturating_add(1);
        self.last.store(now, Ordering::Release);
        self.lost.notify_one();
    }

    /// Whether a connection opened `age` ago was opened before (or at) the
    /// last loss.
    fn predates_last_loss(&self, age: Duration) -> bool {
        let last = self.last.load(Ordering::Acquire);
        let opened = micros(self.origin.elapsed().saturating_sub(age));
        last != 0 && opened < last
    }
}

/// When a query last failed in a way that means its server is gone or is
/// no longer the primary (see [`classify`]): the server shutting down
/// (57P01–57P03), a connection exception (class 08, or a connection that
/// broke under a query), or a write refused in a read-only transaction
/// (25006), which is what a demoted primary, now a standby, answers. Idle
/// connections opened before then are replaced when next acquired, as
/// after a loss of the change channel, so that they reconnect to wherever
/// the database URL now leads (a proxy that follows the primary) instead
/// of each failing on the old server. Process-wide because errors are
/// classified without the store (`Backend::classify` has no receiver): a
/// second store of the process then replaces its idle connections
/// needlessly, never wrongly. (Only the change channel's own losses wake
/// the health watcher: a standby behind the URL answers its probes, and
/// each refused write would otherwise set off one more probe.)
static ERROR_LOSSES: std::sync::LazyLock<ConnectionLosses> =
    std::sync::LazyLock::new(ConnectionLosses::new);

/// Whether statements are sent unnamed, each outside a transaction in one of
/// its own: set once any store of this process is opened with its statement
/// cache off, and never cleared. Process-wide, because the generic store's
/// statements are sent from functions that see a connection, not the store;
/// one store without the cache makes every other store of the process slower
/// (each statement parsed anew), never wrong.
static STATEMENT_CACHE_OFF: AtomicBool = AtomicBool::new(false);

fn statement_cache_off() -> bool {
    STATEMENT_CACHE_OFF.load(Ordering::Relaxed)
}

/// Runs `query` on `pool` on its own, in a transaction of its own when the
/// statement cache is off (see [`STATEMENT_CACHE_OFF`]).
async fn execute_alone(
    pool: &PgPool,
    query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
) -> Result<(), sqlx::Error> {
    if statement_cache_off() {
        let mut tx = pool.begin().await?;
        query.persistent(false).execute(&mut *tx).await?;
        tx.commit().await
    } else {
        query.execute(pool).await.map(drop)
    }
}

/// The database server's `clock_timestamp()` in microseconds.
const CLOCK_NOW: &str = "SELECT CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)";

/// Reads [`CLOCK_NOW`] on `conn` in one simple-protocol exchange (it has no
/// parameters): one round trip, with or without the statement cache, which
/// a transaction-mode pooler passes whole.
async fn database_clock<'c>(conn: impl sqlx::PgExecutor<'c>) -> Result<i64, sqlx::Error> {
    use sqlx::Row as _;
    conn.fetch_one(CLOCK_NOW).await?.try_get(0)
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

impl PgStore {
    /// Prepares a pool for `url`. Connections are opened lazily (the first
    /// query opens one, and a lost one is replaced the same way); a
    /// malformed URL fails here.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let mut connect = Self::connect_options(url)?;
        let listen = match &options.listen_url {
            Some(listen_url) => Some(Self::connect_options(listen_url.expose())?),
            None => None,
        };
        if !options.statement_cache {
            connect = connect.statement_cache_capacity(0);
            STATEMENT_CACHE_OFF.store(true, Ordering::Relaxed);
        }
        let losses = Arc::new(ConnectionLosses::new());
        let fresh = Arc::clone(&losses);
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping before each query: it would double the round trips of
            // the hot path. A dead connection fails its query, which is
            // reported as unavailable, and the pool replaces it; those
            // opened before the database last dropped connections are
            // replaced before they can fail a query.
            .test_before_acquire(false)
            .before_acquire(move |_, meta| {
                let usable = !fresh.predates_last_loss(meta.age)
                    && !ERROR_LOSSES.predates_last_loss(meta.age);
                Box::pin(async move { Ok(usable) })
            })
            .connect_lazy_with(connect.clone());
        let session_pool = listen.as_ref().map(|listen| {
            PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(listen.clone())
        });
        let listen_pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(options.acquire_timeout)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with(listen.unwrap_or(connect));
        // The standby: as many connections as the primary's pool, opened
        // lazily; a standby that is down fails its reads, which go to the
        // primary instead.
        let replica = match &options.read_url {
            Some(read_url) => Some(Arc::new(replica::Replica {
                pool: PgPoolOptions::new()
                    .max_connections(options.max_connections)
                    .acquire_timeout(
                        options
                            .acquire_timeout
                            .min(replica::REPLICA_ACQUIRE_TIMEOUT),
                    )
                    .test_before_acquire(false)
                    // Its lookups bind the digest, but sqlx's statement
                    // log has nothing to add for them: off, at any level
                    // or speed.
                    .connect_lazy_with(
                        Self::connect_options(read_url.expose())?.disable_statement_logging(),
                    ),
                watermark: Arc::new(Watermark::new()),
                origin: std::time::Instant::now(),
                down_until: AtomicU64::new(0),
            })),
            None => None,
        };
        Ok(Self::new(
            pool,
            PgBackend {
                listen_pool,
                session_pool,
                losses,
                replica,
                change_feed: options.change_feed,
            },
            options.lookup_connections,
        ))
    }

    /// Returns once this store's change channel has lost its connection (at
    /// once if it did since the last call returned): the database dropped
    /// its connections, so the health watcher should probe it now.
    pub async fn connection_lost(&self) {
        self.backend.losses.lost.notified().await;
    }

    /// The connection options `url` gives, or why it cannot be used (a
    /// port that is not a number, an unknown `sslmode`): the one reading
    /// of the URL, shared by [`Self::connect`] and [`super::check_url`].
    pub(super) fn connect_options(url: &str) -> Result<PgConnectOptions, StorageError> {
        PgConnectOptions::from_str(&known_parameters_only(url))
            .map_err(|e| StorageError::Other(Box::new(e)))
    }
}

/// Translates a sqlx error by SQLSTATE and constraint name.
fn classify(err: sqlx::Error) -> StorageError {
    if matches!(err, sqlx::Error::PoolTimedOut) {
        metrics::counter!("identity_db_pool_timeouts_total").increment(1);
    }
    match &err {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if code == "23505" {
                let conflict = match db.constraint() {
                    Some("accounts_username_key_unique") => Some(Conflict::Username),
                    Some("tokens_live_name_unique") => Some(Conflict::TokenName),
                    Some("tokens_digest_unique" | "sessions_digest_unique") => {
                        Some(Conflict::Digest)
                    }
                    Some("accounts_pkey" | "tokens_pkey" | "sessions_pkey") => Some(Conflict::Id),
                    _ => None,
                };
                if let Some(conflict) = conflict {
                    return StorageError::Conflict(conflict);
                }
            }
            // A foreign-key violation: every foreign key names an
            // account, which was deleted under a creation that did not
            // lock it first (the creations that can race a deletion
            // do lock it; this is the backstop).
            if code == "23503" {
                return StorageError::AccountGone;
            }
            // A prepared statement missing, or already there, on the
            // server connection: what a pooler in transaction mode does to
            // a statement cache (README, "Connection poolers").
            if code == "26000" || code == "42P05" {
                tracing::warn!(
                    sqlstate = code.as_ref(),
                    "a prepared statement is missing or already exists on the database \
                     connection: if DATABASE_URL is a pooler in transaction mode, set \
                     IDENTITY_DATABASE_STATEMENT_CACHE=off and IDENTITY_DATABASE_LISTEN_URL"
                );
            }
            // Class 08: connection exceptions; 57P0x: the server is
            // shutting down or restarting; 25006: a write in a read-only
            // transaction, the answer of a primary demoted to a standby
            // (during a failover, until the proxy in front follows the new
            // primary). Each means the connections to that server are of
            // no more use: a loss ([`ERROR_LOSSES`]).
            let lost = code.starts_with("08") || code.starts_with("57P0") || code == "25006";
            if lost {
                ERROR_LOSSES.record();
            }
            // And unavailable, as are 53: insufficient resources; 40001
            // and 40P01: serialization failure and deadlock, both
            // retryable.
            if lost || code.starts_with("53") || code == "40001" || code == "40P01" {
                StorageError::Unavailable(Box::new(err))
            } else {
                StorageError::Other(Box::new(err))
            }
        }
        sqlx::Error::Io(_) => {
            // The connection broke (reset, closed): as class 08.
            ERROR_LOSSES.record();
            StorageError::Unavailable(Box::new(err))
        }
        sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StorageError::Unavailable(Box::new(err)),
        _ => StorageError::Other(Box::new(err)),
    }
}

/// The query parameters sqlx understands in a PostgreSQL URL.
const KNOWN_URL_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url` without the query parameters sqlx does not understand, each
/// reported by name. sqlx ignores them too, but logs each with its value,
/// which for `sslpassword` (the passphrase of an encrypted client key,
/// which sqlx cannot use) or a mistyped `password` is a secret.
fn known_parameters_only(url: &str) -> String {
    let (before_fragment, fragment) = url.split_at(url.find('#').unwrap_or(url.len()));
    let Some((base, query)) = before_fragment.split_once('?') else {
        return url.to_owned();
    };
    let (known, unknown): (Vec<&str>, Vec<&str>) = query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .partition(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(key, _)| key);
            KNOWN_URL_PARAMETERS.contains(&key)
                || (key.starts_with("options[") && key.ends_with(']'))
        });
    for pair in unknown {
        let key = pair.split_once('=').map_or("", |(key, _)| key);
        // A name that is not a plain word may be a pasted secret: not shown.
        let shown = if !key.is_empty()
            && key.len() <= 32
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            key
        } else {
            "(not shown)"
        };
        tracing::warn!(
            parameter = shown,
            "ignoring a DATABASE_URL query parameter the PostgreSQL driver does not support"
        );
    }
    if known.is_empty() {
        format!("{base}{fragment}")
    } else {
        format!("{base}?{}{fragment}", known.join("&"))
    }
}

/// Whether the migrations table exists (it does once anything was migrated).
const SCHEMA_TABLE_EXISTS: &str = "SELECT count(*) FROM pg_catalog.pg_tables \
     WHERE tablename = '_sqlx_migrations' AND schemaname = current_schema()";

/// Records a batch of uses in one statement. The rows are locked first, in
/// `token_id` order: replicas flush the uses they saw in arrival order, and
/// two batches locking the same rows in different orders deadlock
/// (PostgreSQL then aborts one after `deadlock_timeout`, and a revocation of
/// those tokens waits meanwhile). A row is only updated once the
/// materialised, ordered `locked` has locked it.
const RECORD_USES: &str = "WITH u AS (\
        SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[]) AS u(token_id, at, address)), \
    locked AS MATERIALIZED (\
        SELECT t.token_id FROM tokens t JOIN u ON u.token_id = t.token_id \
        WHERE t.last_used_time IS NULL OR t.last_used_time <= u.at - $4 \
        ORDER BY t.token_id FOR UPDATE OF t) \
    UPDATE tokens t SET last_used_time = u.at, last_used_address = u.address \
    FROM u WHERE t.token_id = u.token_id AND t.token_id IN (SELECT token_id FROM locked) \
    AND (t.last_used_time IS NULL OR t.last_used_time <= u.at - $4)";

/// The advisory lock key under which one replica at a time purges (any
/// fixed number; migrations use sqlx's own key).
const RETENTION_LOCK: i64 = 0x6964_5f72_6574_6e31; // "id_retn1"

impl Backend for PgBackend {
    type Db = sqlx::Postgres;
    type Connection = sqlx::PgConnection;
    type Row = sqlx::postgres::PgRow;
    type Arguments<'q> = sqlx::postgres::PgArguments;

    /// Many replicas share one database.
    const SHARED: bool = true;
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = MIGRATIONS;
    const SCHEMA_TABLE_EXISTS: &'static str = SCHEMA_TABLE_EXISTS;
    const INSERT_SESSION: &'static str = sql::PG_INSERT_SESSION;
    const LOCK_ACCOUNT: &'static str = sql::PG_LOCK_ACCOUNT;
    const LOCK_ACCOUNT_FOR_DELETE: &'static str = sql::PG_LOCK_ACCOUNT_FOR_DELETE;
    const LOCK_CREDENTIALS_FOR_DELETE: &'static [&'static str] =
        sql::PG_LOCK_CREDENTIALS_FOR_DELETE;
    const PARENT_LIVE: &'static str = sql::PG_PARENT_LIVE;
    /// A standby (`DATABASE_URL` pointed at one, or at a demoted primary
    /// through a proxy that has not moved yet) answers 0: every write would
    /// fail, so health says NOT_SERVING.
    const PING: &'static str =
        "SELECT CAST(CASE WHEN pg_is_in_recovery() THEN 0 ELSE 1 END AS BIGINT)";
    /// Index scans, nested loops and no JIT for the cascades. The planner
    /// cannot estimate a recursive walk of the families (it guessed 43
    /// million rows for one token with no descendant), so it chose
    /// sequential scans, sorts and merge joins of the whole table, and a
    /// cost far above `jit_above_cost`: each revocation was compiled with
    /// LLVM and then read every token, 0.3 s at 10,000 tokens on a busy
    /// machine, and the soak's 120 revocations a second took both cores
    /// (BENCHMARKS.md, "The soak's collapse"). With these, a revocation
    /// reads the indexes of the tokens it revokes and nothing else. And
    /// the smallest `work_mem`: the walk's `UNION` builds its hash table at
    /// the size of that same estimate, capped by the memory allowed (twice
    /// `work_mem`, 8 MiB by default), and zeroed it on every execution:
    /// `memset` was 8 % of PostgreSQL's time in the soak. The table still
    /// grows as a walk finds more families. `SET LOCAL`: they end with the
    /// transaction, behind a pooler too.
    const CASCADE_SETTINGS: Option<&'static str> = Some(
        "SELECT set_config('jit', 'off', true), set_config('enable_seqscan', 'off', true), \
         set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true), \
         set_config('work_mem', '64kB', true)",
    );
    const CREATOR_SESSION_LIVE: &'static str = sql::PG_CREATOR_SESSION_LIVE;
    const CREATOR_TOKEN_LIVE: &'static str = sql::PG_CREATOR_TOKEN_LIVE;
    const LEAK_TOKENS: &'static str = sql::PG_LEAK_TOKENS;
    const LEAK_SESSIONS: &'static str = sql::PG_LEAK_SESSIONS;
    const LEAK_DESCENDANTS: &'static str = sql::PG_LEAK_DESCENDANTS;
    const TOKENS_BY_DIGESTS: &'static str = sql::PG_TOKENS_BY_DIGESTS;
    const SESSIONS_BY_DIGESTS: &'static str = sql::PG_SESSIONS_BY_DIGESTS;
    const PURGE_CHANGES: Option<(&'static str, Duration)> =
        Some((poll::PURGE_CHANGES, poll::CHANGES_KEPT));

    fn classify(err: sqlx::Error) -> StorageError {
        classify(err)
    }

    /// The check the pool's `before_acquire` makes.
    fn predates_loss(&self, age: Duration) -> bool {
        self.losses.predates_last_loss(age) || ERROR_LOSSES.predates_last_loss(age)
    }

    /// Announces a change to every replica, delivered when (and only if)
    /// the caller's transaction commits.
    async fn announce(
        &self,
        conn: &mut sqlx::PgConnection,
        what: &Invalidation,
    ) -> Result<(), StorageError> {
        if let ChangeFeed::Poll { .. } = self.change_feed {
            return poll::record(conn, what).await;
        }
        let payload = match what {
            Invalidation::Credential(id) => format!("credential:{}", id.as_str()),
            Invalidation::Account(id) => format!("account:{}", id.as_str()),
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(payload)
            .persistent(!statement_cache_off())
            .execute(conn)
            .await
            .map(drop)
            .map_err(Self::classify)
    }

    /// Announces that each of `ids` was revoked, in one statement, with
    /// the caller's transaction (as [`Self::announce`]).
    async fn announce_credentials(
        &self,
        conn: &mut sqlx::PgConnection,
        ids: &[TokenId],
    ) -> Result<(), StorageError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = ids.iter().map(TokenId::as_str).collect();
        if let ChangeFeed::Poll { .. } = self.change_feed {
            return poll::record_credentials(conn, &ids).await;
        }
        sqlx::query("SELECT pg_notify($1, 'credential:' || id) FROM unnest($2::text[]) AS u(id)")
            .bind(CHANNEL)
            .bind(ids)
            .persistent(!statement_cache_off())
            .execute(conn)
            .await
            .map(drop)
            .map_err(Self::classify)
    }

    /// Digests as `LEAK_TOKENS` and `LEAK_SESSIONS` bind them: a `BYTEA[]`.
    fn bind_digests<'q>(
        query: Query<'q, sqlx::Postgres>,
        digests: &[Digest],
    ) -> Query<'q, sqlx::Postgres> {
        query.bind(
            digests
                .iter()
                .map(|d| d.as_bytes().to_vec())
                .collect::<Vec<_>>(),
        )
    }

    /// Listens for announcements and hands them to `sink`: the change
    /// feed (`postgres/feed.rs`).
    fn watch_changes(&self, pool: &PgPool, sink: std::sync::Arc<dyn InvalidationSink>) {
        match self.change_feed {
            ChangeFeed::Notify => self.run_change_feed(pool, sink),
            ChangeFeed::Poll { interval } => self.run_poll_feed(sink, interval),
        }
    }

    async fn write_uses(
        &self,
        pool: &PgPool,
        uses: &[TokenUse],
        interval_micros: i64,
    ) -> Result<(), StorageError> {
        let ids: Vec<&str> = uses.iter().map(|u| u.id.as_str()).collect();
        let times: Vec<i64> = uses.iter().map(|u| u.at.as_micros()).collect();
        let addresses: Vec<&str> = uses.iter().map(|u| u.address.as_str()).collect();
        let query = sqlx::query(RECORD_USES)
            .bind(ids)
            .bind(times)
            .bind(addresses)
            .bind(interval_micros);
        execute_alone(pool, query).await.map_err(Self::classify)
    }

    /// Takes the retention lock on `conn` if no other session holds it.
    async fn lock_retention(conn: &mut sqlx::PgConnection) -> Result<bool, StorageError> {
        sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(RETENTION_LOCK)
            .persistent(!statement_cache_off())
            .fetch_one(conn)
            .await
            .map_err(Self::classify)
    }

    /// Releases the retention lock held on `conn`.
    async fn unlock_retention(conn: &mut sqlx::PgConnection) -> Result<(), StorageError> {
        let released: bool = sqlx::query_scalar("SELECT pg_advisory_unlock($1)")
            .bind(RETENTION_LOCK)
            .persistent(!statement_cache_off())
            .fetch_one(conn)
            .await
            .map_err(Self::classify)?;
        if released {
            Ok(())
        } else {
            Err(StorageError::Other(
                "the retention lock was not held".into(),
            ))
        }
    }

    /// The database server's `clock_timestamp()`.
    async fn clock(&self, pool: &PgPool) -> Result<Timestamp, StorageError> {
        let database = database_clock(pool).await.map_err(Self::classify)?;
        Ok(Timestamp::from_micros(database))
    }

    fn statement(
        query: sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
        if statement_cache_off() {
            query.persistent(false)
        } else {
            query
        }
    }

    fn alone_in_transaction() -> bool {
        statement_cache_off()
    }

    fn session_pool(&self) -> Option<&PgPool> {
        self.session_pool.as_ref()
    }

    async fn replica_lookup(
        &self,
        statement: &'static str,
        digest: &Digest,
        use_count: Option<&'static str>,
    ) -> Option<Vec<sqlx::postgres::PgRow>> {
        use super::rows::SqlRow as _;
        let rows = self.replica_rows(statement, digest).await?;
        let outcome = match rows.first() {
            None => replica::Outcome::Absent,
            Some(row) if use_count.is_some_and(|c| !matches!(row.opt_int(c), Ok(None))) => {
                replica::Outcome::Limited
            }
            Some(_) => replica::Outcome::Served,
        };
        outcome.count();
        matches!(outcome, replica::Outcome::Served).then_some(rows)
    }

    async fn wrote(&self, pool: &PgPool) {
        PgBackend::wrote(self, pool).await;
    }
}
