//! The embedded default store: SQLite in a local file, so that `cargo run`
//! works with nothing else installed.
//!
//! The database runs in WAL mode with a busy timeout, so readers never block
//! and writers queue briefly instead of failing. It serves one process: run
//! several replicas on PostgreSQL instead.

use std::{str::FromStr as _, time::Duration};

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

use super::{
    Conflict, PoolOptions, StorageError, TokenUse,
    backend::{Backend, Query},
    sql::{self, SqlStore},
};
use crate::domain::{
    cache::{Invalidation, InvalidationSink},
    credential::Digest,
    time::Timestamp,
    token::TokenId,
};

/// Whether the migrations table exists (it does once anything was migrated).
const SCHEMA_TABLE_EXISTS: &str =
    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'";

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/sqlite/0001_initial.sql"),
    ),
    (
        2,
        "lifecycle",
        include_str!("../../migrations/sqlite/0002_lifecycle.sql"),
    ),
    (
        3,
        "sign-in throttle",
        include_str!("../../migrations/sqlite/0003_sign_in_throttle.sql"),
    ),
    (
        4,
        "token parent",
        include_str!("../../migrations/sqlite/0004_token_parent.sql"),
    ),
    (
        5,
        "retention indexes",
        include_str!("../../migrations/sqlite/0005_retention.sql"),
    ),
    (
        6,
        "rotation grace deadline",
        include_str!("../../migrations/sqlite/0006_retire_time.sql"),
    ),
    (
        7,
        "credentials generation",
        include_str!("../../migrations/sqlite/0007_credentials_generation.sql"),
    ),
    (
        8,
        "fleet views",
        include_str!("../../migrations/sqlite/0008_fleet_views.sql"),
    ),
    (
        9,
        "sign-in count start",
        include_str!("../../migrations/sqlite/0009_sign_in_count_since.sql"),
    ),
    (
        10,
        "token resources",
        include_str!("../../migrations/sqlite/0010_token_resources.sql"),
    ),
    (
        11,
        "live token count index",
        include_str!("../../migrations/sqlite/0011_tokens_live_count_idx.sql"),
    ),
];

/// A [`super::Store`] on SQLite.
pub type SqliteStore = SqlStore<SqliteBackend>;

/// What the SQLite store keeps beside its query pool.
#[derive(Debug, Clone)]
pub struct SqliteBackend {
    /// The database file (`:memory:` for an in-memory database).
    file: std::path::PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database file `url` names, such as
    /// `sqlite:identity.db`.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let connect = Self::connect_options(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // FULL: in WAL mode NORMAL syncs only at checkpoints, so a power
            // loss can undo a commit already acknowledged (a revocation the
            // caller was told had happened). FULL syncs the WAL at every
            // commit, at the cost of one fsync per write transaction.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let file = connect.get_filename().to_path_buf();
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            // No ping before each query: it would double the round trips of
            // the hot path. A dead connection fails its query, which is
            // reported as unavailable, and the pool replaces it.
            .test_before_acquire(false)
            .connect_lazy_with(connect);
        Ok(Self::new(
            pool,
            SqliteBackend { file },
            options.lookup_connections,
        ))
    }

    /// The connection options `url` gives, or why it cannot be used: the
    /// one reading of the URL, shared by [`Self::connect`] and
    /// [`super::check_url`].
    pub(super) fn connect_options(url: &str) -> Result<SqliteConnectOptions, StorageError> {
        SqliteConnectOptions::from_str(url).map_err(|e| StorageError::Other(Box::new(e)))
    }

    /// Whether the database holds this service's schema (any of its
    /// migrations applied), creating nothing: a file that does not exist
    /// has none, and is not created to find out.
    pub async fn has_schema(&self) -> Result<bool, StorageError> {
        let file = &self.backend.file;
        let in_memory = file.as_os_str().is_empty() || file.as_os_str() == ":memory:";
        if !in_memory && !file.exists() {
            return Ok(false);
        }
        self.schema_applied().await
    }
}

impl Backend for SqliteBackend {
    type Db = sqlx::Sqlite;
    type Connection = sqlx::SqliteConnection;
    type Row = sqlx::sqlite::SqliteRow;
    type Arguments<'q> = sqlx::sqlite::SqliteArguments<'q>;

