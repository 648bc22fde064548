//! The cold path's batched lookups (`storage::sql::lookup`): cache misses
//! that wait at the same moment go to the database in one statement, on
//! connections of their own. Every verdict must be the one a lookup of its
//! own would give, whatever else is in its batch; a miss must not need a
//! pooled connection; and a read that raced with a revocation is still
//! never cached. (The batching is opt-in, `IDENTITY_DB_LOOKUP_CONNECTIONS`:
//! each replica here turns it on.)

use std::time::Duration;

use identity::domain::credential::{CredentialKind, Secret};
use sqlx::Connection as _;
use tokio::task::JoinSet;

use crate::support::{Backend, TestApp, bearer, pb};

/// Calls in flight at once: enough for the lookups to queue behind each
/// other and be taken in batches.
const PARALLEL: usize = 64;

/// What a verification must answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Active,
    Inactive(pb::InactiveReason),
}

/// Verifies every `(secret, expected)` on `app` at once, `rounds` times,
/// and checks each verdict.
async fn verify_all_at_once(app: &TestApp, cases: &[(String, Expect)], rounds: usize) {
    let verifier = app.verifier_token().await;
    for round in 0..rounds {
        let mut calls = JoinSet::new();
        for (i, (secret, expected)) in cases.iter().enumerate() {
            let mut client = app.tokens();
            let secret = secret.clone();
            let verifier = verifier.clone();
            let expected = *expected;
            calls.spawn(async move {
                let verdict = client
                    .verify_token(bearer(
                        pb::VerifyTokenRequest {
                            token: secret,
                            ..Default::default()
                        },
                        &verifier,
                    ))
                    .await
                    .expect("verify")
                    .into_inner();
                (i, expected, verdict)
            });
        }
        while let Some(done) = calls.join_next().await {
            let (i, expected, verdict) = done.expect("a verification panicked");
            let got = if verdict.active {
                Expect::Active
            } else {
                Expect::Inactive(
                    pb::InactiveReason::try_from(verdict.reason).expect("a known reason"),
                )
            };
            assert_eq!(got, expected, "case {i}, round {round}");
            if expected == Expect::Active {
                assert!(verdict.principal.is_some(), "case {i}: no principal");
            }
        }
    }
}

/// A replica on `app`'s database with no cache: every verification is a
/// miss.
async fn uncached_replica(app: &TestApp) -> TestApp {
    app.replica_with(|config| {
        config.identity.cache_entries = 0;
        config.pool.lookup_connections = 2;
    })
    .await
}

async fn many_distinct_misses_at_once_each_get_their_own_verdict(app: TestApp) {
    let robot = app.robot("batch").await;
    let mut cases: Vec<(String, Expect)> = Vec::new();
    // Tokens that expire within the minute, then the minute passes.
    for i in 0..8 {
        let created = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: robot.account_id.clone(),
                    name: format!("short{i}"),
                    ttl: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await
            .expect("create a short-lived token")
            .into_inner();
        cases.push((
            created.secret,
            Expect::Inactive(pb::InactiveReason::Expired),
        ));
    }
    app.clock().advance(Duration::from_secs(120));
    for i in 0..24 {
        let (_, secret) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("a{i}"),
                &[],
            )
            .await;
        cases.push((secret, Expect::Active));
    }
    for i in 0..8 {
        let (token, secret) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("r{i}"),
                &[],
            )
            .await;
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: token.token_id,
                },
                &app.operator_token,
            ))
            .await
            .expect("revoke");
        cases.push((secret, Expect::Inactive(pb::InactiveReason::Revoked)));
    }
    // Sessions, looked up in the same batches as the tokens.
    for i in 0..8 {
        let (_, session) = app.person(&format!("person{i}")).await;
        cases.push((session, Expect::Active));
    }
    // Well-formed secrets of neither kind that the database has never seen.
    for _ in 0..8 {
        let forged = Secret::generate(CredentialKind::PersonalAccessToken);
        cases.push((
            forged.expose().to_owned(),
            Expect::Inactive(pb::InactiveReason::Unknown),
        ));
    }
    for _ in 0..8 {
        let forged = Secret::generate(CredentialKind::Session);
        cases.push((
            forged.expose().to_owned(),
            Expect::Inactive(pb::InactiveReason::Unknown),
        ));
    }
    assert_eq!(cases.len(), PARALLEL);

    let replica = uncached_replica(&app).await;
    verify_all_at_once(&replica, &cases, 4).await;
    replica.stop().await;
}
crate::both_backends!(many_distinct_misses_at_once_each_get_their_own_verdict);

