//! Storage: the only code that speaks SQL.
//!
//! [`Store`], the one interface the domain uses, is the domain's own port
//! (`crate::domain::store`, re-exported here). One generic store,
//! [`sql::SqlStore`], implements it over a [`backend::Backend`]: the queries
//! and transactions are written once, in [`sql`] and its area modules, and
//! each backend's differences (connection, migrations, error classification,
//! change announcements, the last-use write) are kept in its own module.
//! [`postgres::PgStore`] (the production store) and [`sqlite::SqliteStore`]
//! (the embedded default) are that store on each backend. Both pass the same
//! conformance suite (`tests/integration/storage.rs`).
//!
//! Row types never leave this module: the trait speaks domain types. Database
//! errors are translated here, where the SQL runs: a unique violation becomes
//! [`Conflict`] by constraint name, a lost connection [`StorageError::Unavailable`].

use std::{borrow::Cow, sync::Arc};

mod backend;
pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// The listing statements as the stores run them, by name: one account's
/// tokens, every account's tokens, and audit events. Exposed only for the
/// tests and the benchmark that check their plans with `EXPLAIN` (that a
/// page is an index range scan, whatever its depth); not an interface.
#[doc(hidden)]
pub const LISTING_QUERIES: &[(&str, &str)] = &[
    ("LIST_TOKENS", sql::LIST_TOKENS),
    ("LIST_ALL_TOKENS", sql::LIST_ALL_TOKENS),
    ("LIST_EVENTS", sql::LIST_EVENTS),
];

/// Retention's deletion of dead tokens, as the stores run it (`$1`: the
/// cutoff, `$2`: the batch). Exposed only for the test that checks its plan
/// with `EXPLAIN` (that it reads the table through its partial indexes);
/// not an interface.
#[doc(hidden)]
pub const PURGE_TOKENS_QUERY: &str = sql::PURGE_TOKENS;

pub use crate::domain::store::{
    BoxError, Conflict, PoolUsage, StorageError, Store, TokenFilter, TokenUse, WithAccount,
};

/// Opens the store a URL names (`postgres://…`, `postgresql://…` or
/// `sqlite:…`) and applies its migrations when `migrate` is set.
pub async fn open(
    url: &str,
    options: &PoolOptions,
    migrate: bool,
) -> Result<Arc<dyn Store>, StorageError> {
    let database = Database::connect(url, options).await?;
    database.prepare(migrate).await?;
    Ok(database.store())
}

/// Checks that `url` names a supported backend and can be understood,
/// without connecting or creating anything: exactly the reading
/// [`Database::connect`] makes of it (so a port that is not a number or an
/// unknown `sslmode` is refused here), for checks that must not touch the
/// network, such as `identity config check`.
pub fn check_url(url: &str) -> Result<(), StorageError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        PgStore::connect_options(url).map(drop)
    } else if url.starts_with("sqlite:") {
        SqliteStore::connect_options(url).map(drop)
    } else {
        Err(StorageError::Other(
            "unsupported database URL: expected postgres://, postgresql:// or sqlite:".into(),
        ))
    }
}

/// How far this process's wall clock is from the database server's, as one
/// round trip measured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockOffset {
    /// The database's clock minus this process's, in microseconds:
    /// positive when this process's clock is behind.
    pub offset_micros: i64,
    /// Half the round trip, in microseconds: the true offset is within
    /// this of `offset_micros`.
    pub uncertainty_micros: u64,
}

impl ClockOffset {
    /// The offset in seconds, for the gauge.
    pub fn seconds(&self) -> f64 {
        // Microseconds fit an f64 exactly up to 2^53 (285 years).
        #[allow(clippy::cast_precision_loss)]
        let micros = self.offset_micros as f64;
        micros / 1e6
    }

    /// Whether the offset is certainly more than `bound`: by more than the
    /// measurement's uncertainty, so that a slow round trip alone never
    /// takes a replica out of service.
    pub fn exceeds(&self, bound: std::time::Duration) -> bool {
        let bound = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
        self.offset_micros
            .unsigned_abs()
            .saturating_sub(self.uncertainty_micros)
            > bound
    }
}

