//! Start-up and shutdown: builds the store, the domain and the gRPC server
//! from a [`Config`], binds the listener (so its address is known before
//! serving, and tests can use port 0), serves plaintext or TLS ([`tls`])
//! under each listener's limits ([`listen`]), reports health, and drains on
//! shutdown.

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic_health::{ServingStatus, server::HealthReporter};

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
        DomainError, Identity,
        password::PasswordHasher,
        time::{Clock, SystemClock},
    },
    observability,
    storage::{self, Database, StorageError, Store},
};

pub mod listen;
mod stack;
pub mod tls;
pub mod web;

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

/// Every rule `serve` applies to its configuration before it touches the
/// network, naming each setting by `name(id)` (see
/// [`crate::config::setting_name`]): the TLS and `VerifyToken` settings
/// against each other, the TLS files read and parsed, and the database URL
/// understood. [`App::build`] runs it first, and `identity config check`
/// runs it too, so that the check cannot pass what serving refuses. Binds,
/// resolves and connects nothing. Returns the TLS loaded (`None` when off).
pub fn check(config: &Config, name: &dyn Fn(&str) -> String) -> Result<Option<tls::Tls>, AppError> {
    config.check_tls_naming(name).map_err(AppError::Config)?;
    config
        .check_listeners_naming(name)
        .map_err(AppError::Config)?;
    let tls = tls::Tls::load(config).map_err(|err| tls_error(&err, name))?;
    crate::config::parse_database_url(&config.database_url)
        .map_err(|why| AppError::Config(format!("{}: {why}", name("database_url"))))?;
    Ok(tls)
}

