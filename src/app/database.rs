//! Opening the database and the store (migrating if configured to), the
//! one-shot commands' domain, and binding the metrics listener.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpListener;

use super::AppError;
use crate::{
    config::Config,
    domain::{Identity, password::PasswordHasher},
    observability,
    storage::{self, Database, StorageError, Store},
};

/// Opens the configured store, migrating it if configured to.
async fn open_store(config: &Config) -> Result<Arc<dyn Store>, AppError> {
    storage::open(&config.database_url, &config.pool, config.migrate)
        .await
        .map_err(|source| AppError::Database {
            url: config.redacted_database_url(),
            source,
        })
}

/// Installs the metrics recorder and binds the metrics listener, unless
/// metrics are off.
pub(super) async fn bind_metrics(
    config: &Config,
) -> Result<Option<(TcpListener, SocketAddr)>, AppError> {
    let Some(addr) = config.metrics_addr else {
        return Ok(None);
    };
    observability::recorder();
    let bound = observability::bind_metrics(addr)
        .await
        .and_then(|listener| Ok((listener.local_addr()?, listener)));
    match bound {
        Ok((local, listener)) => Ok(Some((listener, local))),
        Err(source) => Err(AppError::MetricsBind { addr, source }),
    }
}

/// Opens the store (migrating it if configured to) and the domain, without
/// binding a listener: for one-shot commands such as `bootstrap-operator`.
/// Refuses a database that holds no schema yet ([`AppError::NoSchema`]),
/// creating nothing (not even a SQLite file): a command run from the wrong
/// directory, or with a mistyped URL, must not quietly start a database
/// of its own that the running server knows nothing about.
pub async fn open_identity(config: &Config) -> Result<Identity, AppError> {
    let database_error = |source| database_error(config, source);
    let database = connect_database(config).await?;
    if !database.has_schema().await.map_err(database_error)? {
        return Err(AppError::NoSchema {
            url: config.redacted_database_url(),
        });
    }
    database
        .prepare(config.migrate)
        .await
        .map_err(database_error)?;
    let hasher = PasswordHasher::new(1)?;
    Ok(Identity::new(
        database.store(),
        hasher,
        config.identity.clone(),
    ))
}

/// Opens the store and runs migrations without serving: `identity migrate`.
pub async fn migrate(config: &Config) -> Result<(), AppError> {
    let mut config = config.clone();
    config.migrate = true;
    open_store(&config).await.map(drop)
}

/// A database failure, naming the database (redacted).
pub(super) fn database_error(config: &Config, source: StorageError) -> AppError {
    AppError::Database {
        url: config.redacted_database_url(),
        source,
    }
}

/// The configured database's pool, set up without connecting.
pub(super) async fn connect_database(config: &Config) -> Result<Database, AppError> {
    Database::connect(&config.database_url, &config.pool)
        .await
        .map_err(|source| database_error(config, source))
}
