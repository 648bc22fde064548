//! Start-up and shutdown: builds the store, the domain and the gRPC server
//! from a [`Config`], binds the listener (so its address is known before
//! serving, and tests can use port 0), serves plaintext or TLS ([`tls`])
//! under each listener's limits ([`listen`]), reports health, and drains on
//! shutdown.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::ServiceBuilder;

use crate::{
    api::{
        FILE_DESCRIPTOR_SET,
        accounts::AccountsApi,
        audit::AuditApi,
        codec::{MAX_RESPONSE_BYTES, MessageLimitLayer},
        deadline::DeadlineLayer,
        guard::DefaultDenyLayer,
        observe::ObserveLayer,
        pb::{
            accounts_service_server::AccountsServiceServer,
            audit_service_server::AuditServiceServer, tokens_service_server::TokensServiceServer,
        },
        shed::ShedLayer,
        tokens::TokensApi,
    },
    config::Config,
    domain::{DomainError, Identity, password::PasswordHasher},
    observability,
    storage::{self, StorageError, Store},
};

pub mod listen;
pub mod tls;

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr} (IDENTITY_LISTEN_ADDR): {source}")]
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
    /// Settings that contradict each other.
    #[error("{0}")]
    Config(String),
    /// The TLS files could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

/// A built service, bound to its address, not yet serving.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    identity: Identity,
    store: Arc<dyn Store>,
    config: Config,
    tls: Option<tls::Tls>,
    /// The bound metrics listener and its address, unless metrics are off.
    metrics: Option<(TcpListener, SocketAddr)>,
    /// The bound plaintext health listener and its address, if configured.
    health: Option<(TcpListener, SocketAddr)>,
}