    /// One process owns a SQLite file, so nothing changes behind a cache's
    /// back.
    const SHARED: bool = false;
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)] = MIGRATIONS;
    const SCHEMA_TABLE_EXISTS: &'static str = SCHEMA_TABLE_EXISTS;
    const INSERT_SESSION: &'static str = sql::SQLITE_INSERT_SESSION;
    const LOCK_ACCOUNT: &'static str = sql::SQLITE_LOCK_ACCOUNT;
    const LOCK_ACCOUNT_FOR_DELETE: &'static str = sql::SQLITE_LOCK_ACCOUNT_FOR_DELETE;
    const PARENT_LIVE: &'static str = sql::SQLITE_PARENT_LIVE;
    const PING: &'static str = "SELECT 1";
    const CREATOR_SESSION_LIVE: &'static str = sql::SQLITE_CREATOR_SESSION_LIVE;
    const CREATOR_TOKEN_LIVE: &'static str = sql::SQLITE_CREATOR_TOKEN_LIVE;
    const LEAK_TOKENS: &'static str = sql::SQLITE_LEAK_TOKENS;
    const LEAK_SESSIONS: &'static str = sql::SQLITE_LEAK_SESSIONS;
    const LEAK_DESCENDANTS: &'static str = sql::SQLITE_LEAK_DESCENDANTS;
    const TOKENS_BY_DIGESTS: &'static str = sql::SQLITE_TOKENS_BY_DIGESTS;
    const SESSIONS_BY_DIGESTS: &'static str = sql::SQLITE_SESSIONS_BY_DIGESTS;

    /// A local file's connections are not lost with a server.
    fn predates_loss(&self, _age: Duration) -> bool {
        false
    }

    /// Translates a sqlx error. SQLite does not report constraint names, so
    /// unique violations are recognised by the columns its message names.
    fn classify(err: sqlx::Error) -> StorageError {
        if matches!(err, sqlx::Error::PoolTimedOut) {
            metrics::counter!("identity_db_pool_timeouts_total").increment(1);
        }
        match &err {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // 2067: SQLITE_CONSTRAINT_UNIQUE; 1555: SQLITE_CONSTRAINT_PRIMARYKEY.
                if code == "2067" || code == "1555" {
                    let message = db.message();
                    let conflict = if message.contains("accounts.username_key") {
                        Some(Conflict::Username)
                    } else if message.contains("tokens.live_name") {
                        Some(Conflict::TokenName)
                    } else if message.contains(".digest") {
                        Some(Conflict::Digest)
                    } else if code == "1555" {
                        Some(Conflict::Id)
                    } else {
                        None
                    };
                    if let Some(conflict) = conflict {
                        return StorageError::Conflict(conflict);
                    }
                }
                // 787: SQLITE_CONSTRAINT_FOREIGNKEY. Every foreign key names
                // an account, deleted under the creation (a backstop: the
                // write lock makes that race impossible here).
                if code == "787" {
                    return StorageError::AccountGone;
                }
                // With their extended codes: SQLITE_BUSY (5) and
                // SQLITE_LOCKED (6), another writer held the database past
                // the timeout; SQLITE_NOMEM (7), SQLITE_READONLY (8, such as
                // a file system remounted read-only), SQLITE_IOERR (10),
                // SQLITE_FULL (13, the disk is full) and SQLITE_CANTOPEN (14):
                // the machine cannot serve the file right now, as PostgreSQL's
                // classes 08 and 53 say. Corruption stays a bug.
                let primary = code.parse::<i32>().map(|c| c & 0xff).unwrap_or(0);
                if matches!(primary, 5 | 6 | 7 | 8 | 10 | 13 | 14) {
                    StorageError::Unavailable(Box::new(err))
                } else {
                    StorageError::Other(Box::new(err))
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StorageError::Unavailable(Box::new(err)),
            _ => StorageError::Other(Box::new(err)),
        }
    }

    /// Nothing to announce: no other replica can be listening.
    async fn announce(
        &self,
        _conn: &mut sqlx::SqliteConnection,
        _what: &Invalidation,
    ) -> Result<(), StorageError> {
        Ok(())
    }

    /// Nothing to announce: no other replica can be listening.
    async fn announce_credentials(
        &self,
        _conn: &mut sqlx::SqliteConnection,
        _ids: &[TokenId],
    ) -> Result<(), StorageError> {
        Ok(())
    }

    /// Digests as `LEAK_TOKENS` and `LEAK_SESSIONS` bind them: SQLite binds
    /// no arrays, so a JSON array of lowercase hex strings.
    fn bind_digests<'q>(
        query: Query<'q, sqlx::Sqlite>,
        digests: &[Digest],
    ) -> Query<'q, sqlx::Sqlite> {
        use std::fmt::Write as _;
        let mut json = String::with_capacity(2 + digests.len() * 67);
        json.push('[');
        for (i, digest) in digests.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push('"');
            for byte in digest.as_bytes() {
                let _ = write!(json, "{byte:02x}");
            }
            json.push('"');
        }
        json.push(']');
        query.bind(json)
    }

    /// Nothing to watch.
    fn watch_changes(&self, _pool: &SqlitePool, _sink: std::sync::Arc<dyn InvalidationSink>) {}

    /// Records a batch of uses in one transaction (one statement each: SQLite
    /// has no arrays to bind).
    async fn write_uses(
        &self,
        pool: &SqlitePool,
        uses: &[TokenUse],
        interval_micros: i64,
    ) -> Result<(), StorageError> {
        let mut tx = pool.begin().await.map_err(Self::classify)?;
        for token_use in uses {
            sqlx::query(sql::RECORD_USE)
                .bind(token_use.id.as_str())
                .bind(token_use.at.as_micros())
                .bind(token_use.address.as_str())
                .bind(interval_micros)
                .execute(&mut *tx)
                .await
                .map_err(Self::classify)?;
        }
        tx.commit().await.map_err(Self::classify)
    }

    /// One process owns the file: its single retention task needs no lock.
    async fn lock_retention(_conn: &mut sqlx::SqliteConnection) -> Result<bool, StorageError> {
        Ok(true)
    }

    /// Nothing to release.
    async fn unlock_retention(_conn: &mut sqlx::SqliteConnection) -> Result<(), StorageError> {
        Ok(())
    }

    /// This machine's clock: the database is a file here.
    async fn clock(&self, _pool: &SqlitePool) -> Result<Timestamp, StorageError> {
        Ok(Timestamp::now())
    }
}

