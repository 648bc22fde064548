//! Faults: what the service does when its database goes away, when it is
//! killed, and when its database stalls. Calls must fail fast with the right
//! code (never INTERNAL, never a hang past their deadline), health must
//! follow the database and come back by itself, and nothing acknowledged may
//! be lost or half-written.
//!
//! - `postgres_outage_…`: PostgreSQL stopped (immediate, then fast) and
//!   started again under a mixed load of verifications, sign-ins, creations
//!   and revocations from several tasks.
//! - `sigkill_mid_writes_…`: the real binary killed with SIGKILL while it
//!   creates and revokes, then started again; on both stores.
//! - `a_stalled_database_…`: another client holds the write lock while a
//!   flood of calls meets a one-connection pool; on both stores.
//!
//! The PostgreSQL outage runs on a [`Cluster`] of the test's own, never on
//! the cluster every other test shares. Invariants are checked in SQL, on
//! the database itself: every token, revocation and session has exactly the
//! audit event written in its transaction, and every event its change.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use identity::app::LIVENESS_SERVICE;
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    support::binary::{Server, bootstrap_operator, printed_token, sqlite_file},
    support::{
        Backend, PASSWORD, TestApp, TestDatabase, bearer,
        pb::{
            self, accounts_service_client::AccountsServiceClient,
            tokens_service_client::TokensServiceClient,
        },
        postgres::{Cluster, StopMode},
    },
};

/// The deadline every call of the load sets (`grpc-timeout`).
const CALL_DEADLINE: Duration = Duration::from_secs(2);
/// How far past its deadline a call may end before it counts as a hang:
/// scheduling on a busy two-core machine, not server work.
const HANG_SLACK: Duration = Duration::from_secs(2);
/// Concurrent load tasks.
const WORKERS: usize = 4;
/// How long health may take to follow the database, either way.
const HEALTH_FOLLOWS_WITHIN: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The mixed load
// ---------------------------------------------------------------------------

/// What the load needs to know about the server and its data.
#[derive(Clone)]
struct Target {
    channel: Channel,
    operator: String,
    /// The robot whose tokens the load creates.
    robot_id: String,
    /// The person the load signs in as.
    username: String,
    /// A token the load verifies.
    probe: String,
    /// A token granted `tokens:verify`, to verify with (full access does not
    /// include the scope).
    verifier: String,
    /// Tokens the load revokes, one each, until there are none left.
    revocable: Arc<Mutex<Vec<(String, String)>>>,
}

/// Every write the server acknowledged.
#[derive(Debug, Default)]
struct Acknowledged {
    /// Created tokens: id and secret.
    created: Vec<(String, String)>,
    /// Revoked tokens: id and secret.
    revoked: Vec<(String, String)>,
    /// Session tokens of successful sign-ins.
    sessions: Vec<String>,
}

/// How the calls of one phase of the load ended.
#[derive(Debug, Default)]
struct Outcomes {
    ok: usize,
    /// Failures by code.
    failed: BTreeMap<i32, usize>,
    /// Failures with a code outside the allowed ones: what and why.
    unexpected: Vec<String>,
    /// Calls that ran past their deadline (plus slack).
    hung: Vec<String>,
}

impl Outcomes {
    fn failures(&self, code: Code) -> usize {
        self.failed.get(&(code as i32)).copied().unwrap_or(0)
    }

    fn merge(&mut self, other: Outcomes) {
        self.ok += other.ok;
        for (code, n) in other.failed {
            *self.failed.entry(code).or_default() += n;
        }
        self.unexpected.extend(other.unexpected);
        self.hung.extend(other.hung);
    }
}

/// The load's shared record: outcomes per phase and what was acknowledged.
#[derive(Default)]
struct Record {
    phases: Mutex<BTreeMap<&'static str, Outcomes>>,
    acked: Mutex<Acknowledged>,
    phase: Mutex<&'static str>,
}

