//! Start-up and shutdown: builds the store, the domain and the gRPC server
//! from a [`Config`], binds the listener (so its address is known before
//! serving, and tests can use port 0), serves plaintext or TLS ([`tls`])
//! under each listener's limits ([`listen`]), reports health, and drains on
//! shutdown.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::{
    api::{
        FILE_DESCRIPTOR_SET,
        codec::MAX_RESPONSE_BYTES,
        layers::ready::Readiness,
        pb::{
            accounts_service_server::AccountsServiceServer,
            audit_service_server::AuditServiceServer, tokens_service_server::TokensServiceServer,
        },
        services::{accounts::AccountsApi, audit::AuditApi, tokens::TokensApi},
    },
    config::Config,
    domain::{
        Identity,
        password::PasswordHasher,
        time::{Clock, SystemClock},
    },
    observability,
    storage::{Database, StorageError, Store},
};

mod check;
mod database;
mod error;
mod health;
pub mod listen;
mod send;
mod stack;
pub mod tls;
pub mod web;

pub use check::check;
use database::{bind_metrics, connect_database, database_error};
pub use database::{migrate, open_identity};
pub use error::AppError;
pub use health::LIVENESS_SERVICE;
use health::{Watched, clock_skewed, error_chain, set_all, watch_store};

/// A built service, bound to its address, not yet serving.
pub struct App {
    listener: TcpListener,
    local_addr: SocketAddr,
    identity: Identity,
    store: Arc<dyn Store>,
    /// The store's database, kept to migrate or check it later if it could
    /// not be reached at start-up.
    database: Database,
    /// Whether the database answers (and this replica's clock is within
    /// `IDENTITY_MAX_CLOCK_SKEW` of it); calls are refused at once while not.
    readiness: Readiness,
    /// Whether `build` migrated or checked the database's schema.
    prepared: bool,
    config: Config,
    tls: Option<tls::Tls>,
    /// The bound metrics listener and its address, unless metrics are off.
    metrics: Option<(TcpListener, SocketAddr)>,
    /// The bound plaintext health listener and its address, if configured.
    health: Option<(TcpListener, SocketAddr)>,
    /// The bound web page listener, its address and its TLS (loaded again,
    /// with its own reloading), unless the page is off.
    web: Option<(TcpListener, SocketAddr, Option<tls::Tls>)>,
}

impl App {
    /// Opens (and, if configured, migrates) the database, sets up the domain
    /// and binds the listener. Fails if any of these fails, except that a
    /// database that cannot be reached (as opposed to one that answers with
    /// a wrong schema) is not fatal: the app is built NOT_SERVING, and once
    /// serving keeps trying to reach (and migrate) it, with back-off.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// [`Self::build`], the domain reading the time from `clock`: for tests
    /// that let time pass by moving a
    /// [`ManualClock`](crate::domain::time::ManualClock). (No setting
    /// reaches this: production always runs on the system clock.)
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self, AppError> {
        // Before anything touches the network.
        let tls = check(&config, &crate::config::setting_name)?;
        // First, so that every metric handle made from here on is real.
        let metrics = bind_metrics(&config).await?;
        let database_error = |source| database_error(&config, source);
        let database = connect_database(&config).await?;
        let store = database.store();
        let readiness = Readiness::new();
        let prepared = match database.prepare(config.migrate).await {
            Ok(()) => store.ping().await,
            Err(err) => Err(err),
        };
        let schema_ready = prepared.is_ok();
        let prepared = match prepared {
            Ok(()) => database.clock_offset().await,
            Err(err) => Err(err),
        };
        match prepared {
            Ok(offset) => readiness.set(!clock_skewed(offset, config.max_clock_skew, false)),
            Err(StorageError::Unavailable(err)) => tracing::warn!(
                database = %config.redacted_database_url(),
                error = %config.redact_database_secrets(&error_chain(err.as_ref())),
                "the database cannot be reached: starting NOT_SERVING, and trying again in the background"
            ),
            Err(err) => return Err(database_error(err)),
        }
        let hasher = PasswordHasher::new(config.hash_concurrency)?;
        let identity =
            Identity::with_clock(Arc::clone(&store), hasher, config.identity.clone(), clock);
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
        let web = match config.web_addr {
            Some(addr) => {
                let bound = TcpListener::bind(addr)
                    .await
                    .and_then(|listener| Ok((listener.local_addr()?, listener)));
                match bound {
                    Ok((local, listener)) => Some((listener, local, tls::Tls::load(&config)?)),
                    Err(source) => return Err(AppError::WebBind { addr, source }),
                }
            }
            None => None,
        };
        Ok(Self {
            listener,
            local_addr,
            identity,
            store,
            database,
            readiness,
            prepared: schema_ready,
            config,
            tls,
            metrics,
            health,
            web,
        })
    }

