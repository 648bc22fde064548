//! A failover under load (README, "High availability"): two replicas of the
//! real binary with `DATABASE_URL` and `IDENTITY_DATABASE_LISTEN_URL` at
//! HAProxy in front of two Patroni nodes in synchronous mode
//! ([`HaCluster`]); verifications, token creations, revocations and
//! sign-ins running on both; the primary's postmaster killed. Neither
//! replica is restarted, every call fails only with UNAVAILABLE, health
//! goes NOT_SERVING and back by itself, each replica's change channel
//! reconnects (and so starts from an empty cache), no revoked credential is
//! ever answered active, and every write acknowledged before the kill is
//! there afterwards. The unavailability (from the kill until the first
//! successful write) and the calls by code while it lasted are printed
//! (BENCHMARKS.md, "Failover").

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tonic::{Code, Request, Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    PASSWORD, bearer,
    binary::{Server, bootstrap_operator, printed_token},
    ha::HaCluster,
    pb,
    pb::{
        accounts_service_client::AccountsServiceClient, tokens_service_client::TokensServiceClient,
    },
};

/// How long the load runs before the kill, and after the first successful
/// write that follows it.
const STEADY: Duration = Duration::from_millis(1500);
/// The longest the test waits for the service to write again (a bound that
/// fails the test, not a measurement).
const RECOVERY_BOUND: Duration = Duration::from_secs(60);
/// Each call's own deadline: a call that hangs fails the test as
/// DEADLINE_EXCEEDED instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// One call of the load: what, when it ended, and its outcome.
struct Call {
    op: &'static str,
    replica: &'static str,
    started: Instant,
    ended: Instant,
    code: Code,
}

/// The health statuses a replica reported, as they came.
type Statuses = Arc<Mutex<Vec<(Instant, ServingStatus)>>>;

/// What the load saw, shared by its tasks.
#[derive(Default)]
struct Record {
    calls: Mutex<Vec<Call>>,
    /// Tokens whose creation was acknowledged and whose revocation was not
    /// tried: (token id, secret).
    live: Mutex<Vec<(String, String)>>,
    /// Tokens whose revocation was acknowledged, and when.
    revoked: Mutex<Vec<(String, String, Instant)>>,
    /// Anything that must never happen, described.
    violations: Mutex<Vec<String>>,
}

impl Record {
    fn call(
        &self,
        op: &'static str,
        replica: &'static str,
        started: Instant,
        outcome: &Result<(), Status>,
    ) {
        let code = match outcome {
            Ok(()) => Code::Ok,
            Err(status) => status.code(),
        };
        self.calls.lock().unwrap().push(Call {
            op,
            replica,
            started,
            ended: Instant::now(),
            code,
        });
    }

    fn violation(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }
}

fn with_timeout<T>(request: Request<T>) -> Request<T> {
    let mut request = request;
    request.set_timeout(CALL_TIMEOUT);
    request
}

async fn verify(channel: &Channel, verifier: &str, secret: &str) -> Result<bool, Status> {
    Ok(TokensServiceClient::new(channel.clone())
        .verify_token(with_timeout(bearer(
            pb::VerifyTokenRequest {
                token: secret.into(),
                ..Default::default()
            },
            verifier,
        )))
        .await?
        .into_inner()
        .active)
}

async fn create_token(
    channel: &Channel,
    operator: &str,
    account_id: &str,
    name: &str,
) -> Result<(String, String), Status> {
    let created = TokensServiceClient::new(channel.clone())
        .create_token(with_timeout(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.into(),
                name: name.into(),
                scopes: vec!["repo:read".into()],
                ..Default::default()
            },
            operator,
        )))
        .await?
        .into_inner();
    Ok((created.token.expect("token").token_id, created.secret))
}

async fn revoke(channel: &Channel, operator: &str, token_id: &str) -> Result<(), Status> {
    TokensServiceClient::new(channel.clone())
        .revoke_token(with_timeout(bearer(
            pb::RevokeTokenRequest {
                token_id: token_id.into(),
            },
            operator,
        )))
        .await
        .map(drop)
}

async fn sign_in(channel: &Channel) -> Result<(), Status> {
    AccountsServiceClient::new(channel.clone())
        .sign_in(with_timeout(Request::new(pb::SignInRequest {
            username: "alice".into(),
            password: PASSWORD.into(),
        })))
        .await
        .map(drop)
}