impl App {
    /// Opens (and, if configured, migrates) the database, sets up the domain
    /// and binds the listener. Fails if any of these fails.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        // First, so that every metric handle made from here on is real.
        let metrics = bind_metrics(&config).await?;
        config.check_tls().map_err(AppError::Config)?;
        let tls = tls::Tls::load(&config)?;
        let store = open_store(&config).await?;
        store.ping().await.map_err(|source| AppError::Database {
            url: config.redacted_database_url(),
            source,
        })?;
        let hasher = PasswordHasher::new(config.hash_concurrency)?;
        let identity = Identity::new(Arc::clone(&store), hasher, config.identity.clone());
        identity.watch_changes();
        identity.record_uses_in_background();
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen_addr,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| AppError::Bind {
            addr: config.listen_addr,
            source,
        })?;
        let health = match config.health_listen_addr {
            Some(addr) => {
                let bound = TcpListener::bind(addr)
                    .await
                    .and_then(|listener| Ok((listener.local_addr()?, listener)));
                match bound {
                    Ok((local, listener)) => Some((listener, local)),
                    Err(source) => return Err(AppError::HealthBind { addr, source }),
                }
            }
            None => None,
        };
        Ok(Self {
            listener,
            local_addr,
            identity,
            store,
            config,
            tls,
            metrics,
            health,
        })
    }

    /// The address the plaintext health listener is bound to, if any.
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|&(_, addr)| addr)
    }

    /// The address metrics are served on, unless they are off.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|&(_, addr)| addr)
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The domain's use cases, for commands that run without serving.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Serves until `shutdown` completes, then reports NOT_SERVING, stops
    /// accepting connections and drains in-flight calls for at most the
    /// configured drain timeout.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        // Every service decodes at most the configured request size (the
        // layer below refuses larger requests first, with the right code)
        // and encodes at most what clients accept by default.
        let max_request = self.config.max_message_bytes;
        let (health, health_service) = tonic_health::server::health_reporter();
        let health_service = health_service
            .max_decoding_message_size(max_request)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
        let (reflection_v1, reflection_v1alpha) = if self.config.reflection {
            (
                Some(
                    reflection()
                        .build_v1()?
                        .max_decoding_message_size(max_request)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                ),
                // grpcurl 1.8 speaks only v1alpha.
                Some(
                    reflection()
                        .build_v1alpha()?
                        .max_decoding_message_size(max_request)
                        .max_encoding_message_size(MAX_RESPONSE_BYTES),
                ),
            )
        } else {
            (None, None)
        };

        // `build` has just seen the database answer.
        set_all(&health, ServingStatus::Serving).await;
        health
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let watcher = tokio::spawn(watch_store(
            Arc::clone(&self.store),
            health.clone(),
            self.config.health_interval,
            self.config.pool.acquire_timeout,
        ));
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutdown requested: draining in-flight calls");
                watcher.abort();
                set_all(&health, ServingStatus::NotServing).await;
                health
                    .set_service_status(LIVENESS_SERVICE, ServingStatus::NotServing)
                    .await;
                let _ = draining_tx.send(());
            }
        };

        // The health service alone, in plaintext, for probes that cannot
        // speak TLS (Kubernetes' native gRPC probes); it answers until this
        // function returns, so probes see NOT_SERVING while draining.
        let health_addr = self.health_addr();
        let metrics_addr = self.metrics_addr();
        let limits = |listener| listen::Limits {
            listener,
            max_connections: self.config.connections.max_connections,
            max_streams: self.config.max_streams_per_connection,
            preface_timeout: self.config.connections.preface_timeout,
            idle_timeout: self.config.connections.idle_timeout,
            keepalive: Some((Duration::from_secs(30), Duration::from_secs(10))),
        };
        let max_health = self.config.connections.max_health_requests;
        let _health = self.health.map(|(listener, _)| {
            let limits = limits("health");
            let incoming = listen::accept_plaintext(listener, listen::Gate::new(&limits));
            let service = ServiceBuilder::new()
                .layer(DeadlineLayer::new(self.config.request_timeout))
                // Only health is served here: anything else is
                // UNIMPLEMENTED, one call at a time.
                .layer(ShedLayer::new(1, max_health))
                .service(Routes::new(health_service.clone()).prepare());
            AbortOnDrop(tokio::spawn(listen::serve(
                incoming,
                service,
                limits,
                std::future::pending(),
            )))
        });
        // Served until this function returns (the task stops when dropped).
        let _metrics = self
            .metrics
            .map(|(listener, _)| observability::spawn_metrics(listener, Arc::clone(&self.store)));
        tracing::info!(
            addr = %self.local_addr,
            metrics_addr = %metrics_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            health_addr = %health_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
            database = %self.config.redacted_database_url(),
            reflection = self.config.reflection,
            "serving"
        );
        match &self.tls {
            Some(tls) => tracing::info!(
                mutual = tls.is_mutual(),
                verify_auth = %self.config.verifiers.auth,
                "serving over TLS"
            ),
            None => tracing::warn!(
                "TLS is off (IDENTITY_TLS_CERT and IDENTITY_TLS_KEY are unset): serving plaintext gRPC"
            ),
        }
        let mut routes = Routes::builder();
        routes.add_service(health_service);
        if let Some(v1) = reflection_v1 {
            routes.add_service(v1);
        }
        if let Some(v1alpha) = reflection_v1alpha {
            routes.add_service(v1alpha);
        }
        routes
            .add_service(
                AccountsServiceServer::new(AccountsApi::new(self.identity.clone()))
                    .max_decoding_message_size(max_request)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                AuditServiceServer::new(AuditApi::new(self.identity.clone()))
                    .max_decoding_message_size(max_request)
                    .max_encoding_message_size(MAX_RESPONSE_BYTES),
            )
            .add_service(
                TokensServiceServer::new(
                    TokensApi::new(self.identity, self.config.leak_reports_per_minute)
                        .with_verifiers(self.config.verifiers.clone()),
                )
                .max_decoding_message_size(max_request)
                .max_encoding_message_size(MAX_RESPONSE_BYTES),
            );
        // Outermost first: every call is observed (its deadline's
        // DEADLINE_EXCEEDED included), then bounded in time, shed under
        // load, checked against the rules, and framed.
        let service = ServiceBuilder::new()
            .layer(ObserveLayer::new())
            .layer(DeadlineLayer::new(self.config.request_timeout))
            .layer(ShedLayer::new(
                self.config.max_concurrent_requests as usize,
                max_health,
            ))
            .layer(DefaultDenyLayer)
            .layer(MessageLimitLayer::new(max_request))
            .service(routes.routes().prepare());
        // The server accepts connections itself, in plaintext or over TLS
        // (so that the certificate can be reloaded: see `tls`), and serves
        // them with hyper under the listener's limits (see `listen`).
        let limits = limits("grpc");
        let gate = listen::Gate::new(&limits);
        let server: Pin<Box<dyn Future<Output = ()> + Send>> = match self.tls {
            None => Box::pin(listen::serve(
                listen::accept_plaintext(self.listener, gate),
                service,
                limits,
                signal,
            )),
            Some(tls) => Box::pin(listen::serve(
                tls.incoming(self.listener, gate),
                service,
                limits,
                signal,
            )),
        };

        let drain_timeout = self.config.drain_timeout;
        let deadline = async move {
            if draining_rx.await.is_ok() {
                tokio::time::sleep(drain_timeout).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = server => {}
            () = deadline => tracing::warn!(?drain_timeout, "drain timeout passed; closing remaining calls"),
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Server reflection over this service's protos, the health protocol, and
/// the `google.rpc` error details (so grpcurl can print ErrorInfo and
/// BadRequest).
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}

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
async fn bind_metrics(config: &Config) -> Result<Option<(TcpListener, SocketAddr)>, AppError> {
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
pub async fn open_identity(config: &Config) -> Result<Identity, AppError> {
    let store = open_store(config).await?;
    let hasher = PasswordHasher::new(1)?;
    Ok(Identity::new(store, hasher, config.identity.clone()))
}

/// Opens the store and runs migrations without serving: `identity migrate`.
pub async fn migrate(config: &Config) -> Result<(), AppError> {
    let mut config = config.clone();
    config.migrate = true;
    open_store(&config).await.map(drop)
}

/// The health service name whose status says only whether the process is
/// up and not shutting down, whatever the database's state: what a liveness
/// probe should ask, so that an orchestrator does not restart every replica
/// during a database outage (readiness asks for `""`, which follows the
/// database).
pub const LIVENESS_SERVICE: &str = "liveness";

/// Probes the store every `interval` and keeps the health service in step:
/// SERVING while it answers, NOT_SERVING while it does not. A probe that takes
/// longer than `patience` (the time a query may wait for a connection)
/// counts as unanswered, so a database that accepts connections but never
/// replies, or a pool whose connections are all stuck, cannot hold the
/// status at SERVING.
async fn watch_store(
    store: Arc<dyn Store>,
    health: HealthReporter,
    interval: Duration,
    patience: Duration,
) {
    let mut last = Some(ServingStatus::Serving);
    loop {
        tokio::time::sleep(interval).await;
        let answer = tokio::time::timeout(patience, store.ping())
            .await
            .unwrap_or_else(|_| {
                Err(StorageError::Unavailable(
                    format!("no answer to a ping within {patience:?}").into(),
                ))
            });
        let status = match answer {
            Ok(()) => ServingStatus::Serving,
            Err(err) => {
                if last != Some(ServingStatus::NotServing) {
                    tracing::warn!(error = %err, "database unreachable: reporting NOT_SERVING");
                }
                ServingStatus::NotServing
            }
        };
        if last != Some(status) {
            set_all(&health, status).await;
            if status == ServingStatus::Serving {
                tracing::info!("database reachable again: reporting SERVING");
            }
            last = Some(status);
        }
    }
}

/// Sets the overall status and each service's.
async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <AccountsServiceServer<AccountsApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <TokensServiceServer<TokensApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <AuditServiceServer<AuditApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
