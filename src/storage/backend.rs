//! What differs between the two databases, and nothing else: the contract
//! between the generic store ([`super::sql::SqlStore`]) and each backend
//! ([`super::postgres`], [`super::sqlite`]).
//!
//! The queries, the transactions and the audit trail are written once, in
//! [`super::sql`], over any [`Backend`]. A backend names its sqlx database
//! type, supplies the few statements whose text differs (row locks, how a
//! bound list of digests is matched), classifies its errors, announces
//! changes to other replicas (or does not), and writes last uses in its own
//! way (one array statement on PostgreSQL, a statement per use on SQLite).
//!
//! sqlx states what a query needs as bounds on the value types (`&str:
//! Encode<'q, DB>`), which Rust does not carry from a trait to its users:
//! every generic function would have to repeat them. They are stated once
//! here instead, as [`SqlDatabase`] (binding the handful of value types the
//! store binds) and [`Exec`] (a connection as an executor); the generic code
//! binds with [`Bind::arg`] and runs on [`Exec::exec`], and needs no bound
//! but `B: Backend`. Every call is monomorphised: no boxing, no extra round
//! trip.

use std::future::Future;

use sqlx::{Database, Encode, Executor, IntoArguments, Pool, Type, migrate::Migrate};

use super::{StorageError, TokenUse, rows::SqlRow};
use crate::domain::{
    cache::{Invalidation, InvalidationSink},
    credential::Digest,
    time::Timestamp,
    token::TokenId,
};

/// A statement with its arguments, as sqlx builds it for database `D`.
pub type Query<'q, D> = sqlx::query::Query<'q, D, <D as Database>::Arguments<'q>>;