/// A store whose pool is set up but whose database may not have been
/// reached yet: [`Database::connect`] opens no connection, so a server can
/// start while its database is down and [`Database::prepare`] it later.
#[derive(Debug, Clone)]
pub enum Database {
    /// PostgreSQL.
    Postgres(PgStore),
    /// SQLite.
    Sqlite(SqliteStore),
}

impl Database {
    /// Sets up the pool for the store a URL names (`postgres://…`,
    /// `postgresql://…` or `sqlite:…`), without connecting. Fails only for
    /// a URL that cannot be understood.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(PgStore::connect(url, options).await?))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(SqliteStore::connect(url, options).await?))
        } else {
            Err(StorageError::Other(
                "unsupported database URL: expected postgres://, postgresql:// or sqlite:".into(),
            ))
        }
    }

    /// Applies pending migrations when `migrate` is set, and otherwise checks
    /// that the schema is the one this build expects. The first call that
    /// needs the database: [`StorageError::Unavailable`] while it cannot be
    /// reached.
    pub async fn prepare(&self, migrate: bool) -> Result<(), StorageError> {
        match (self, migrate) {
            (Self::Postgres(store), true) => store.migrate().await,
            (Self::Postgres(store), false) => store.check_schema(false).await,
            (Self::Sqlite(store), true) => store.migrate_exclusively().await,
            (Self::Sqlite(store), false) => store.check_schema(false).await,
        }
    }

    /// Whether the database holds this service's schema (any of its
    /// migrations applied), creating nothing (a SQLite file that does not
    /// exist is not created): for one-shot commands that must refuse a
    /// database nobody migrated, such as a SQLite path mistyped or relative
    /// to the wrong directory. [`StorageError::Unavailable`] while it
    /// cannot be reached.
    pub async fn has_schema(&self) -> Result<bool, StorageError> {
        match self {
            Self::Postgres(store) => store.schema_applied().await,
            Self::Sqlite(store) => store.has_schema().await,
        }
    }

    /// Measures this process's wall clock against the database's, where
    /// they can differ: on PostgreSQL (each replica has its own clock);
    /// `None` on SQLite, whose database is a file on this machine, read and
    /// written under this machine's one clock.
    pub async fn clock_offset(&self) -> Result<Option<ClockOffset>, StorageError> {
        match self {
            Self::Postgres(store) => store.clock_offset().await.map(Some),
            Self::Sqlite(_) => Ok(None),
        }
    }

    /// The store, as the domain uses it.
    pub fn store(&self) -> Arc<dyn Store> {
        match self {
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite(store) => Arc::new(store.clone()),
        }
    }
}

/// Connection pool settings shared by both backends.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// Most connections held open.
    pub max_connections: u32,
    /// How long a query may wait for a free connection before the call fails
    /// as unavailable.
    pub acquire_timeout: std::time::Duration,
    /// Connections held by the lookups by digest (the cold path), beside
    /// the pool's `max_connections`: each a worker that batches the misses
    /// waiting at the same moment. 0: misses run on the pool.
    pub lookup_connections: u32,
    /// PostgreSQL: whether statements are prepared once per connection and
    /// kept (`IDENTITY_DATABASE_STATEMENT_CACHE`, on by default). Off, for a
    /// pooler in transaction mode (README, "Connection poolers"): every
    /// statement is sent unnamed and, outside a transaction, in one of its
    /// own, so that it never meets a server connection that did not parse it.
    pub statement_cache: bool,
    /// PostgreSQL: the connection the change channel listens on, and that
    /// migrations and the retention lock use (`IDENTITY_DATABASE_LISTEN_URL`):
    /// direct, or through a session-mode pool. `None`: the database URL.
    pub listen_url: Option<SecretUrl>,
    /// PostgreSQL: a hot standby that cache-miss verifications may be read
    /// from (`IDENTITY_DATABASE_READ_URL`), when it has replayed everything
    /// this process knows of (README, "Read replicas"). `None`: every read
    /// goes to the database URL.
    pub read_url: Option<SecretUrl>,
    /// PostgreSQL: how each replica hears the others' changes
    /// (`IDENTITY_CHANGE_FEED`): `LISTEN`/`NOTIFY`, or a table it polls.
    pub change_feed: ChangeFeed,
}