impl Record {
    fn set_phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = phase;
    }

    fn outcomes(&self, phase: &'static str) -> Outcomes {
        self.phases
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(phase)
            .unwrap_or_default()
    }

    fn acked(&self) -> std::sync::MutexGuard<'_, Acknowledged> {
        self.acked.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `message` as `token`'s, with the load's deadline.
fn call<T>(message: T, token: &str) -> Request<T> {
    let mut request = bearer(message, token);
    request.set_timeout(CALL_DEADLINE);
    request
}

/// One load task: verifies, signs in, creates and revokes tokens in turn
/// until `stop`, recording every outcome under the current phase. Failures
/// with a code outside `allowed` are recorded as unexpected.
async fn worker(
    target: Target,
    id: usize,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    allowed: &'static [Code],
) {
    let mut tokens = TokensServiceClient::new(target.channel.clone());
    let mut accounts = AccountsServiceClient::new(target.channel.clone());
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let phase = *record.phase.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let (what, result): (&str, Result<(), tonic::Status>) = match i % 4 {
            0 => {
                let result = tokens
                    .verify_token(call(
                        pb::VerifyTokenRequest {
                            token: target.probe.clone(),
                            ..Default::default()
                        },
                        &target.verifier,
                    ))
                    .await;
                let result = result.and_then(|r| {
                    if r.into_inner().active {
                        Ok(())
                    } else {
                        Err(tonic::Status::internal("the probe token reads as inactive"))
                    }
                });
                ("VerifyToken", result)
            }
            1 => {
                let mut request = Request::new(pb::SignInRequest {
                    username: target.username.clone(),
                    password: PASSWORD.into(),
                });
                request.set_timeout(CALL_DEADLINE);
                let result = accounts.sign_in(request).await.map(|r| {
                    record.acked().sessions.push(r.into_inner().session_token);
                });
                ("SignIn", result)
            }
            2 => {
                let result = tokens
                    .create_token(call(
                        pb::CreateTokenRequest {
                            account_id: target.robot_id.clone(),
                            name: format!("load-{id}-{i}"),
                            scopes: vec!["project:read".into()],
                            ..Default::default()
                        },
                        &target.operator,
                    ))
                    .await
                    .map(|r| {
                        let created = r.into_inner();
                        let token = created.token.expect("a created token");
                        record
                            .acked()
                            .created
                            .push((token.token_id, created.secret));
                    });
                ("CreateToken", result)
            }
            _ => {
                let next = target
                    .revocable
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                let Some((token_id, secret)) = next else {
                    continue;
                };
                let result = tokens
                    .revoke_token(call(
                        pb::RevokeTokenRequest {
                            token_id: token_id.clone(),
                        },
                        &target.operator,
                    ))
                    .await
                    .map(|_| record.acked().revoked.push((token_id, secret)));
                ("RevokeToken", result)
            }
        };
        let elapsed = started.elapsed();
        {
            let mut phases = record.phases.lock().unwrap_or_else(PoisonError::into_inner);
            let outcomes = phases.entry(phase).or_default();
            if elapsed > CALL_DEADLINE + HANG_SLACK {
                outcomes
                    .hung
                    .push(format!("{what} took {elapsed:?}: {result:?}"));
            }
            match result {
                Ok(()) => outcomes.ok += 1,
                Err(status) => {
                    *outcomes.failed.entry(status.code() as i32).or_default() += 1;
                    if !allowed.contains(&status.code()) {
                        outcomes
                            .unexpected
                            .push(format!("{what} after {elapsed:?}: {status:?}"));
                    }
                }
            }
        }
        if elapsed < Duration::from_millis(5) {
            // A server that refuses at once must not turn the load into a
            // busy loop that starves the server of the machine's two cores.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Sets up what the load needs on the server at `channel`: a person, a
/// robot, a probe token and `revocable` tokens to revoke.
async fn prepare(channel: Channel, operator: &str, revocable: usize) -> Target {
    let mut accounts = AccountsServiceClient::new(channel.clone());
    let mut tokens = TokensServiceClient::new(channel.clone());
    let username = "loaded".to_owned();
    accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: username.clone(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            operator,
        ))
        .await
        .expect("create the person");
    let robot_id = accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "loader".into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            operator,
        ))
        .await
        .expect("create the robot")
        .into_inner()
        .account
        .expect("account")
        .account_id;
    let mut create = async |name: String| {
        let created = tokens
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: robot_id.clone(),
                    name,
                    ..Default::default()
                },
                operator,
            ))
            .await
            .expect("create a token")
            .into_inner();
        (created.token.expect("token").token_id, created.secret)
    };
    let (_, probe) = create("probe".into()).await;
    let mut to_revoke = Vec::new();
    for n in 0..revocable {
        to_revoke.push(create(format!("revocable-{n}")).await);
    }
    let verifier = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: robot_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            operator,
        ))
        .await
        .expect("create the verifier token")
        .into_inner()
        .secret;
    Target {
        channel,
        operator: operator.to_owned(),
        robot_id,
        username,
        probe,
        verifier,
        revocable: Arc::new(Mutex::new(to_revoke)),
    }
}