/// One backend: PostgreSQL or SQLite. Implemented by each backend's state
/// (what it keeps beside the query pool, which the store holds).
pub trait Backend: std::fmt::Debug + Clone + Send + Sync + 'static {
    /// The sqlx database, with its connection and row types named so that
    /// their bounds below hold wherever `B: Backend` does.
    type Db: SqlDatabase
        + for<'q> Database<
            Connection = Self::Connection,
            Row = Self::Row,
            Arguments<'q> = Self::Arguments<'q>,
        >;
    /// A connection: an executor of its own statements, and a migrator.
    type Connection: sqlx::Connection<Database = Self::Db> + Exec<Self::Db> + Migrate;
    /// A result row, read by column name (`super::rows`).
    type Row: SqlRow + sqlx::Row<Database = Self::Db>;
    /// A statement's arguments.
    type Arguments<'q>: sqlx::Arguments<'q, Database = Self::Db> + IntoArguments<'q, Self::Db>;

    /// Whether several replicas share the database (PostgreSQL), so that a
    /// cache must hear of the others' changes; SQLite serves one process.
    const SHARED: bool;
    /// The embedded migrations, `(version, description, SQL)`, oldest first.
    const MIGRATIONS: &'static [(i64, &'static str, &'static str)];
    /// Whether the migrations table exists: one row, the count.
    const SCHEMA_TABLE_EXISTS: &'static str;
    /// Inserts a session if its account's credentials are still current
    /// (`sql::sessions`): with a share lock on the account row where there
    /// are row locks.
    const INSERT_SESSION: &'static str;
    /// Takes an account's write lock, changing nothing; affects one row
    /// if the account exists (`sql::accounts`).
    const LOCK_ACCOUNT: &'static str;
    /// Locks an account about to be deleted (`sql::accounts`).
    const LOCK_ACCOUNT_FOR_DELETE: &'static str;
    /// Then locks its credentials' rows, where there are row locks.
    const LOCK_CREDENTIALS_FOR_DELETE: &'static [&'static str] = &[];
    /// The live token of a new child's parent family (`sql::tokens`),
    /// locked where there are row locks.
    const PARENT_LIVE: &'static str;
    /// The health probe: 1 (a `BIGINT`) when the database takes writes.
    const PING: &'static str;
    /// Run first in a transaction that walks token families recursively
    /// (the revocations' cascades), if anything needs to be: see
    /// [`crate::storage::sql::SqlStore::begin_cascade`].
    const CASCADE_SETTINGS: Option<&'static str> = None;
    /// The session creating a token, live and current (`sql::tokens`),
    /// locked where there are row locks.
    const CREATOR_SESSION_LIVE: &'static str;
    /// The token creating a token, live (`sql::tokens`), locked likewise.
    const CREATOR_TOKEN_LIVE: &'static str;
    /// Revokes the tokens of a leak report and their descendants: `$1` the
    /// digests as [`Self::bind_digests`] binds them, `$2` now.
    const LEAK_TOKENS: &'static str;
    /// Signs out the sessions of a leak report (as [`Self::LEAK_TOKENS`]).
    const LEAK_SESSIONS: &'static str;
    /// The confirming pass of a leak report (as [`Self::LEAK_TOKENS`]).
    const LEAK_DESCENDANTS: &'static str;
    /// The tokens, with their accounts, whose digests are in `$1` (bound by
    /// [`Self::bind_digests`]): a batch of lookups (`sql::lookup`).
    const TOKENS_BY_DIGESTS: &'static str;
    /// The sessions of a batch of lookups (as [`Self::TOKENS_BY_DIGESTS`]).
    const SESSIONS_BY_DIGESTS: &'static str;
    /// Where changes are also rows (PostgreSQL's table of changes, for the
    /// polled feed): the retention statement that deletes at most `$2` of
    /// those that went before a row written at or before `$1`, and how long
    /// they are kept. `None`: no such rows.
    const PURGE_CHANGES: Option<(&'static str, std::time::Duration)> = None;

    /// Translates a sqlx error into the store's own: a unique violation into
    /// its [`super::Conflict`], a lost or busy database into
    /// [`StorageError::Unavailable`], the rest into [`StorageError::Other`].
    fn classify(err: sqlx::Error) -> StorageError;

    /// Whether a connection opened `age` ago was opened before the
    /// database last dropped its connections, and so is presumed dead.
    fn predates_loss(&self, age: std::time::Duration) -> bool;

    /// Binds a list of digests as the `LEAK_*` statements match it.
    fn bind_digests<'q>(query: Query<'q, Self::Db>, digests: &[Digest]) -> Query<'q, Self::Db>;

    /// Announces a change to every other replica, within the caller's
    /// transaction: delivered when (and only if) it commits.
    fn announce(
        &self,
        conn: &mut Self::Connection,
        what: &Invalidation,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Announces that each of `ids` was revoked, as [`Self::announce`].
    fn announce_credentials(
        &self,
        conn: &mut Self::Connection,
        ids: &[TokenId],
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Starts handing other replicas' announcements to `sink`, for good.
    fn watch_changes(&self, pool: &Pool<Self::Db>, sink: std::sync::Arc<dyn InvalidationSink>);

    /// Records a batch of last uses (never empty), each only where the
    /// recorded one is at least `interval_micros` older.
    fn write_uses(
        &self,
        pool: &Pool<Self::Db>,
        uses: &[TokenUse],
        interval_micros: i64,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// Takes the retention lock on `conn`, if no other replica holds it.
    fn lock_retention(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = Result<bool, StorageError>> + Send;

    /// Releases the retention lock held on `conn`.
    fn unlock_retention(
        conn: &mut Self::Connection,
    ) -> impl Future<Output = Result<(), StorageError>> + Send;

    /// The time by the database's clock (or this machine's, where the
    /// database is a local file).
    fn clock(
        &self,
        pool: &Pool<Self::Db>,
    ) -> impl Future<Output = Result<Timestamp, StorageError>> + Send;

    /// `query` as this backend sends it: as written, or (PostgreSQL with
    /// its statement cache off, for a transaction-mode pooler) unnamed, so
    /// that no prepared statement outlives it on a server connection.
    fn statement(query: Query<'_, Self::Db>) -> Query<'_, Self::Db> {
        query
    }

    /// Whether a statement run outside a transaction must be given one of
    /// its own: PostgreSQL with its statement cache off, where the parse and
    /// the execution of an unnamed statement are two exchanges, which a
    /// transaction-mode pooler could send to two server connections.
    fn alone_in_transaction() -> bool {
        false
    }

    /// A pool of sessions of their own (the listen URL's), for what holds
    /// a session-level lock across statements (migrations, the retention
    /// lock), when the query pool may be a transaction-mode pooler; `None`:
    /// the query pool.
    fn session_pool(&self) -> Option<&Pool<Self::Db>> {
        None
    }

    /// The rows of `statement` (a lookup by one digest, ending in `= $1`)
    /// as a read replica answers it, only if it had replayed everything
    /// this process knows of before it read (README, "Read replicas"), and
    /// found the credential, and (for `use_count`, a column that is NULL for
    /// a credential without one) it has no use count. `None`: read the
    /// primary. Without a replica (SQLite has none), always `None`.
    fn replica_lookup(
        &self,
        _statement: &'static str,
        _digest: &Digest,
        _use_count: Option<&'static str>,
    ) -> impl Future<Output = Option<Vec<Self::Row>>> + Send {
        std::future::ready(None)
    }

    /// A write of this process committed on `pool`: called before the call
    /// that made it returns, so that a read replica is never trusted here
    /// with an answer from before it.
    fn wrote(&self, _pool: &Pool<Self::Db>) -> impl Future<Output = ()> + Send {
        std::future::ready(())
    }
}

/// A connection that runs statements: `&mut` itself, as an executor.
pub trait Exec<D: Database>: Send {
    /// The executor: `&'c mut` the connection.
    type Executor<'c>: Executor<'c, Database = D>
    where
        Self: 'c;

    /// The connection as an executor, for one statement.
    fn exec(&mut self) -> Self::Executor<'_>;
}

/// A sqlx database that binds the value types the store binds. Each
/// method is `query.bind(value)`, written where the database is known.
pub trait SqlDatabase: Database {
    /// Binds text.
    fn bind_text<'q>(query: Query<'q, Self>, value: &'q str) -> Query<'q, Self>;
    /// Binds text or NULL.
    fn bind_opt_text<'q>(query: Query<'q, Self>, value: Option<&'q str>) -> Query<'q, Self>;
    /// Binds owned text.
    fn bind_string<'q>(query: Query<'q, Self>, value: String) -> Query<'q, Self>;
    /// Binds a 64-bit integer.
    fn bind_int<'q>(query: Query<'q, Self>, value: i64) -> Query<'q, Self>;
    /// Binds a 64-bit integer or NULL.
    fn bind_opt_int<'q>(query: Query<'q, Self>, value: Option<i64>) -> Query<'q, Self>;
    /// Binds bytes.
    fn bind_bytes<'q>(query: Query<'q, Self>, value: &'q [u8]) -> Query<'q, Self>;
    /// How many rows a statement changed.
    fn rows_affected(done: &Self::QueryResult) -> u64;
}

/// Binds `value` to `query` where `D` is concrete, so that its bounds are
/// checked once per database.
fn bind<'q, D, T>(query: Query<'q, D>, value: T) -> Query<'q, D>
where
    D: Database,
    T: 'q + Encode<'q, D> + Type<D>,
{
    query.bind(value)
}