/// Verifies live and revoked tokens in turn until `stop`; a revoked one
/// answered active, when its revocation was acknowledged before the call
/// began, is a violation.
async fn verifier_task(
    channel: Channel,
    verifier: String,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    replica: &'static str,
) {
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let pick = if turn.is_multiple_of(2) {
            let revoked = record.revoked.lock().unwrap();
            (!revoked.is_empty()).then(|| {
                let (id, secret, acked) = &revoked[turn / 2 % revoked.len()];
                (id.clone(), secret.clone(), Some(*acked))
            })
        } else {
            let live = record.live.lock().unwrap();
            (!live.is_empty()).then(|| {
                let (id, secret) = &live[turn / 2 % live.len()];
                (id.clone(), secret.clone(), None)
            })
        };
        let Some((id, secret, revoked_at)) = pick else {
            tokio::task::yield_now().await;
            continue;
        };
        let started = Instant::now();
        let answer = verify(&channel, &verifier, &secret).await;
        if let (Ok(true), Some(acked)) = (&answer, revoked_at)
            && acked < started
        {
            record.violation(format!(
                "replica {replica} answered revoked token {id} active, {:?} after its \
                 revocation was acknowledged",
                started - acked
            ));
        }
        record.call("verify", replica, started, &answer.map(drop));
    }
}