async fn identical_misses_at_once_share_one_answer(app: TestApp) {
    let robot = app.robot("same").await;
    let (_, active) = app
        .token(&app.operator_token, &robot.account_id, "live", &[])
        .await;
    let (token, revoked) = app
        .token(&app.operator_token, &robot.account_id, "dead", &[])
        .await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token.token_id,
            },
            &app.operator_token,
        ))
        .await
        .expect("revoke");
    let mut cases = Vec::new();
    for i in 0..PARALLEL {
        if i % 2 == 0 {
            cases.push((active.clone(), Expect::Active));
        } else {
            cases.push((
                revoked.clone(),
                Expect::Inactive(pb::InactiveReason::Revoked),
            ));
        }
    }
    let replica = uncached_replica(&app).await;
    verify_all_at_once(&replica, &cases, 4).await;
    replica.stop().await;
}
crate::both_backends!(identical_misses_at_once_share_one_answer);

/// Another client's transaction that holds the lock a token creation for
/// `account_id` needs first: the account's row on PostgreSQL, the write
/// lock on SQLite.
enum AccountLock {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl AccountLock {
    async fn take(url: &str, account_id: &str) -> Self {
        if url.starts_with("sqlite:") {
            let mut conn = sqlx::SqliteConnection::connect(url)
                .await
                .expect("connect the locker");
            sqlx::raw_sql("BEGIN IMMEDIATE")
                .execute(&mut conn)
                .await
                .expect("take the write lock");
            Self::Sqlite(conn)
        } else {
            let mut conn = sqlx::PgConnection::connect(url)
                .await
                .expect("connect the locker");
            sqlx::raw_sql("BEGIN")
                .execute(&mut conn)
                .await
                .expect("begin");
            sqlx::query("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE")
                .bind(account_id)
                .execute(&mut conn)
                .await
                .expect("lock the account");
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

/// With the pool's only connection held by a write that waits for a lock,
/// a cache miss is still answered: lookups have connections of their own.
/// (On the pool it would wait for that connection, and fail as unavailable
/// after the acquire timeout.)
async fn a_miss_is_answered_while_every_pooled_connection_is_busy(backend: Backend) {
    let app = TestApp::spawn_with(backend, |config| {
        config.pool.max_connections = 1;
        config.pool.lookup_connections = 2;
        config.pool.acquire_timeout = Duration::from_secs(2);
        config.identity.cache_entries = 0;
    })
    .await;
    let robot = app.robot("busy").await;
    let (_, secret) = app
        .token(&app.operator_token, &robot.account_id, "t", &[])
        .await;
    // Made now, so that the verification below needs no creation.
    let verifier = app.verifier_token().await;
    let lock = AccountLock::take(&app.db.url, &robot.account_id).await;

    let mut tokens = app.tokens();
    let operator = app.operator_token.clone();
    let account_id = robot.account_id.clone();
    let creation = tokio::spawn(async move {
        tokens
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id,
                    name: "waits".into(),
                    ..Default::default()
                },
                &operator,
            ))
            .await
    });
    // The creation holds the pool's one connection while it waits.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let usage = app.identity.pool_usage().expect("a pooled store");
        if usage.size == 1 && usage.idle == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the creation never took the connection: {usage:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let verdict = app
        .tokens()
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret.clone(),
                ..Default::default()
            },
            &verifier,
        ))
        .await
        .expect("a miss is answered while the pool is busy")
        .into_inner();
    assert!(verdict.active);

    lock.release().await;
    creation
        .await
        .expect("the creation panicked")
        .expect("the creation goes through once the lock is released");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_answered_while_every_pooled_connection_is_busy_sqlite() {
    a_miss_is_answered_while_every_pooled_connection_is_busy(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_miss_is_answered_while_every_pooled_connection_is_busy_postgres() {
    a_miss_is_answered_while_every_pooled_connection_is_busy(Backend::Postgres).await;
}

/// Waits until at least `n` connections to the database of `watch` wait
/// for a lock.
async fn wait_for_lock_waiters(watch: &mut sqlx::PgConnection, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut *watch)
        .await
        .expect("read pg_stat_activity");
        if waiting >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} of {n} connections wait for the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A miss whose batched read is held up by a lock on the tokens table, and
/// a revocation of that token through the same replica while it waits: once
/// both are through, the replica answers revoked (the raced read, whatever
/// it saw, was not cached), and so do the other replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_racing_a_batched_read_is_not_cached() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let replica = app
        .replica_with(|config| {
            config.identity.cache_ttl = Duration::from_secs(3600);
            config.pool.lookup_connections = 2;
        })
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !replica.identity.cache().is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica's cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let robot = app.robot("raced").await;
    let (token, secret) = app
        .token(&app.operator_token, &robot.account_id, "t", &[])
        .await;
    // The callers' own credentials, cached on the replica before the lock.
    let (_, other) = app
        .token(&app.operator_token, &robot.account_id, "other", &[])
        .await;
    assert!(replica.verify(&other, &[]).await.active);
    replica
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: token.token_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("the operator's token is cached on the replica");

    let mut lock = sqlx::PgConnection::connect(&app.db.url)
        .await
        .expect("connect the locker");
    sqlx::raw_sql("BEGIN; LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut lock)
        .await
        .expect("lock the tokens table");
    let mut watch = sqlx::PgConnection::connect(&app.db.url)
        .await
        .expect("connect the watcher");

    let verifier = replica.verifier_token().await;
    let mut client = replica.tokens();
    let raced_secret = secret.clone();
    let read = tokio::spawn(async move {
        client
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: raced_secret,
                    ..Default::default()
                },
                &verifier,
            ))
            .await
    });
    wait_for_lock_waiters(&mut watch, 1).await;
    let mut client = replica.tokens();
    let operator = app.operator_token.clone();
    let token_id = token.token_id.clone();
    let revocation = tokio::spawn(async move {
        client
            .revoke_token(bearer(pb::RevokeTokenRequest { token_id }, &operator))
            .await
    });
    wait_for_lock_waiters(&mut watch, 2).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("release the lock");

    read.await
        .expect("the raced read panicked")
        .expect("the raced read is answered");
    revocation
        .await
        .expect("the revocation panicked")
        .expect("the revocation is acknowledged");
    for app in [&replica, &app] {
        let verdict = app.verify(&secret, &[]).await;
        assert!(!verdict.active, "a revoked token was still active");
        assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    }
    replica.stop().await;
    app.stop().await;
}