    /// The address the web page is served on, unless it is off.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().map(|&(_, addr, _)| addr)
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

        // `build` has just seen the database answer, or not.
        let ready = self.readiness.is_ready();
        set_all(
            &health,
            if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            },
        )
        .await;
        health
            .set_service_status(LIVENESS_SERVICE, ServingStatus::Serving)
            .await;
        let watcher = tokio::spawn(watch_store(
            Watched {
                database: self.database.clone(),
                migrate: self.config.migrate,
                prepared: self.prepared,
                store: Arc::clone(&self.store),
                readiness: self.readiness.clone(),
                config: self.config.clone(),
            },
            health.clone(),
            self.config.health_interval,
            self.config.pool.acquire_timeout,
        ));
        let (draining_tx, draining_rx) = tokio::sync::oneshot::channel::<()>();
        let (web_stop_tx, mut web_stop) = tokio::sync::watch::channel(false);
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                let _ = web_stop_tx.send(true);
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
            send_timeout: self.config.request_timeout,
        };
        let max_health = self.config.connections.max_health_requests;
        let _health = self.health.map(|(listener, _)| {
            let limits = limits("health");
            let incoming = listen::accept_plaintext(listener, listen::Gate::new(&limits));
            let service = stack::health_stack(
                Routes::new(health_service.clone()),
                self.config.request_timeout,
                max_health,
            );
            AbortOnDrop(tokio::spawn(listen::serve(
                incoming,
                service,
                limits,
                std::future::pending(),
            )))
        });
        // Purges until this function returns.
        let _retention = AbortOnDrop(
            self.identity
                .purge_periodically(self.config.retention.clone()),
        );
        // Served until this function returns (the task stops when dropped).
        let _metrics = self.metrics.map(|(listener, _)| {
            observability::spawn_metrics(listener, Arc::clone(&self.store), self.identity.clone())
        });
        tracing::info!(
            version = %observability::VERSION,
            commit = %observability::COMMIT,
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
                verify_auth = %self.config.verifiers.mode,
                "serving over TLS"
            ),
            None => tracing::warn!(
                "TLS is off (IDENTITY_TLS_CERT and IDENTITY_TLS_KEY are unset): serving plaintext gRPC"
            ),
        }
        let web_server: Pin<Box<dyn Future<Output = ()> + Send>> = match self.web {
            None => Box::pin(std::future::ready(())),
            Some((listener, addr, web_tls)) => {
                let limits = limits("web");
                let gate = listen::Gate::new(&limits);
                let site = crate::web::Site::new(
                    self.identity.clone(),
                    self.config.trusted_proxies.clone(),
                    web_tls.is_some(),
                    self.config.web_origin.clone(),
                );
                let stop = async move {
                    let _ = web_stop.wait_for(|stop| *stop).await;
                };
                tracing::info!(%addr, tls = web_tls.is_some(), "serving the web page");
                match web_tls {
                    None => Box::pin(web::serve(
                        listen::accept_plaintext(listener, gate),
                        site,
                        false,
                        limits,
                        self.config.request_timeout,
                        stop,
                    )),
                    Some(tls) => Box::pin(web::serve(
                        tls.incoming(listener, gate),
                        site,
                        true,
                        limits,
                        self.config.request_timeout,
                        stop,
                    )),
                }
            }
        };
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
        // Outermost first: see `stack` for each layer and its place.
        let service = stack::grpc_stack(routes.routes(), &self.config, self.readiness.clone());
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
        let server = async move {
            tokio::join!(server, web_server);
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
