//! Storage: the only code that speaks SQL.
//!
//! [`Store`] is the one interface the domain uses. [`postgres::PgStore`] (the
//! production store) and [`sqlite::SqliteStore`] (the embedded default)
//! implement it, with the queries written once in [`sql`] and each backend's
//! differences (connection, migrations, error classification) kept in its own
//! module. Both pass the same conformance suite (`tests/storage.rs`).
//!
//! Row types never leave this module: the trait speaks domain types. Database
//! errors are translated here, where the SQL runs: a unique violation becomes
//! [`Conflict`] by constraint name, a lost connection [`StorageError::Unavailable`].

use std::{borrow::Cow, sync::Arc};

use async_trait::async_trait;

use crate::domain::{
    account::{Account, AccountId},
    credential::Digest,
    time::Timestamp,
    token::{NewToken, Session, Token, TokenId},
};

pub mod postgres;
mod rows;
mod sql;
pub mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A boxed error source, for the log.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a storage call failed.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A uniqueness rule was violated.
    #[error("conflict: {0:?} already exists")]
    Conflict(Conflict),
    /// The database cannot be reached, is overloaded, or is shutting down;
    /// the call may succeed if retried later.
    #[error("the database is unavailable")]
    Unavailable(#[source] BoxError),
    /// A row could not be understood (a bug or a hand-edited database).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Anything else.
    #[error("database error")]
    Other(#[source] BoxError),
}

/// Which uniqueness rule was violated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Another account has this username (case-insensitively).
    Username,
    /// The account has a live token with this name.
    TokenName,
    /// A digest collided: astronomically unlikely, so a bug.
    Digest,
    /// A generated id collided: likewise.
    Id,
}

/// An account together with one of its credentials, as read on the
/// verification path in a single query.
pub type WithAccount<T> = (T, Account);

/// The persistence port of the domain.
///
/// Implementations must be safe to share between tasks and must keep every
/// method atomic: a method either takes full effect or none.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the database answers.
    async fn ping(&self) -> Result<(), StorageError>;

    /// Inserts a new account. [`Conflict::Username`] if the username key is
    /// taken.
    async fn create_account(&self, account: &Account) -> Result<(), StorageError>;

    /// Reads an account by id.
    async fn account_by_id(&self, id: &AccountId) -> Result<Option<Account>, StorageError>;

    /// Reads an account by its username key (ASCII lowercase).
    async fn account_by_username(
        &self,
        username_key: &str,
    ) -> Result<Option<Account>, StorageError>;

    /// Lists accounts in id order, starting after `after`.
    async fn list_accounts(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Account>, StorageError>;

    /// Inserts a new session with the digest of its token.
    async fn create_session(&self, session: &Session, digest: &Digest) -> Result<(), StorageError>;

    /// Reads a session and its account by the digest of its token.
    async fn session_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Session>>, StorageError>;

    /// Marks a session signed out at `at`, unless it already is.
    async fn revoke_session(&self, id: &TokenId, at: Timestamp) -> Result<(), StorageError>;

    /// Inserts a new token. Expired tokens of the same account and name give
    /// their name up first, in the same transaction, so a name is unique only
    /// among live tokens. [`Conflict::TokenName`] if a live token has it.
    async fn create_token(&self, token: &NewToken, now: Timestamp) -> Result<(), StorageError>;

    /// Reads a token by id.
    async fn token_by_id(&self, id: &TokenId) -> Result<Option<Token>, StorageError>;

    /// Reads a token and its account by the digest of its secret.
    async fn token_by_digest(
        &self,
        digest: &Digest,
    ) -> Result<Option<WithAccount<Token>>, StorageError>;

    /// Lists an account's tokens in id order, starting after `after`.
    async fn list_tokens(
        &self,
        account: &AccountId,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Token>, StorageError>;

    /// Marks a token revoked at `at` unless it already is, and returns it as
    /// stored afterwards; `None` if there is no such token.
    async fn revoke_token(
        &self,
        id: &TokenId,
        at: Timestamp,
    ) -> Result<Option<Token>, StorageError>;
}

/// Opens the store a URL names (`postgres://…`, `postgresql://…` or
/// `sqlite:…`) and applies its migrations when `migrate` is set.
pub async fn open(
    url: &str,
    options: &PoolOptions,
    migrate: bool,
) -> Result<Arc<dyn Store>, StorageError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PgStore::connect(url, options).await?;
        if migrate {
            store.migrate().await?;
        }
        Ok(Arc::new(store))
    } else if url.starts_with("sqlite:") {
        let store = SqliteStore::connect(url, options).await?;
        if migrate {
            store.migrate().await?;
        }
        Ok(Arc::new(store))
    } else {
        Err(StorageError::Other(
            "unsupported database URL: expected postgres://, postgresql:// or sqlite:".into(),
        ))
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
}

impl Default for PoolOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: std::time::Duration::from_secs(5),
        }
    }
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