/// Creates tokens and revokes every other one until `stop`, recording what
/// was acknowledged.
async fn writer_task(
    channel: Channel,
    operator: String,
    account_id: String,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    names: Arc<AtomicUsize>,
    replica: &'static str,
) {
    // A revocation whose outcome is unknown (it failed) is checked by no
    // one: it may or may not have happened.
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        turn += 1;
        let started = Instant::now();
        let name = format!("load-{}", names.fetch_add(1, Ordering::Relaxed));
        let created = create_token(&channel, &operator, &account_id, &name).await;
        record.call(
            "create",
            replica,
            started,
            &created.as_ref().map(drop).map_err(Clone::clone),
        );
        if let Ok((id, secret)) = created {
            if turn.is_multiple_of(2) {
                let started = Instant::now();
                let revoked = revoke(&channel, &operator, &id).await;
                record.call("revoke", replica, started, &revoked);
                if revoked.is_ok() {
                    record
                        .revoked
                        .lock()
                        .unwrap()
                        .push((id, secret, Instant::now()));
                }
            } else {
                record.live.lock().unwrap().push((id, secret));
            }
        }
        // Paced: the load is to be mixed, not to saturate two cores.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Signs alice in until `stop` (each sign-in is an argon2 hash and a
/// session written).
async fn sign_in_task(
    channel: Channel,
    record: Arc<Record>,
    stop: Arc<AtomicBool>,
    replica: &'static str,
) {
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let outcome = sign_in(&channel).await;
        record.call("sign-in", replica, started, &outcome);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Follows a replica's overall health with `Watch` (which reports every
/// change, so a short NOT_SERVING is not missed) and records each status.
async fn watch_health(channel: Channel, seen: Statuses) {
    let mut stream = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch health")
        .into_inner();
    while let Ok(Some(answer)) = stream.message().await {
        let status = ServingStatus::try_from(answer.status).expect("a known serving status");
        seen.lock().unwrap().push((Instant::now(), status));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load_fails_over_with_only_unavailable_and_no_write_lost() {
    let cluster = HaCluster::start().await;
    let url = cluster.create_database().await;
    let env = [
        // LISTEN must follow the primary too: through HAProxy as well.
        ("IDENTITY_DATABASE_LISTEN_URL", url.as_str()),
        ("IDENTITY_TOKEN_CREATIONS_PER_MINUTE", "100000"),
        ("IDENTITY_SIGN_IN_ACCOUNT_PER_MINUTE", "100000"),
        ("IDENTITY_SIGN_IN_ADDRESS_PER_MINUTE", "100000"),
        ("IDENTITY_MAX_TOKENS_PER_ACCOUNT", "100000"),
    ];
    let operator = printed_token(&bootstrap_operator(&url, "ops", &env).await);
    let a = Server::start(&url, &env).await;
    let b = Server::start(&url, &env).await;
    let (ca, cb) = (a.channel().await, b.channel().await);

    let ops = AccountsServiceClient::new(ca.clone())
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &operator,
        ))
        .await
        .expect("look up the operator")
        .into_inner()
        .account
        .expect("account");
    let verifier = TokensServiceClient::new(ca.clone())
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: ops.account_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create the verifier")
        .into_inner()
        .secret;
    let alice = AccountsServiceClient::new(ca.clone())
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "alice".into(),
                password: PASSWORD.into(),
                email: "alice@example.com".into(),
                kind: pb::AccountKind::Person as i32,
                role: 0,
            },
            &operator,
        ))
        .await
        .expect("create alice")
        .into_inner()
        .account
        .expect("account");

    let record = Arc::new(Record::default());
    let stop = Arc::new(AtomicBool::new(false));
    let names = Arc::new(AtomicUsize::new(0));
    let health: Vec<Statuses> = vec![Arc::default(), Arc::default()];
    let mut tasks = Vec::new();
    for (channel, seen) in [&ca, &cb].into_iter().zip(&health) {
        tokio::spawn(watch_health(channel.clone(), Arc::clone(seen)));
    }
    for (channel, replica) in [(&ca, "a"), (&cb, "b")] {
        for _ in 0..2 {
            tasks.push(tokio::spawn(verifier_task(
                channel.clone(),
                verifier.clone(),
                Arc::clone(&record),
                Arc::clone(&stop),
                replica,
            )));
        }
        tasks.push(tokio::spawn(writer_task(
            channel.clone(),
            operator.clone(),
            alice.account_id.clone(),
            Arc::clone(&record),
            Arc::clone(&stop),
            Arc::clone(&names),
            replica,
        )));
    }
    tasks.push(tokio::spawn(sign_in_task(
        cb.clone(),
        Arc::clone(&record),
        Arc::clone(&stop),
        "b",
    )));

    tokio::time::sleep(STEADY).await;
    let old_primary = cluster.primary().await.expect("a primary before the kill");
    // Everything acknowledged up to here must survive.
    let acked_live = record.live.lock().unwrap().clone();
    let acked_revoked = record.revoked.lock().unwrap().clone();
    assert!(
        !acked_live.is_empty() && !acked_revoked.is_empty(),
        "the load acknowledged no write before the kill"
    );
    let killed = Instant::now();
    cluster.kill_postmaster(old_primary);

    // Until a write that began after the kill succeeds.
    let first_write = loop {
        let found = record
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.op != "verify" && c.code == Code::Ok && c.started > killed)
            .map(|c| c.ended)
            .min();
        if let Some(at) = found {
            break at;
        }
        assert!(
            killed.elapsed() < RECOVERY_BOUND,
            "no write succeeded within {RECOVERY_BOUND:?} of the kill; a's stderr:\n{}\n{}",
            a.process.stderr(),
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(STEADY).await;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("a load task panicked");
    }

    let new_primary = cluster.primary().await;
    assert!(
        new_primary.is_some_and(|p| p != old_primary),
        "Patroni did not promote the standby (primary now {new_primary:?}):\n{}",
        cluster.logs()
    );

    // The figures: the unavailability, and the calls by code while it
    // lasted (those that ended between the kill and the first write).
    let unavailable_for = first_write - killed;
    // The load has stopped: every call is recorded.
    let calls = std::mem::take(&mut *record.calls.lock().unwrap());
    let mut during: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut unexpected = Vec::new();
    for call in calls.iter() {
        if call.ended >= killed && call.ended <= first_write {
            *during
                .entry((call.op, format!("{:?}", call.code)))
                .or_default() += 1;
        }
        if !matches!(call.code, Code::Ok | Code::Unavailable) {
            unexpected.push(format!(
                "{} ended {:?} after the kill with {:?}",
                call.op,
                call.ended.checked_duration_since(killed),
                call.code
            ));
        }
    }
    eprintln!(
        "failover: {} -> {}; unavailable for {:?} (kill until the first successful write); \
         {} calls in all; calls by code while it lasted: {during:?}",
        cluster.name(old_primary),
        cluster.name(new_primary.expect("checked")),
        unavailable_for,
        calls.len()
    );
    assert!(
        unexpected.is_empty(),
        "calls failed with something other than UNAVAILABLE: {unexpected:#?}\n\
         a's stderr:\n{}\nb's stderr:\n{}",
        a.process.stderr(),
        b.process.stderr()
    );
    for replica in ["a", "b"] {
        let first = calls
            .iter()
            .filter(|c| {
                c.replica == replica && c.op != "verify" && c.code == Code::Ok && c.started > killed
            })
            .map(|c| c.ended - killed)
            .min();
        eprintln!("failover: replica {replica}'s first successful write {first:?} after the kill");
    }
    let violations = record.violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "{violations:#?}");

    // Health went NOT_SERVING after the kill and comes back by itself.
    for (seen, replica) in health.iter().zip(["a", "b"]) {
        loop {
            let back = {
                let seen = seen.lock().unwrap();
                assert!(
                    seen.iter()
                        .any(|(at, s)| *at > killed && *s == ServingStatus::NotServing),
                    "replica {replica}'s health never went NOT_SERVING: {seen:?}"
                );
                seen.last().map(|(_, s)| *s) == Some(ServingStatus::Serving)
            };
            if back {
                break;
            }
            assert!(
                killed.elapsed() < RECOVERY_BOUND,
                "replica {replica}'s health did not come back within {RECOVERY_BOUND:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for (seen, replica) in health.iter().zip(["a", "b"]) {
        let seen = seen.lock().unwrap();
        let down = seen
            .iter()
            .find(|(at, s)| *at > killed && *s == ServingStatus::NotServing)
            .map(|(at, _)| *at);
        let up = down.and_then(|down| {
            seen.iter()
                .find(|(at, s)| *at > down && *s == ServingStatus::Serving)
                .map(|(at, _)| *at)
        });
        eprintln!(
            "failover: replica {replica} NOT_SERVING from {:?} to {:?} after the kill",
            down.map(|at| at - killed),
            up.map(|at| at - killed)
        );
    }
    // Each replica's change channel went down and came back up: the cache
    // was emptied and is trusted again only once current.
    for (server, replica) in [(&a, "a"), (&b, "b")] {
        let stderr = server.process.stderr();
        let down = stderr
            .find("invalidation channel down")
            .unwrap_or_else(|| panic!("replica {replica}'s change channel never went down"));
        assert!(
            stderr[down..].contains("invalidation channel up"),
            "replica {replica}'s change channel never came back: {stderr}"
        );
    }

    // No acknowledged write was lost, and the same replicas (never
    // restarted) answer for it.
    for channel in [&ca, &cb] {
        for (id, secret) in &acked_live {
            assert!(
                verify(channel, &verifier, secret)
                    .await
                    .expect("verify after the failover"),
                "token {id}, created before the kill, is gone"
            );
        }
        for (id, secret, _) in &acked_revoked {
            assert!(
                !verify(channel, &verifier, secret)
                    .await
                    .expect("verify after the failover"),
                "token {id}, revoked before the kill, is active again"
            );
        }
        sign_in(channel)
            .await
            .expect("alice signs in after the failover");
    }
    let revoked_after = record.revoked.lock().unwrap().clone();
    for (id, secret, _) in &revoked_after {
        assert!(
            !verify(&cb, &verifier, secret)
                .await
                .expect("verify after the failover"),
            "token {id}, revoked around the failover, is active"
        );
    }
    drop(cluster);
}

/// What a demoted primary answers a write with (SQLSTATE 25006, "cannot
/// execute ... in a read-only transaction") is UNAVAILABLE, not INTERNAL,
/// and counts as a loss: the pool's connections to that server are
/// replaced, so that once the database URL leads to a primary again the
/// next call succeeds. Forced here on a plain server by making the
/// database's new sessions read-only (`default_transaction_read_only`), as
/// a standby's are, and back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_as_read_only_is_unavailable_and_its_connections_are_replaced() {
    let url = crate::support::postgres::fresh_database_url().await;
    let operator = printed_token(&bootstrap_operator(&url, "ops", &[]).await);
    let database = url.rsplit('/').next().expect("a database name").to_owned();
    let admin = crate::support::postgres::server_url();
    let set_read_only = |on: bool| {
        let statement = if on {
            format!(r#"ALTER DATABASE "{database}" SET default_transaction_read_only = on"#)
        } else {
            format!(r#"ALTER DATABASE "{database}" RESET default_transaction_read_only"#)
        };
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(admin)
                .await
                .expect("connect to the test server");
            sqlx::raw_sql(&statement)
                .execute(&mut conn)
                .await
                .expect("alter the database");
        }
    };
    set_read_only(true).await;
    let server = Server::start(&url, &[("IDENTITY_MIGRATE", "false")]).await;
    let channel = server.channel().await;
    let ops = AccountsServiceClient::new(channel.clone())
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &operator,
        ))
        .await
        .expect("reads work on a read-only database")
        .into_inner()
        .account
        .expect("account");
    let refused = create_token(&channel, &operator, &ops.account_id, "refused")
        .await
        .expect_err("a write on a read-only database");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    set_read_only(false).await;
    create_token(&channel, &operator, &ops.account_id, "accepted")
        .await
        .expect("the first write once the database is writable again");
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
}
