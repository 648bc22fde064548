//! Why the service could not start or stopped with an error.

use std::net::SocketAddr;

use super::tls;
use crate::{domain::DomainError, storage::StorageError};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The listen address could not be bound.
    #[error("cannot serve gRPC on {addr} (IDENTITY_LISTEN_ADDR): {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The plaintext health address could not be bound.
    #[error("cannot serve health checks on {addr} (IDENTITY_HEALTH_LISTEN_ADDR): {source}")]
    HealthBind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {addr} (IDENTITY_METRICS_ADDR): {source}")]
    MetricsBind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The web page's address could not be bound.
    #[error("cannot serve the web page on {addr} (IDENTITY_WEB_ADDR): {source}")]
    WebBind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be opened or migrated.
    #[error("database {url} (DATABASE_URL): {source}")]
    Database {
        /// The URL, password redacted.
        url: String,
        /// Why.
        source: StorageError,
    },
    /// The domain could not be set up.
    #[error("setting up: {0}")]
    Domain(#[from] DomainError),
    /// Reflection could not load the descriptor set.
    #[error("server reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The server failed while serving.
    #[error("serving: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Settings that contradict each other, or one that cannot be used.
    #[error("{0}")]
    Config(String),
    /// A one-shot command found a database nobody has migrated.
    #[error(
        "database {url} (DATABASE_URL) has no schema yet: run `identity migrate` or start the server first"
    )]
    NoSchema {
        /// The URL, password redacted.
        url: String,
    },
    /// The TLS files could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}