/// The two databases' binds, identical but for the database.
macro_rules! sql_database {
    ($db:ty, $conn:ty) => {
        impl SqlDatabase for $db {
            fn bind_text<'q>(query: Query<'q, Self>, value: &'q str) -> Query<'q, Self> {
                bind(query, value)
            }
            fn bind_opt_text<'q>(
                query: Query<'q, Self>,
                value: Option<&'q str>,
            ) -> Query<'q, Self> {
                bind(query, value)
            }
            fn bind_string<'q>(query: Query<'q, Self>, value: String) -> Query<'q, Self> {
                bind(query, value)
            }
            fn bind_int<'q>(query: Query<'q, Self>, value: i64) -> Query<'q, Self> {
                bind(query, value)
            }
            fn bind_opt_int<'q>(query: Query<'q, Self>, value: Option<i64>) -> Query<'q, Self> {
                bind(query, value)
            }
            fn bind_bytes<'q>(query: Query<'q, Self>, value: &'q [u8]) -> Query<'q, Self> {
                bind(query, value)
            }
            fn rows_affected(done: &Self::QueryResult) -> u64 {
                done.rows_affected()
            }
        }

        impl Exec<$db> for $conn {
            type Executor<'c> = &'c mut $conn;

            fn exec(&mut self) -> &mut $conn {
                self
            }
        }
    };
}

sql_database!(sqlx::Postgres, sqlx::PgConnection);
sql_database!(sqlx::Sqlite, sqlx::SqliteConnection);

/// A value the store binds: one of [`SqlDatabase`]'s types.
pub(super) trait Value<'q, D: SqlDatabase> {
    /// Binds `self` to `query`.
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D>;
}

impl<'q, D: SqlDatabase> Value<'q, D> for &'q str {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_text(query, self)
    }
}

impl<'q, D: SqlDatabase> Value<'q, D> for Option<&'q str> {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_opt_text(query, self)
    }
}

impl<'q, D: SqlDatabase> Value<'q, D> for String {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_string(query, self)
    }
}

impl<'q, D: SqlDatabase> Value<'q, D> for i64 {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_int(query, self)
    }
}

impl<'q, D: SqlDatabase> Value<'q, D> for Option<i64> {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_opt_int(query, self)
    }
}

impl<'q, D: SqlDatabase> Value<'q, D> for &'q [u8] {
    fn bind_to(self, query: Query<'q, D>) -> Query<'q, D> {
        D::bind_bytes(query, self)
    }
}

/// `query.arg(value)`: sqlx's `bind`, for generic code.
pub(super) trait Bind<'q, D: SqlDatabase>: Sized {
    /// Binds the next parameter.
    #[must_use]
    fn arg<T: Value<'q, D>>(self, value: T) -> Self;
}

impl<'q, D: SqlDatabase> Bind<'q, D> for Query<'q, D> {
    fn arg<T: Value<'q, D>>(self, value: T) -> Self {
        value.bind_to(self)
    }
}