/// The load, running.
struct Load {
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(target: &Target, allowed: &'static [Code]) -> Self {
        let record = Arc::new(Record::default());
        record.set_phase("before");
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WORKERS)
            .map(|id| {
                tokio::spawn(worker(
                    target.clone(),
                    id,
                    Arc::clone(&record),
                    Arc::clone(&stop),
                    allowed,
                ))
            })
            .collect();
        Self {
            record,
            stop,
            tasks,
        }
    }

    /// Stops the load and waits for its tasks (none may have panicked).
    async fn finish(self) -> Arc<Record> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            tokio::time::timeout(CALL_DEADLINE + HANG_SLACK * 2, task)
                .await
                .expect("a load task hung")
                .expect("a load task panicked");
        }
        self.record
    }
}

// ---------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------

/// The services whose health follows the database.
const SERVICES: [&str; 4] = [
    "",
    "identity.v1.AccountsService",
    "identity.v1.TokensService",
    "identity.v1.AuditService",
];

/// The health status of `service`, asked with a short deadline: health must
/// answer at once whatever the database does.
async fn health_of(channel: &Channel, service: &str) -> ServingStatus {
    let mut request = Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(2));
    let status = HealthClient::new(channel.clone())
        .check(request)
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known serving status")
}

/// Waits until every service reports `expected`, panicking after
/// [`HEALTH_FOLLOWS_WITHIN`]. Returns how long it took.
async fn await_health(channel: &Channel, expected: ServingStatus) -> Duration {
    let started = Instant::now();
    loop {
        let mut all = true;
        for service in SERVICES {
            all &= health_of(channel, service).await == expected;
        }
        if all {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < HEALTH_FOLLOWS_WITHIN,
            "health did not become {expected:?} within {HEALTH_FOLLOWS_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After recovery: every acknowledged creation and sign-in is in force,
/// every acknowledged revocation too.
async fn assert_acknowledged_writes_hold(channel: &Channel, verifier: &str, acked: &Acknowledged) {
    let mut tokens = TokensServiceClient::new(channel.clone());
    let verify = async |tokens: &mut TokensServiceClient<Channel>, secret: &str| {
        tokens
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: secret.into(),
                    ..Default::default()
                },
                verifier,
            ))
            .await
            .expect("verify after recovery")
            .into_inner()
    };
    for (id, secret) in &acked.created {
        let verdict = verify(&mut tokens, secret).await;
        assert!(
            verdict.active,
            "acknowledged token {id} is not active after recovery: {verdict:?}"
        );
    }
    for session in &acked.sessions {
        let verdict = verify(&mut tokens, session).await;
        assert!(
            verdict.active,
            "an acknowledged session is not active after recovery: {verdict:?}"
        );
    }
    for (id, secret) in &acked.revoked {
        let verdict = verify(&mut tokens, secret).await;
        assert!(
            !verdict.active && verdict.reason == pb::InactiveReason::Revoked as i32,
            "acknowledged revocation of {id} is not in force after recovery: {verdict:?}"
        );
    }
}