impl SqliteStore {
    /// Applies the embedded migrations the database lacks, as
    /// [`Self::migrate`] does, while holding an exclusive lock: SQLite's
    /// migrator takes no lock of its own, so two `identity migrate` started
    /// at once would both see a migration missing and the second would fail
    /// ("table accounts already exists"). The second now waits (up to a
    /// minute), then finds nothing left to do. The lock is SQLite's own, an
    /// exclusive transaction on an empty side database next to the real one
    /// (`<database>.migrate-lock`), released when the migration ends or the
    /// process dies; the file stays. (Not the database itself: its
    /// migrations run in transactions of their own.)
    pub async fn migrate_exclusively(&self) -> Result<(), StorageError> {
        let file = &self.backend.file;
        let in_memory = file.as_os_str().is_empty() || file.as_os_str() == ":memory:";
        if in_memory {
            return self.migrate().await;
        }
        let mut path = file.clone().into_os_string();
        path.push(".migrate-lock");
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .busy_timeout(Duration::from_secs(60));
        let mut lock = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(SqliteBackend::classify)?;
        sqlx::query("BEGIN EXCLUSIVE")
            .execute(&mut lock)
            .await
            .map_err(SqliteBackend::classify)?;
        let migrated = self.migrate().await;
        // Closing the connection ends the transaction and frees the lock.
        let _ = sqlx::Connection::close(lock).await;
        migrated
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In WAL mode only `synchronous = FULL` makes a commit durable when
    /// it is acknowledged.
    #[tokio::test]
    async fn every_connection_syncs_each_commit() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite:{}", dir.path().join("sync.db").display());
        let store = SqliteStore::connect(&url, &PoolOptions::default())
            .await
            .expect("open");
        let mut conn = store.pool.acquire().await.expect("a connection");
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous")
            .fetch_one(&mut *conn)
            .await
            .expect("read");
        assert_eq!(level, 2, "synchronous = FULL");
        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(&mut *conn)
            .await
            .expect("read");
        assert_eq!(mode, "wal");
    }

    /// A full disk is a condition of the machine, not a bug: the call may
    /// succeed once space is freed, so it is unavailable, not internal.
    #[tokio::test]
    async fn a_full_database_is_unavailable() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = format!("sqlite:{}", dir.path().join("full.db").display());
        let store = SqliteStore::connect(&url, &PoolOptions::default())
            .await
            .expect("open");
        let mut conn = store.pool.acquire().await.expect("a connection");
        sqlx::raw_sql("CREATE TABLE t (b BLOB); PRAGMA max_page_count = 8")
            .execute(&mut *conn)
            .await
            .expect("set up");
        let err = sqlx::query("INSERT INTO t VALUES (zeroblob(1000000))")
            .execute(&mut *conn)
            .await
            .expect_err("the database is full");
        assert!(
            matches!(SqliteBackend::classify(err), StorageError::Unavailable(_)),
            "a full database is not reported as unavailable"
        );
    }
}
