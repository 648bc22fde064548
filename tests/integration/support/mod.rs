//! The test harness: starts the real server on `127.0.0.1:0` against a real,
//! freshly migrated database (a SQLite file in a temporary directory, or a
//! new database on PostgreSQL), and hands back typed clients.

#![allow(dead_code)]

pub mod binary;
pub mod ha;
pub mod pgbouncer;
pub mod postgres;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use identity::{
    app::App,
    config::Config,
    domain::{
        account::Username,
        throttle::SignInRates,
        time::{Clock, ManualClock},
    },
    storage::{self, ChangeFeed, PoolOptions, Store},
};
use tonic::{
    Code, Request, Status,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};

pub use identity::api::pb;
use pb::{
    accounts_service_client::AccountsServiceClient, tokens_service_client::TokensServiceClient,
};

/// Which store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file in a temporary directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// A fresh, migrated, empty database of `backend`: its URL and whatever
/// keeps it alive.
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDatabase {
    /// Creates one.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temporary directory");
                let url = format!("sqlite:{}", dir.path().join("identity.db").display());
                Self {
                    url,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => Self {
                url: postgres::fresh_database_url().await,
                _dir: None,
            },
        }
    }

    /// A database that already exists at `url` (such as one on a fault
    /// test's own [`postgres::Cluster`]).
    pub fn at(url: String) -> Self {
        Self { url, _dir: None }
    }

    /// Opens the store directly (migrating it), bypassing the server.
    pub async fn store(&self) -> std::sync::Arc<dyn Store> {
        storage::open(&self.url, &PoolOptions::default(), true)
            .await
            .expect("open the test store")
    }
}

/// A running server and what a test needs to talk to it.
pub struct TestApp {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves metrics (all test servers share one registry: see
    /// `observability.rs`).
    pub metrics_addr: Option<SocketAddr>,
    /// Where it serves plaintext health checks, if configured to.
    pub health_addr: Option<SocketAddr>,
    /// Where it serves the web page, if configured to.
    pub web_addr: Option<SocketAddr>,
    /// A channel to it.
    pub channel: Channel,
    /// A full-access token of an operator robot, `ops`.
    pub operator_token: String,
    /// A token of `ops` limited to `tokens:verify`, made on first use by
    /// [`Self::verifier_token`]: full access does not include the scope.
    verifier_token: tokio::sync::OnceCell<String>,
    /// The database it runs on.
    pub db: TestDatabase,
    /// The server's use cases, to look inside (its cache).
    pub identity: identity::domain::Identity,
    /// The clock the server reads the time from (see [`Self::clock`]).
    clock: Arc<ManualClock>,
    /// The change feed it runs, which its replicas run too.
    pub change_feed: ChangeFeed,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), identity::app::AppError>>>,
}