/// How replicas sharing a database hear each other's changes (README,
/// "Change feeds").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeFeed {
    /// `NOTIFY` in the changing transaction, `LISTEN` on a connection of
    /// each replica's own (the default).
    Notify,
    /// A row in the table of changes, written in the changing transaction;
    /// each replica reads the new ones every `interval`
    /// (`postgres/poll.rs`): for engines without `LISTEN`/`NOTIFY`.
    Poll {
        /// How often each replica reads the table.
        interval: std::time::Duration,
    },
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(5),
            lookup_connections: 0,
            statement_cache: true,
            listen_url: None,
            read_url: None,
            change_feed: ChangeFeed::Notify,
        }
    }
}

/// A database URL that may hold a password: its `Debug` shows nothing of it
/// (the binary's settings show the redacted form, `config::redact_url`;
/// storage, an inner layer, does not reach for it).
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL as written, secrets included: for connecting, never for
    /// showing.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretUrl(<redacted>)")
    }
}

/// The versions of a backend's embedded migrations.
fn schema_versions(files: &[(i64, &str, &str)]) -> Vec<i64> {
    files.iter().map(|&(version, _, _)| version).collect()
}

/// Decides whether a database whose applied migrations are `applied` may be
/// served by a build that carries `known` (see `check_schema`).
fn compare_schema(applied: &[i64], known: &[i64], will_migrate: bool) -> Result<(), StorageError> {
    let newest_known = known.iter().copied().max().unwrap_or(0);
    if let Some(unknown) = applied.iter().copied().find(|v| !known.contains(v)) {
        return Err(StorageError::Schema(format!(
            "the database schema is newer than this build: it has migration {unknown}, \
             this build knows migrations up to {newest_known}; run a release that knows it"
        )));
    }
    if !will_migrate && let Some(missing) = known.iter().copied().find(|v| !applied.contains(v)) {
        return Err(StorageError::Schema(format!(
            "the database schema lacks migration {missing} (of {newest_known}); \
             run `identity migrate` first, or start with IDENTITY_MIGRATE=true"
        )));
    }
    Ok(())
}

/// Builds a migrator from SQL files embedded in the binary. Migrations are
/// append-only: a released file is never edited, only followed by a new one.
fn migrator(files: &'static [(i64, &'static str, &'static str)]) -> sqlx::migrate::Migrator {
    let migrations = files
        .iter()
        .map(|&(version, description, sql)| {
            sqlx::migrate::Migration::new(
                version,
                Cow::Borrowed(description),
                sqlx::migrate::MigrationType::Simple,
                Cow::Borrowed(sql),
                false,
            )
        })
        .collect::<Vec<_>>();
    sqlx::migrate::Migrator {
        migrations: Cow::Owned(migrations),
        ..sqlx::migrate::Migrator::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schema_is_served_only_when_this_build_knows_all_of_it() {
        let known = [1, 2, 3];
        assert!(compare_schema(&[1, 2, 3], &known, false).is_ok());
        assert!(compare_schema(&[1, 2], &known, true).is_ok());
        assert!(compare_schema(&[], &known, true).is_ok());
        let behind = compare_schema(&[1, 2], &known, false).unwrap_err();
        assert!(behind.to_string().contains("identity migrate"), "{behind}");
        for will_migrate in [false, true] {
            let newer = compare_schema(&[1, 2, 3, 4], &known, will_migrate).unwrap_err();
            assert!(
                newer.to_string().contains("newer than this build"),
                "{newer}"
            );
        }
    }
}
