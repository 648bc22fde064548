//! The production store: PostgreSQL through a sqlx connection pool.
//!
//! Many stateless replicas share one database. Migrations take an advisory
//! lock, so replicas that start together apply them once.

use std::str::FromStr as _;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{Conflict, PoolOptions, StorageError, TokenFilter, WithAccount, rows, sql};
use crate::domain::{
    account::{Account, AccountId},
    audit::{AuditEvent, AuditFilter},
    credential::Digest,
    password::PasswordHash,
    time::Timestamp,
    token::{NewToken, Session, Token, TokenId},
};

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/postgres/0001_initial.sql"),
    ),
    (
        2,
        "lifecycle",
        include_str!("../../migrations/postgres/0002_lifecycle.sql"),
    ),
];

/// A [`super::Store`] on PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
}

impl PgStore {
    /// Prepares a pool for `url`. Connections are opened lazily, so the
    /// service can start (and report NOT_SERVING) while the database is
    /// still coming up; a malformed URL fails here.
    pub async fn connect(url: &str, options: &PoolOptions) -> Result<Self, StorageError> {
        let connect =
            PgConnectOptions::from_str(url).map_err(|e| StorageError::Other(Box::new(e)))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_lazy_with(connect);
        Ok(Self { pool })
    }

    /// Applies the embedded migrations that the database lacks.
    pub async fn migrate(&self) -> Result<(), StorageError> {
        super::migrator(MIGRATIONS)
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(inner) => Self::classify(inner),
                other => StorageError::Other(Box::new(other)),
            })
    }

    /// Translates a sqlx error by SQLSTATE and constraint name.
    fn classify(err: sqlx::Error) -> StorageError {
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
                        Some("accounts_pkey" | "tokens_pkey" | "sessions_pkey") => {
                            Some(Conflict::Id)
                        }
                        _ => None,
                    };
                    if let Some(conflict) = conflict {
                        return StorageError::Conflict(conflict);
                    }
                }
                // Class 08: connection exceptions; 53: insufficient resources;
                // 57P0x: the server is shutting down or restarting; 40001 and
                // 40P01: serialization failure and deadlock, both retryable.
                if code.starts_with("08")
                    || code.starts_with("53")
                    || code.starts_with("57P0")
                    || code == "40001"
                    || code == "40P01"
                {
                    StorageError::Unavailable(Box::new(err))
                } else {
                    StorageError::Other(Box::new(err))
                }
            }
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StorageError::Unavailable(Box::new(err)),
            _ => StorageError::Other(Box::new(err)),
        }
    }
}

sql::impl_store!(PgStore, sqlx::Postgres);