impl TestApp {
    /// Starts a server on a fresh database of `backend`.
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, |_| {}).await
    }

    /// Starts a server on a fresh database of `backend`, after `adjust` has
    /// changed the test configuration.
    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase::new(backend).await;
        Self::spawn_on(db, None, adjust, plaintext).await
    }

    /// Starts a server on a fresh database of `backend`, after `adjust` has
    /// changed the test configuration, and connects to it through the
    /// endpoint `endpoint` makes of its address (to speak TLS, say).
    pub async fn spawn_with_endpoint(
        backend: Backend,
        adjust: impl FnOnce(&mut Config),
        endpoint: impl FnOnce(SocketAddr) -> Endpoint,
    ) -> Self {
        let db = TestDatabase::new(backend).await;
        Self::spawn_on(db, None, adjust, endpoint).await
    }

    /// Starts a server on a fresh PostgreSQL database with `feed` as its
    /// change feed (its replicas run it too), after `adjust` has changed
    /// the test configuration.
    pub async fn spawn_on_feed(feed: ChangeFeed, adjust: impl FnOnce(&mut Config)) -> Self {
        Self::spawn_with(Backend::Postgres, |config| {
            config.pool.change_feed = feed;
            adjust(config);
        })
        .await
    }

    /// The `pg_stat_activity` condition that finds this server's change
    /// feed connections (and its replicas'): the listener's, or the
    /// poller's.
    pub fn feed_connections(&self) -> &'static str {
        match self.change_feed {
            ChangeFeed::Notify => "query LIKE 'LISTEN %'",
            ChangeFeed::Poll { .. } => {
                "query LIKE '%pg_current_snapshot()%' AND pid <> pg_backend_pid()"
            }
        }
    }

    /// Starts another replica of this server on the same database, sharing
    /// its operator.
    pub async fn replica(&self) -> Self {
        self.replica_with(|_| {}).await
    }

    /// Starts another replica of this server on the same database, sharing
    /// its operator, after `adjust` has changed its configuration.
    pub async fn replica_with(&self, adjust: impl FnOnce(&mut Config)) -> Self {
        let db = TestDatabase {
            url: self.db.url.clone(),
            _dir: None,
        };
        let feed = self.change_feed;
        Self::spawn_on_clock(
            db,
            Some(self.operator_token.clone()),
            |config| {
                config.pool.change_feed = feed;
                adjust(config);
            },
            plaintext,
            Arc::clone(&self.clock),
        )
        .await
    }

    /// The clock the server reads the time from, shared with its replicas:
    /// advance it to let time pass (an expiry, a throttle window, a grace
    /// period) instead of sleeping. It starts at the system time.
    pub fn clock(&self) -> &ManualClock {
        &self.clock
    }

    /// Starts a server on `db`, after `adjust` has changed the test
    /// configuration.
    pub async fn spawn_on(
        db: TestDatabase,
        operator_token: Option<String>,
        adjust: impl FnOnce(&mut Config),
        endpoint: impl FnOnce(SocketAddr) -> Endpoint,
    ) -> Self {
        Self::spawn_on_clock(
            db,
            operator_token,
            adjust,
            endpoint,
            Arc::new(ManualClock::new()),
        )
        .await
    }

    /// [`Self::spawn_on`], the server reading the time from `clock`.
    async fn spawn_on_clock(
        db: TestDatabase,
        operator_token: Option<String>,
        adjust: impl FnOnce(&mut Config),
        endpoint: impl FnOnce(SocketAddr) -> Endpoint,
        clock: Arc<ManualClock>,
    ) -> Self {
        let mut config = Config::with_database(db.url.clone());
        config.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
        config.hash_concurrency = 2;
        config.drain_timeout = Duration::from_secs(5);
        config.metrics_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        // Every test client signs in from 127.0.0.1, many times a second:
        // the per-replica password-check rates are out of the way unless a
        // test sets them (throttle.rs does).
        config.identity.sign_in_rates = SignInRates {
            account_per_minute: 1_000_000,
            address_per_minute: 1_000_000,
        };
        // Tests create tokens in bursts: the per-account creation rate is
        // out of the way unless a test sets it (tokens.rs does).
        config.identity.token_creations_per_minute = 1_000_000;
        adjust(&mut config);
        let change_feed = config.pool.change_feed;
        let app = App::build_with_clock(config, Arc::clone(&clock) as Arc<dyn Clock>)
            .await
            .expect("build the app");
        let addr = app.local_addr();
        let metrics_addr = app.metrics_addr();
        let health_addr = app.health_addr();
        let web_addr = app.web_addr();
        let identity = app.identity().clone();
        let operator_token = match operator_token {
            Some(token) => token,
            None => identity
                .bootstrap_operator(Username::parse("username", "ops").expect("valid username"))
                .await
                .expect("bootstrap an operator")
                .secret
                .expose()
                .to_owned(),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.run_until(async move {
            let _ = rx.await;
        }));
        let channel = endpoint(addr)
            .connect()
            .await
            .expect("connect to the test server");
        Self {
            addr,
            metrics_addr,
            health_addr,
            web_addr,
            channel,
            operator_token,
            verifier_token: tokio::sync::OnceCell::new(),
            db,
            identity,
            clock,
            change_feed,
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    /// Asks the server to shut down and waits until it has.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    /// An accounts client.
    pub fn accounts(&self) -> AccountsServiceClient<Channel> {
        AccountsServiceClient::new(self.channel.clone())
    }

    /// A tokens client.
    pub fn tokens(&self) -> TokensServiceClient<Channel> {
        TokensServiceClient::new(self.channel.clone())
    }

    /// Creates a person account (as the operator) and signs it in: the
    /// account and a session token.
    pub async fn person(&self, username: &str) -> (pb::Account, String) {
        let account = self
            .accounts()
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: username.into(),
                    password: PASSWORD.into(),
                    email: format!("{username}@example.com"),
                    kind: pb::AccountKind::Person as i32,
                    role: 0,
                },
                &self.operator_token,
            ))
            .await
            .expect("create a person")
            .into_inner()
            .account
            .expect("account");
        let session = self
            .accounts()
            .sign_in(pb::SignInRequest {
                username: username.into(),
                password: PASSWORD.into(),
            })
            .await
            .expect("sign in")
            .into_inner()
            .session_token;
        (account, session)
    }

    /// Creates a robot account (as the operator).
    pub async fn robot(&self, username: &str) -> pb::Account {
        self.accounts()
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: username.into(),
                    kind: pb::AccountKind::Robot as i32,
                    ..Default::default()
                },
                &self.operator_token,
            ))
            .await
            .expect("create a robot")
            .into_inner()
            .account
            .expect("account")
    }

    /// Issues a token for `account_id` with `scopes`, as `creator`: its
    /// metadata and secret.
    pub async fn token(
        &self,
        creator: &str,
        account_id: &str,
        name: &str,
        scopes: &[&str],
    ) -> (pb::Token, String) {
        let created = self
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: account_id.into(),
                    name: name.into(),
                    scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
                creator,
            ))
            .await
            .expect("create a token")
            .into_inner();
        (created.token.expect("token"), created.secret)
    }

    /// A token of the operator `ops` granted `tokens:verify` (and nothing
    /// else), for calling `VerifyToken`; created on first use.
    pub async fn verifier_token(&self) -> String {
        self.verifier_token
            .get_or_init(|| async {
                let ops = self
                    .accounts()
                    .get_account(bearer(
                        pb::GetAccountRequest {
                            lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
                        },
                        &self.operator_token,
                    ))
                    .await
                    .expect("look up the operator")
                    .into_inner()
                    .account
                    .expect("account");
                let name = format!("verifier-{}", uuid::Uuid::now_v7());
                self.token(
                    &self.operator_token,
                    &ops.account_id,
                    &name,
                    &["tokens:verify"],
                )
                .await
                .1
            })
            .await
            .clone()
    }

    /// Verifies `token` with [`Self::verifier_token`], requiring `scopes`.
    pub async fn verify(&self, token: &str, scopes: &[&str]) -> pb::VerifyTokenResponse {
        self.verify_for(token, scopes, &[]).await
    }

    /// Verifies `token` as [`Self::verify`] does, requiring `resources` too.
    pub async fn verify_for(
        &self,
        token: &str,
        scopes: &[&str],
        resources: &[&str],
    ) -> pb::VerifyTokenResponse {
        self.tokens()
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: token.into(),
                    required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                    required_resources: resources.iter().map(|s| (*s).to_owned()).collect(),
                    ..Default::default()
                },
                &self.verifier_token().await,
            ))
            .await
            .expect("verify")
            .into_inner()
    }
}