/// Queries that count broken invariants: each must return 0. Written in
/// the SQL both stores speak.
const INVARIANTS: &[(&str, &str)] = &[
    (
        "a token without its token.created event",
        "SELECT COUNT(*) FROM tokens t WHERE NOT EXISTS (SELECT 1 FROM audit_events e \
         WHERE e.event_type = 'token.created' AND e.subject_credential_id = t.token_id)",
    ),
    (
        "a token.created event without its token",
        "SELECT COUNT(*) FROM audit_events e WHERE e.event_type = 'token.created' \
         AND NOT EXISTS (SELECT 1 FROM tokens t WHERE t.token_id = e.subject_credential_id)",
    ),
    (
        "a revoked token without its token.revoked event",
        "SELECT COUNT(*) FROM tokens t WHERE t.revoke_time IS NOT NULL AND NOT EXISTS \
         (SELECT 1 FROM audit_events e WHERE e.event_type = 'token.revoked' \
         AND e.subject_credential_id = t.token_id)",
    ),
    (
        "a token.revoked event whose token is not revoked",
        "SELECT COUNT(*) FROM audit_events e WHERE e.event_type = 'token.revoked' \
         AND NOT EXISTS (SELECT 1 FROM tokens t WHERE t.token_id = e.subject_credential_id \
         AND t.revoke_time IS NOT NULL)",
    ),
    (
        "a revoked token that still holds its live name",
        "SELECT COUNT(*) FROM tokens WHERE revoke_time IS NOT NULL AND live_name IS NOT NULL",
    ),
    (
        "a session without its successful session.sign_in event",
        "SELECT COUNT(*) FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM audit_events e \
         WHERE e.event_type = 'session.sign_in' AND e.outcome = 'success' \
         AND e.subject_credential_id = s.session_id)",
    ),
    (
        "a successful session.sign_in event without its session",
        "SELECT COUNT(*) FROM audit_events e WHERE e.event_type = 'session.sign_in' \
         AND e.outcome = 'success' AND NOT EXISTS \
         (SELECT 1 FROM sessions s WHERE s.session_id = e.subject_credential_id)",
    ),
    (
        "an account without its account.created event",
        "SELECT COUNT(*) FROM accounts a WHERE NOT EXISTS (SELECT 1 FROM audit_events e \
         WHERE e.event_type = 'account.created' AND e.subject_account_id = a.account_id)",
    ),
];

/// Checks [`INVARIANTS`] on the database at `url`, and that it holds at
/// least `tokens` tokens.
async fn assert_invariants(url: &str, tokens: usize) {
    let mut broken = Vec::new();
    let mut count = |what: &'static str, n: i64| {
        if n != 0 {
            broken.push(format!("{n} × {what}"));
        }
    };
    let stored: i64 = if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("open SQLite");
        for (what, query) in INVARIANTS {
            count(
                what,
                sqlx::query_scalar(query)
                    .fetch_one(&pool)
                    .await
                    .expect(what),
            );
        }
        let stored = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&pool)
            .await
            .expect("count tokens");
        pool.close().await;
        stored
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("open PostgreSQL");
        for (what, query) in INVARIANTS {
            count(
                what,
                sqlx::query_scalar(query)
                    .fetch_one(&pool)
                    .await
                    .expect(what),
            );
        }
        let stored = sqlx::query_scalar("SELECT COUNT(*) FROM tokens")
            .fetch_one(&pool)
            .await
            .expect("count tokens");
        pool.close().await;
        stored
    };
    assert!(broken.is_empty(), "half-done writes: {broken:?}");
    assert!(
        stored >= i64::try_from(tokens).expect("small"),
        "{stored} tokens stored, {tokens} acknowledged"
    );
}

// ---------------------------------------------------------------------------
// PostgreSQL stopped and started again under load
// ---------------------------------------------------------------------------