/// A TLS loading error as a message naming the file's setting by
/// `name(id)` (the variable, the flag or the file's key that gave it).
fn tls_error(err: &tls::TlsError, name: &dyn Fn(&str) -> String) -> AppError {
    let id = |setting: &str| match setting {
        "IDENTITY_TLS_KEY" => "tls_key",
        "IDENTITY_TLS_CLIENT_CA" => "tls_client_ca",
        _ => "tls_cert",
    };
    AppError::Config(match err {
        tls::TlsError::Read {
            setting,
            path,
            source,
        } => format!("TLS: {} ({}): {source}", name(id(setting)), path.display()),
        tls::TlsError::Invalid {
            setting,
            path,
            problem,
        } => format!("TLS: {} ({}): {problem}", name(id(setting)), path.display()),
        tls::TlsError::Certificate(source) => format!(
            "TLS: {} and {}: {source}",
            name("tls_cert"),
            name("tls_key")
        ),
    })
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

/// The health service name whose status says only whether the process is
/// up and not shutting down, whatever the database's state: what a liveness
/// probe should ask, so that an orchestrator does not restart every replica
/// during a database outage (readiness asks for `""`, which follows the
/// database).
pub const LIVENESS_SERVICE: &str = "liveness";

/// What the health watcher keeps in step with the database.
struct Watched {
    /// The database, to migrate or check it once it answers.
    database: Database,
    /// Whether to migrate it (`IDENTITY_MIGRATE`) or only check its schema.
    migrate: bool,
    /// Whether `build` has already migrated or checked it.
    prepared: bool,
    /// The store, to probe.
    store: Arc<dyn Store>,
    /// Set to whether the database answers and the clock is within bound.
    readiness: Readiness,
    /// For redacting the database's secrets from logged errors.
    config: Config,
}

/// Probes the store every `interval` and keeps the health service (and the
/// [`Readiness`] that makes calls fail fast) in step: SERVING while it
/// answers, NOT_SERVING while it does not. A probe that takes longer than
/// `patience` (the time a query may wait for a connection) counts as
/// unanswered, so a database that accepts connections but never replies, or
/// a pool whose connections are all stuck, cannot hold the status at
/// SERVING. Each probe also measures this replica's clock against the
/// database's (PostgreSQL): beyond `IDENTITY_MAX_CLOCK_SKEW` the status is
/// NOT_SERVING too, until the clock is back (see [`clock_skewed`]).
///
/// If the database could not be reached at start-up, it is first migrated
/// (or its schema checked) here, retried with back-off (from 100 ms,
/// doubling up to `interval`) until that succeeds; the status stays
/// NOT_SERVING until then. A schema this build cannot serve is logged as an
/// error and retried too, so that a replica started before `identity
/// migrate` ran becomes ready once it has.
async fn watch_store(
    mut watched: Watched,
    health: HealthReporter,
    interval: Duration,
    patience: Duration,
) {
    let mut last = if watched.readiness.is_ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    // `build` has logged a clock out of bound already.
    let mut skewed = watched.prepared && !watched.readiness.is_ready();
    let bound = watched.config.max_clock_skew;
    let mut retry = interval.min(Duration::from_millis(100));
    let mut last_problem = String::new();
    loop {
        if watched.prepared {
            tokio::time::sleep(interval).await;
        } else {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(interval);
            match watched.database.prepare(watched.migrate).await {
                Ok(()) => {
                    watched.prepared = true;
                    tracing::info!(
                        migrate = watched.migrate,
                        "the database answers: schema ready"
                    );
                }
                Err(err) => {
                    let problem = watched.config.redact_database_secrets(&error_chain(&err));
                    if problem != last_problem {
                        if matches!(err, StorageError::Unavailable(_)) {
                            tracing::warn!(error = %problem, "the database still cannot be reached");
                        } else {
                            tracing::error!(
                                error = %problem,
                                "the database cannot be served yet; trying again"
                            );
                        }
                        last_problem = problem;
                    }
                    continue;
                }
            }
        }
        let answer = tokio::time::timeout(patience, async {
            watched.store.ping().await?;
            watched.database.clock_offset().await
        })
        .await
        .unwrap_or_else(|_| {
            Err(StorageError::Unavailable(
                format!("no answer to a ping within {patience:?}").into(),
            ))
        });
        let status = match answer {
            Ok(offset) => {
                skewed = clock_skewed(offset, bound, skewed);
                if skewed {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                }
            }
            Err(err) => {
                if last != ServingStatus::NotServing {
                    tracing::warn!(
                        error = %watched.config.redact_database_secrets(&error_chain(&err)),
                        "database unreachable: reporting NOT_SERVING"
                    );
                }
                ServingStatus::NotServing
            }
        };
        if last != status {
            // Calls are admitted before probes hear SERVING, and refused
            // before they hear NOT_SERVING.
            watched.readiness.set(status == ServingStatus::Serving);
            set_all(&health, status).await;
            if status == ServingStatus::Serving {
                tracing::info!("database reachable: reporting SERVING");
            }
            last = status;
        }
    }
}

/// Whether a clock `offset` from the database's (`None`: there is only one
/// clock, SQLite's machine's) is certainly beyond `bound`: exports the
/// offset as `identity_clock_offset_seconds`, and logs an error naming the
/// setting when the clock goes out of bound (`was` says whether it already
/// was) and a notice when it comes back. Revocations hold whatever the
/// clocks say, but expiry, rotation grace periods and session lifetimes
/// are judged on this replica's clock, so a replica whose clock is off by
/// more than the bound must not judge them.
fn clock_skewed(offset: Option<storage::ClockOffset>, bound: Duration, was: bool) -> bool {
    let Some(offset) = offset else {
        return false;
    };
    metrics::gauge!("identity_clock_offset_seconds").set(offset.seconds());
    let skewed = offset.exceeds(bound);
    if skewed && !was {
        tracing::error!(
            offset_seconds = offset.seconds(),
            uncertainty_micros = offset.uncertainty_micros,
            max_clock_skew = ?bound,
            "this replica's clock is off the database's by more than IDENTITY_MAX_CLOCK_SKEW: \
             reporting NOT_SERVING until it is back within the bound (keep the hosts on NTP)"
        );
    } else if !skewed && was {
        tracing::info!(
            offset_seconds = offset.seconds(),
            "this replica's clock is back within IDENTITY_MAX_CLOCK_SKEW of the database's"
        );
    }
    skewed
}

/// An error and its sources, joined, for one log field.
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
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

/// A database failure, naming the database (redacted).
fn database_error(config: &Config, source: StorageError) -> AppError {
    AppError::Database {
        url: config.redacted_database_url(),
        source,
    }
}

/// The configured database's pool, set up without connecting.
async fn connect_database(config: &Config) -> Result<Database, AppError> {
    Database::connect(&config.database_url, &config.pool)
        .await
        .map_err(|source| database_error(config, source))
}