impl TestApp {
    /// The audit events of `account_id` of the given types, newest first, as
    /// the operator lists them.
    pub async fn audit(
        &self,
        account_id: &str,
        types: &[pb::AuditEventType],
    ) -> Vec<pb::AuditEvent> {
        pb::audit_service_client::AuditServiceClient::new(self.channel.clone())
            .list_audit_events(bearer(
                pb::ListAuditEventsRequest {
                    account_id: account_id.into(),
                    types: types.iter().map(|t| *t as i32).collect(),
                    page_size: 1000,
                    ..Default::default()
                },
                &self.operator_token,
            ))
            .await
            .expect("list audit events")
            .into_inner()
            .events
    }
}

/// The plaintext endpoint of a server at `addr`.
pub fn plaintext(addr: SocketAddr) -> Endpoint {
    Channel::from_shared(format!("http://{addr}")).expect("valid uri")
}

/// A password that meets the default policy.
pub const PASSWORD: &str = "tulip orbit canyon 47";

/// Signs `username` in with `password`: the session token, or the refusal.
pub async fn sign_in(app: &TestApp, username: &str, password: &str) -> Result<String, Status> {
    app.accounts()
        .sign_in(pb::SignInRequest {
            username: username.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().session_token)
}

/// Wraps `message` in a request carrying `authorization: Bearer <token>`.
pub fn bearer<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).expect("ascii token"),
    );
    request
}

/// The `ErrorInfo` reason of a status.
pub fn reason(status: &Status) -> String {
    use tonic_types::StatusExt as _;
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

/// Asserts that `result` failed with `code` and ErrorInfo `reason`.
#[track_caller]
pub fn assert_status<T: std::fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    expected_reason: &str,
) -> Status {
    let status = result.expect_err("the call should have failed");
    assert_eq!(status.code(), code, "unexpected status: {status:?}");
    assert_eq!(
        reason(&status),
        expected_reason,
        "unexpected reason: {status:?}"
    );
    status
}

/// The polled change feed as the tests run it: at the default interval.
pub const POLL_FEED: ChangeFeed = ChangeFeed::Poll {
    interval: Duration::from_millis(25),
};

/// Runs the test `async fn $name(feed: ChangeFeed)` of the calling module,
/// which starts its servers on PostgreSQL with that change feed
/// ([`TestApp::spawn_on_feed`]), once per feed, as `$name::notify` and
/// `$name::poll`: `both_feeds!(name);` after the function.
#[macro_export]
macro_rules! both_feeds {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn notify() {
                super::$name(identity::storage::ChangeFeed::Notify).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poll() {
                super::$name($crate::support::POLL_FEED).await;
            }
        }
    };
}

/// Runs the test `async fn $name(app: TestApp)` of the calling module once
/// per backend, as `$name::sqlite` and `$name::postgres`, each with a fresh
/// server: `both_backends!(name);` after the function.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            use $crate::support::{Backend, TestApp};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(TestApp::spawn(Backend::Sqlite).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(TestApp::spawn(Backend::Postgres).await).await;
            }
        }
    };
}