/// Runs `f` on `cluster` off the runtime's worker threads (`pg_ctl` blocks
/// for seconds, and the server under test runs on those threads).
async fn on_cluster(cluster: &Arc<Cluster>, f: impl FnOnce(&Cluster) + Send + 'static) {
    let cluster = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || f(&cluster))
        .await
        .expect("a cluster operation panicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_fails_calls_fast_and_the_service_recovers_by_itself() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("start a cluster"),
    );
    let url = cluster.fresh_database_url().await;
    let app = TestApp::spawn_on(
        TestDatabase::at(url.clone()),
        None,
        |config| {
            config.health_interval = Duration::from_millis(100);
            config.pool.acquire_timeout = Duration::from_secs(1);
            config.request_timeout = Duration::from_secs(5);
        },
        crate::support::plaintext,
    )
    .await;
    let target = prepare(app.channel.clone(), &app.operator_token, 100).await;
    let load = Load::start(&target, &[Code::Unavailable]);
    let mut report = Vec::new();

    for mode in [StopMode::Immediate, StopMode::Fast] {
        load.record.set_phase("before");
        tokio::time::sleep(Duration::from_millis(700)).await;

        load.record.set_phase("outage");
        on_cluster(&cluster, move |c| c.stop(mode)).await;
        // The change channel's connection is gone with the database, so
        // the cache is bypassed at once (a revocation made by another
        // replica meanwhile could not be heard): well before the second a
        // reconnection attempt would wait for a connection.
        let stopped = Instant::now();
        while app.identity.cache().is_enabled() {
            assert!(
                stopped.elapsed() < Duration::from_millis(400),
                "the verification cache is still in use after the database went down"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let to_not_serving = await_health(&app.channel, ServingStatus::NotServing).await;
        assert_eq!(
            health_of(&app.channel, LIVENESS_SERVICE).await,
            ServingStatus::Serving,
            "liveness must not follow the database"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;

        load.record.set_phase("recovery");
        on_cluster(&cluster, Cluster::resume).await;
        let to_serving = await_health(&app.channel, ServingStatus::Serving).await;
        // Calls succeed again without a restart of the service.
        let recovered = Instant::now();
        loop {
            let mut tokens = app.tokens();
            let answer = tokens
                .verify_token(call(
                    pb::VerifyTokenRequest {
                        token: target.probe.clone(),
                        ..Default::default()
                    },
                    &target.verifier,
                ))
                .await;
            if answer.is_ok() {
                break;
            }
            assert!(
                recovered.elapsed() < HEALTH_FOLLOWS_WITHIN,
                "calls still fail after the database came back: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The LISTEN task reconnects by itself, and the cache is used again.
        while !app.identity.cache().is_enabled() {
            assert!(
                recovered.elapsed() < HEALTH_FOLLOWS_WITHIN,
                "the change channel did not come back after the database did"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let channel_back = recovered.elapsed();
        load.record.set_phase("after");
        tokio::time::sleep(Duration::from_millis(700)).await;
        load.record.set_phase("done");

        let mut outage = load.record.outcomes("outage");
        outage.merge(load.record.outcomes("recovery"));
        let before = load.record.outcomes("before");
        let after = load.record.outcomes("after");
        report.push(format!(
            "{mode:?}: before {before:?}; outage {outage:?}; after {after:?}; \
             NOT_SERVING after {to_not_serving:?}, SERVING {to_serving:?} after the restart, \
             change channel back {channel_back:?} after that"
        ));
        for (phase, outcomes) in [("before", &before), ("outage", &outage), ("after", &after)] {
            assert!(
                outcomes.unexpected.is_empty() && outcomes.hung.is_empty(),
                "{mode:?}, {phase}: {outcomes:#?}"
            );
        }
        assert!(before.ok > 0 && after.ok > 0, "{report:#?}");
        // Once the database is back, no call fails: not even on a pooled
        // connection that died while it was away.
        assert!(after.failed.is_empty(), "{report:#?}");
        assert!(
            outage.failures(Code::Unavailable) > 0,
            "no call saw the outage: {report:#?}"
        );
    }
    let record = load.finish().await;
    eprintln!("{}", report.join("\n"));
    let done = record.outcomes("done");
    assert!(
        done.unexpected.is_empty() && done.hung.is_empty(),
        "after the last recovery: {done:#?}"
    );

    let acked = std::mem::take(&mut *record.acked());
    assert!(!acked.created.is_empty() && !acked.revoked.is_empty() && !acked.sessions.is_empty());
    assert_acknowledged_writes_hold(&app.channel, &target.verifier, &acked).await;
    assert_invariants(&url, acked.created.len()).await;
    app.stop().await;

    quiet_restart_fails_no_call(&cluster).await;
}

/// A server whose pool holds idle connections when the database restarts,
/// and which makes no query while it is away (its health probe is slowed
/// down), must not fail a call on one of those dead connections once the
/// database is back.
async fn quiet_restart_fails_no_call(cluster: &Arc<Cluster>) {
    let url = cluster.fresh_database_url().await;
    let app = TestApp::spawn_on(
        TestDatabase::at(url),
        None,
        |config| {
            config.health_interval = Duration::from_secs(600);
        },
        crate::support::plaintext,
    )
    .await;
    let robot = app.robot("quiet").await;
    // Several calls at once open several connections.
    let create = |n: usize| {
        let mut tokens = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: format!("quiet-{n}"),
                ..Default::default()
            },
            &app.operator_token,
        );
        async move { tokens.create_token(request).await.map(drop) }
    };
    let at_once: Vec<_> = (0..8).map(|n| tokio::spawn(create(n))).collect();
    for call in at_once {
        call.await
            .expect("a call task")
            .expect("a creation before the restart");
    }
    on_cluster(cluster, |c| c.stop(StopMode::Fast)).await;
    on_cluster(cluster, Cluster::resume).await;
    // The lost change channel makes the replica probe at once however slow
    // its interval, and the probe saw the database away: until a probe
    // sees it back (every 50 ms while NOT_SERVING) calls are refused by
    // design. What is tested here is the pool: past that gate, no call may
    // fail on one of the idle connections that died meanwhile (the probe
    // itself replaces at most one of the eight).
    await_health(&app.channel, ServingStatus::Serving).await;
    let mut failures = Vec::new();
    for n in 8..24 {
        if let Err(status) = create(n).await {
            failures.push(status);
        }
    }
    assert!(
        failures.is_empty(),
        "calls failed after the database was back: {failures:#?}"
    );
    app.stop().await;
}

// ---------------------------------------------------------------------------
// The server killed in the middle of writes
// ---------------------------------------------------------------------------

/// Every code: once the server is killed, calls fail however the transport
/// reports it; what matters is what was acknowledged before.
const ANY_CODE: &[Code] = &[
    Code::Cancelled,
    Code::Unknown,
    Code::DeadlineExceeded,
    Code::Unavailable,
    Code::Internal,
];

/// Starts the binary on `url`, runs the mixed load, kills the server with
/// SIGKILL once it has acknowledged some of every write, starts it again
/// and checks that every acknowledged write holds and none is half-done.
async fn sigkill_loses_nothing_acknowledged_on(url: &str) {
    let operator = printed_token(&bootstrap_operator(url, "ops", &[]).await);
    // The load creates tokens for one account far faster than the
    // per-account creation rate, which is not under test.
    const UNLIMITED: &[(&str, &str)] = &[("IDENTITY_TOKEN_CREATIONS_PER_MINUTE", "1000000")];
    let mut server = Server::start(url, UNLIMITED).await;
    let target = prepare(server.channel().await, &operator, 100).await;
    let load = Load::start(&target, ANY_CODE);
    let started = Instant::now();
    loop {
        {
            let acked = load.record.acked();
            if acked.created.len() >= 15 && acked.revoked.len() >= 15 {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the load did not get going: {:?}",
            load.record.outcomes("before")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Calls are in flight: the load never pauses.
    server.process.signal("KILL");
    let killed = server
        .process
        .wait_timeout(Duration::from_secs(5))
        .await
        .expect("the server exited after SIGKILL");
    assert!(!killed.success(), "killed: {killed}");
    let record = load.finish().await;
    let acked = std::mem::take(&mut *record.acked());

    let server = Server::start(url, UNLIMITED).await;
    let channel = server.channel().await;
    assert_acknowledged_writes_hold(&channel, &target.verifier, &acked).await;
    assert_invariants(url, acked.created.len()).await;
    eprintln!(
        "killed after {} creations, {} revocations, {} sign-ins acknowledged",
        acked.created.len(),
        acked.revoked.len(),
        acked.sessions.len()
    );
    server.terminate().await;
}

mod sigkill_mid_writes_loses_nothing_acknowledged {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (_dir, _, url) = sqlite_file();
        sigkill_loses_nothing_acknowledged_on(&url).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let db = TestDatabase::new(Backend::Postgres).await;
        sigkill_loses_nothing_acknowledged_on(&db.url).await;
    }
}

// ---------------------------------------------------------------------------
// A stalled database: a held lock, an exhausted pool, a flood of calls
// ---------------------------------------------------------------------------

/// The resident set size of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .expect("a VmRSS line")
}

/// A token creation as the operator, with `deadline`: its code (OK for
/// success) and how long it took. Creation writes, so it stalls on both
/// stores while another client holds the write lock.
async fn timed_create(target: &Target, deadline: Duration) -> (Code, Duration) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let mut request = bearer(
        pb::CreateTokenRequest {
            account_id: target.robot_id.clone(),
            name: format!("stalled-{}", NEXT.fetch_add(1, Ordering::Relaxed)),
            ..Default::default()
        },
        &target.operator,
    );
    request.set_timeout(deadline);
    let started = Instant::now();
    let answer = TokensServiceClient::new(target.channel.clone())
        .create_token(request)
        .await;
    let code = match answer {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    };
    (code, started.elapsed())
}

/// A transaction of another client that holds the write lock on the
/// tokens: `LOCK TABLE … IN ACCESS EXCLUSIVE MODE` on PostgreSQL (reads
/// stall too), `BEGIN EXCLUSIVE` on SQLite (readers go on, in WAL mode).
enum Locker {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl Locker {
    async fn lock(url: &str) -> Self {
        use sqlx::Connection as _;
        if url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(url)
                .await
                .expect("connect the locker");
            sqlx::raw_sql("BEGIN EXCLUSIVE")
                .execute(&mut conn)
                .await
                .expect("take the write lock");
            Self::Sqlite(conn)
        } else {
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .expect("connect the locker");
            sqlx::raw_sql("BEGIN; LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
                .execute(&mut conn)
                .await
                .expect("lock the tokens table");
            Self::Postgres(conn)
        }
    }

    async fn release(self) {
        match self {
            Self::Postgres(mut conn) => {
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.map(drop)
            }
            Self::Sqlite(mut conn) => sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.map(drop),
        }
        .expect("release the lock");
    }
}

/// Runs the real binary (so its memory can be read from /proc) on `url`
/// with one database connection (every stalled call queues for it; on
/// PostgreSQL this also proves the change channel does not take it), a
/// one-second request timeout, four calls at once and no cache; holds the
/// write lock from another connection while 64 callers flood it, then
/// releases it.
async fn a_stalled_database_is_survived_on(url: &str) {
    const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
    let operator = printed_token(&bootstrap_operator(url, "ops", &[]).await);
    let server = Server::start(
        url,
        &[
            ("IDENTITY_DB_MAX_CONNECTIONS", "1"),
            // The flood creates tokens for one account far faster than the
            // per-account creation rate: that limit is not under test.
            ("IDENTITY_TOKEN_CREATIONS_PER_MINUTE", "1000000"),
            ("IDENTITY_DB_ACQUIRE_TIMEOUT", "500ms"),
            ("IDENTITY_REQUEST_TIMEOUT", "1s"),
            ("IDENTITY_MAX_CONCURRENT_REQUESTS", "4"),
            ("IDENTITY_CACHE_ENTRIES", "0"),
        ],
    )
    .await;
    let pid = server.process.id();
    let target = prepare(server.channel().await, &operator, 0).await;
    assert_eq!(timed_create(&target, CALL_DEADLINE).await.0, Code::Ok);
    let rss_before = rss_kib(pid);

    let locker = Locker::lock(url).await;

    // A flood: 64 callers whose own deadline (5 s) is longer than the
    // server's request timeout, for three seconds.
    let flood_ends = Instant::now() + Duration::from_secs(3);
    let callers: Vec<_> = (0..64)
        .map(|_| {
            let target = target.clone();
            tokio::spawn(async move {
                let mut seen: Vec<(Code, Duration)> = Vec::new();
                while Instant::now() < flood_ends {
                    let outcome = timed_create(&target, Duration::from_secs(5)).await;
                    seen.push(outcome);
                    if outcome.1 < Duration::from_millis(5) {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                seen
            })
        })
        .collect();

    // Meanwhile: a client's own short deadline is honoured, health answers
    // (and liveness stays SERVING), and memory stays put.
    let mut peak_rss = rss_before;
    let mut short: Vec<(Code, Duration)> = Vec::new();
    while Instant::now() < flood_ends {
        short.push(timed_create(&target, Duration::from_millis(300)).await);
        // Each check has a two-second deadline: an answer is the point.
        health_of(&target.channel, "").await;
        assert_eq!(
            health_of(&target.channel, LIVENESS_SERVICE).await,
            ServingStatus::Serving
        );
        peak_rss = peak_rss.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut outcomes: BTreeMap<i32, usize> = BTreeMap::new();
    let mut slowest = Duration::ZERO;
    let mut calls = 0;
    for caller in callers {
        for (code, took) in caller.await.expect("a caller panicked") {
            calls += 1;
            *outcomes.entry(code as i32).or_default() += 1;
            assert!(
                [
                    Code::ResourceExhausted,
                    Code::Cancelled,
                    Code::DeadlineExceeded,
                    Code::Unavailable
                ]
                .contains(&code),
                "a stalled call ended with {code:?} after {took:?}"
            );
            slowest = slowest.max(took);
        }
    }
    peak_rss = peak_rss.max(rss_kib(pid));
    eprintln!(
        "stall on {url}: {calls} flood calls by code {outcomes:?}, slowest {slowest:?}; \
         short-deadline calls {short:?}; RSS {rss_before} KiB before, peak {peak_rss} KiB"
    );
    assert!(
        slowest < REQUEST_TIMEOUT + HANG_SLACK,
        "a call outlived the request timeout: {slowest:?}"
    );
    assert!(
        outcomes
            .get(&(Code::ResourceExhausted as i32))
            .copied()
            .unwrap_or(0)
            > 0,
        "nothing was shed: {outcomes:?}"
    );
    for (code, took) in &short {
        assert!(
            [
                Code::DeadlineExceeded,
                Code::Cancelled,
                Code::ResourceExhausted,
                Code::Unavailable
            ]
            .contains(code)
                && *took < Duration::from_millis(300) + HANG_SLACK,
            "a call with a 300 ms deadline ended with {code:?} after {took:?}"
        );
    }
    assert!(
        peak_rss < rss_before + 64 * 1024,
        "memory grew from {rss_before} KiB to {peak_rss} KiB during the stall"
    );

    // The lock goes: the service recovers by itself.
    locker.release().await;
    let released = Instant::now();
    loop {
        let (code, _) = timed_create(&target, CALL_DEADLINE).await;
        if code == Code::Ok {
            break;
        }
        assert!(
            released.elapsed() < HEALTH_FOLLOWS_WITHIN,
            "still failing ({code:?}) {:?} after the lock was released",
            released.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    await_health(&target.channel, ServingStatus::Serving).await;
    server.terminate().await;
    assert_invariants(url, 1).await;
}

mod a_stalled_database_ends_calls_in_time_sheds_the_excess_and_recovers {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        let (_dir, _, url) = sqlite_file();
        a_stalled_database_is_survived_on(&url).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        let db = TestDatabase::new(Backend::Postgres).await;
        a_stalled_database_is_survived_on(&db.url).await;
    }
}