/// Resumes a stopped process when dropped, whatever the test's outcome.
struct Stopped(String);

impl Stopped {
    fn stop(pid: i32) -> Self {
        let pid = pid.to_string();
        let status = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -STOP {pid}");
        Self(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

/// A lookup connection that stalls (its server process frozen, as a
/// half-open TCP connection would look) fails its batch once the acquire
/// timeout has passed and is replaced: the next miss is answered on a fresh
/// connection while the old one is still frozen, instead of every miss
/// waiting behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_lookup_connection_is_dropped_and_replaced() {
    let app = TestApp::spawn_with(Backend::Postgres, |config| {
        config.pool.lookup_connections = 1;
        config.pool.acquire_timeout = Duration::from_secs(1);
        config.identity.cache_entries = 0;
    })
    .await;
    let robot = app.robot("stalled").await;
    let (_, secret) = app
        .token(&app.operator_token, &robot.account_id, "t", &[])
        .await;
    assert!(app.verify(&secret, &[]).await.active);

    // The one lookup connection's server process, in this test's database.
    let mut watch = sqlx::PgConnection::connect(&app.db.url)
        .await
        .expect("connect the watcher");
    let pids: Vec<i32> = sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
         AND query LIKE 'SELECT t.digest AS lookup_digest%'",
    )
    .fetch_all(&mut watch)
    .await
    .expect("find the lookup connection");
    assert_eq!(pids.len(), 1, "one lookup connection: {pids:?}");
    let frozen = Stopped::stop(pids[0]);

    let verifier = app.verifier_token().await;
    let call = |secret: String| {
        let mut client = app.tokens();
        let verifier = verifier.clone();
        async move {
            client
                .verify_token(bearer(
                    pb::VerifyTokenRequest {
                        token: secret,
                        ..Default::default()
                    },
                    &verifier,
                ))
                .await
        }
    };
    let stalled = call(secret.clone())
        .await
        .expect_err("answered from a frozen connection");
    assert_eq!(stalled.code(), tonic::Code::Unavailable, "{stalled:?}");
    let verdict = call(secret.clone())
        .await
        .expect("a miss after the stall is answered on a fresh connection")
        .into_inner();
    assert!(verdict.active, "{verdict:?}");
    drop(frozen);
    app.stop().await;
}
