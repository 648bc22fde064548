//! Revocation that no rotation or clock can undo (issue 11, items 1 and 3).
//!
//! The races are forced, not hoped for: another connection holds the lock
//! both calls need, the test waits until both calls are queued behind it
//! (PostgreSQL: `pg_stat_activity`; SQLite, which has no such view: the
//! server's pool, in which a call waiting for the write lock holds a
//! connection), then releases it. The clock tests run a replica of the real
//! binary under libfaketime, its wall clock five seconds slow.

use std::time::Duration;

use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::binary::Server;
use crate::support::{TestApp, TestDatabase, bearer, pb, plaintext, postgres};

/// libfaketime, as Debian's `faketime` package installs it.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// The cross-replica bound on revocation the README documents.
const CROSS_REPLICA_BOUND: Duration = Duration::from_secs(1);

/// A transaction of another client holding the lock every write to the
/// token `token_id` needs: its row lock on PostgreSQL (`FOR UPDATE`), the
/// database's write lock on SQLite (`BEGIN IMMEDIATE`).
enum Outside {
    Postgres(sqlx::PgConnection),
    Sqlite(sqlx::SqliteConnection),
}

impl Outside {
    async fn lock(url: &str, token_id: &str) -> Self {
        use sqlx::Connection as _;
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
            sqlx::query("SELECT token_id FROM tokens WHERE token_id = $1 FOR UPDATE")
                .bind(token_id)
                .fetch_one(&mut conn)
                .await
                .expect("lock the token's row");
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

/// Waits until `count` statements on the database at `url` whose text
/// contains `like` wait for a lock (PostgreSQL only).
async fn until_pg_waiting(url: &str, like: &str, count: i64) {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE $1",
        )
        .bind(like)
        .fetch_one(&mut conn)
        .await
        .expect("read pg_stat_activity");
        if waiting >= count {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{count} statements like {like:?} never waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until `count` calls to `app` are queued behind the outside lock.
async fn until_queued(app: &TestApp, count: i64) {
    if app.db.url.starts_with("sqlite:") {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let usage = app.identity.pool_usage().expect("a pool");
            if i64::from(usage.size - usage.idle) >= count {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{count} calls never queued for the write lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        until_pg_waiting(&app.db.url, "%UPDATE tokens%", count).await;
    }
}

fn rotate_request(token_id: &str, credential: &str) -> tonic::Request<pb::RotateTokenRequest> {
    bearer(
        pb::RotateTokenRequest {
            token_id: token_id.into(),
        },
        credential,
    )
}

/// Every token of `family` in `account`, as the operator lists them.
async fn family_of(app: &TestApp, account: &str, family: &str) -> Vec<pb::Token> {
    app.tokens()
        .list_tokens(bearer(
            pb::ListTokensRequest {
                account_id: account.into(),
                page_size: 100,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("list tokens")
        .into_inner()
        .tokens
        .into_iter()
        .filter(|t| t.family_id == family)
        .collect()
}

/// Rotates and revokes one token at once, the first call queued behind the
/// outside lock before the second: afterwards nothing of the token may be
/// active. (Both calls read it as its family's live token, so the
/// revocation is of the token under every secret, whichever commits first.)
async fn rotation_races_revocation(app: &TestApp, rotate_first: bool) {
    let name = if rotate_first {
        "rotated-first"
    } else {
        "revoked-first"
    };
    let (alice, session) = app.person(name).await;
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: name.into(),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    let x = created.token.expect("token");
    // Sign the session in to the cache before the lock, so that neither
    // call needs more than its own statements.
    assert!(app.verify(&session, &[]).await.active);

    let lock = Outside::lock(&app.db.url, &x.token_id).await;
    let rotate = {
        let client = app.tokens();
        let request = rotate_request(&x.token_id, &session);
        async move { client.clone().rotate_token(request).await }
    };
    let revoke = {
        let client = app.tokens();
        let request = bearer(
            pb::RevokeTokenRequest {
                token_id: x.token_id.clone(),
            },
            &session,
        );
        async move { client.clone().revoke_token(request).await }
    };
    let (rotated, revoked) = if rotate_first {
        let rotated = tokio::spawn(rotate);
        until_queued(app, 1).await;
        let revoked = tokio::spawn(revoke);
        until_queued(app, 2).await;
        lock.release().await;
        (rotated.await.expect("join"), revoked.await.expect("join"))
    } else {
        let revoked = tokio::spawn(revoke);
        until_queued(app, 1).await;
        let rotated = tokio::spawn(rotate);
        until_queued(app, 2).await;
        lock.release().await;
        (rotated.await.expect("join"), revoked.await.expect("join"))
    };

    revoked.expect("the revocation succeeds whatever came first");
    let mut secrets = vec![created.secret.clone()];
    match rotated {
        Ok(response) => secrets.push(response.into_inner().secret),
        Err(status) => assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}"),
    }
    for secret in &secrets {
        let verdict = app.verify(secret, &[]).await;
        assert!(
            !verdict.active,
            "rotate_first={rotate_first}: a secret of the revoked token works"
        );
        assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    }
    for token in family_of(app, &alice.account_id, &x.family_id).await {
        assert_eq!(
            token.state,
            pb::TokenState::Revoked as i32,
            "rotate_first={rotate_first}: {token:?}"
        );
    }
}

/// A rotation and a revocation of one token, queued behind another
/// writer in either order, leave no secret of it working: a rotation
/// that waits behind the revocation fails, and one that commits first
/// is revoked with its token.
async fn a_rotation_racing_a_revocation_leaves_nothing_active(app: TestApp) {
    rotation_races_revocation(&app, true).await;
    rotation_races_revocation(&app, false).await;
}
crate::both_backends!(a_rotation_racing_a_revocation_leaves_nothing_active);

/// The environment that runs a replica under libfaketime, its wall clock
/// (not its monotonic one) `offset` (such as `-5s`) from the real time.
fn faketime(offset: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]
}

/// A replica of the binary on `url` whose clock is five seconds slow, told
/// to tolerate that (so that it serves, and the clock-independence of
/// revocation is what is tested).
async fn slow_replica(url: &str) -> Server {
    let mut env = faketime("-5s").to_vec();
    env.push(("IDENTITY_MAX_CLOCK_SKEW", "1h"));
    Server::start(url, &env).await
}

/// Verifies `secret` on a replica of the binary.
async fn verify_on(server: &Server, verifier: &str, secret: &str) -> pb::VerifyTokenResponse {
    pb::tokens_service_client::TokensServiceClient::new(server.channel().await)
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret.into(),
                ..Default::default()
            },
            verifier,
        ))
        .await
        .expect("verify")
        .into_inner()
}

/// Polls `server` until `secret` is inactive there, for at most the
/// documented cross-replica bound.
async fn inactive_within_the_bound(server: &Server, verifier: &str, secret: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + CROSS_REPLICA_BOUND;
    loop {
        let verdict = verify_on(server, verifier, secret).await;
        if !verdict.active {
            assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32, "{what}");
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: the slow replica still answers active after {CROSS_REPLICA_BOUND:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The PostgreSQL interleaving of the issue: the owner's presentation of a
/// rotated-out secret (reuse detection revokes the family) and the
/// attacker's rotation of the live token both wait for a row lock on it.
/// Whichever gets it first, the attacker's successor never works. In the
/// first round the rotation runs on a replica whose clock is five seconds
/// slow and queues second, so that the revocation it waits for names a
/// time after its own "now"; in the second it queues first and commits
/// while the family revocation waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_detection_racing_the_attackers_rotation_leaves_no_successor() {
    let url = postgres::fresh_database_url().await;
    let app = TestApp::spawn_on(TestDatabase::at(url.clone()), None, |_| {}, plaintext).await;
    let slow = slow_replica(&url).await;
    let verifier = app.verifier_token().await;
    for attacker_first in [false, true] {
        let name = if attacker_first {
            "attacker-first"
        } else {
            "owner-first"
        };
        let (alice, session) = app.person(name).await;
        let c0 = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: name.into(),
                    ..Default::default()
                },
                &session,
            ))
            .await
            .expect("create")
            .into_inner();
        let family = c0.token.clone().expect("token").family_id;
        // The attacker stole C0 and rotated it: C1 is theirs.
        let c1 = app
            .tokens()
            .rotate_token(rotate_request(
                &c0.token.expect("token").token_id,
                &c0.secret,
            ))
            .await
            .expect("rotate C0")
            .into_inner();
        let c1_id = c1.token.expect("token").token_id;
        // Both replicas have seen C1 work (and may cache it).
        assert!(app.verify(&c1.secret, &[]).await.active);
        assert!(verify_on(&slow, &verifier, &c1.secret).await.active);

        let lock = Outside::lock(&url, &c1_id).await;
        let owner = {
            let client = app.tokens();
            // The owner, still holding C0, presents it: reuse.
            let request = rotate_request(&c1_id, &c0.secret);
            async move { client.clone().rotate_token(request).await }
        };
        let attacker = {
            let channel = if attacker_first {
                app.channel.clone()
            } else {
                slow.channel().await
            };
            let request = rotate_request(&c1_id, &c1.secret);
            async move {
                pb::tokens_service_client::TokensServiceClient::new(channel)
                    .rotate_token(request)
                    .await
            }
        };
        // The attacker's rotation queues on C1's row where it re-checks
        // its caller (C1 itself) before marking it rotated.
        let (owner, attacker) = if attacker_first {
            let attacker = tokio::spawn(attacker);
            until_pg_waiting(&url, "%FOR SHARE OF t%", 1).await;
            let owner = tokio::spawn(owner);
            until_pg_waiting(&url, "%descendants%", 1).await;
            lock.release().await;
            (owner.await.expect("join"), attacker.await.expect("join"))
        } else {
            let owner = tokio::spawn(owner);
            until_pg_waiting(&url, "%descendants%", 1).await;
            let attacker = tokio::spawn(attacker);
            until_pg_waiting(&url, "%FOR SHARE OF t%", 1).await;
            lock.release().await;
            (owner.await.expect("join"), attacker.await.expect("join"))
        };

        let owner = owner.expect_err("presenting a rotated-out secret is reuse");
        assert_eq!(owner.code(), Code::Unauthenticated, "{owner:?}");
        let mut secrets = vec![c0.secret.clone(), c1.secret.clone()];
        if let Ok(response) = attacker {
            secrets.push(response.into_inner().secret);
        }
        for secret in &secrets {
            assert!(
                !app.verify(secret, &[]).await.active,
                "attacker_first={attacker_first}: a secret of the revoked family works"
            );
        }
        for secret in &secrets {
            inactive_within_the_bound(&slow, &verifier, secret, name).await;
        }
        for token in family_of(&app, &alice.account_id, &family).await {
            assert_eq!(
                token.state,
                pb::TokenState::Revoked as i32,
                "attacker_first={attacker_first}: {token:?}"
            );
        }
    }
    slow.terminate().await;
    app.stop().await;
}

/// A revocation recorded on a replica holds on another at once, whatever
/// the other's clock says: by id, by signing out, by a leak report, and by
/// reuse detection, each verified on the slow replica first (so that it is
/// cached there) and then polled there for at most the documented bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_holds_on_a_replica_whose_clock_is_slow() {
    let url = postgres::fresh_database_url().await;
    let app = TestApp::spawn_on(TestDatabase::at(url.clone()), None, |_| {}, plaintext).await;
    let slow = slow_replica(&url).await;
    let verifier = app.verifier_token().await;
    let (alice, session) = app.person("alice").await;
    let token = |name: &'static str| {
        let app = &app;
        let session = session.clone();
        let account = alice.account_id.clone();
        async move {
            app.tokens()
                .create_token(bearer(
                    pb::CreateTokenRequest {
                        account_id: account,
                        name: name.into(),
                        ..Default::default()
                    },
                    &session,
                ))
                .await
                .expect("create")
                .into_inner()
        }
    };
    let cached_on_slow = |secret: String| {
        let slow = &slow;
        let verifier = verifier.clone();
        async move {
            for _ in 0..2 {
                assert!(
                    verify_on(slow, &verifier, &secret).await.active,
                    "active before"
                );
            }
        }
    };

    // By id.
    let by_id = token("by-id").await;
    cached_on_slow(by_id.secret.clone()).await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: by_id.token.clone().expect("token").token_id,
            },
            &session,
        ))
        .await
        .expect("revoke");
    inactive_within_the_bound(&slow, &verifier, &by_id.secret, "revoked by id").await;

    // Signing out.
    let (_, other_session) = app.person("bob").await;
    cached_on_slow(other_session.clone()).await;
    app.accounts()
        .sign_out(bearer(pb::SignOutRequest {}, &other_session))
        .await
        .expect("sign out");
    inactive_within_the_bound(&slow, &verifier, &other_session, "signed out").await;

    // A leak report.
    let leaked = token("leaked").await;
    cached_on_slow(leaked.secret.clone()).await;
    app.tokens()
        .revoke_leaked_token(tonic::Request::new(pb::RevokeLeakedTokenRequest {
            secrets: vec![leaked.secret.clone()],
        }))
        .await
        .expect("report the leak");
    inactive_within_the_bound(&slow, &verifier, &leaked.secret, "reported leaked").await;

    // Reuse detection: the whole family, its live token included.
    let c0 = token("family").await;
    let c1 = app
        .tokens()
        .rotate_token(rotate_request(
            &c0.token.clone().expect("token").token_id,
            &c0.secret,
        ))
        .await
        .expect("rotate")
        .into_inner();
    cached_on_slow(c1.secret.clone()).await;
    let reused = app
        .tokens()
        .rotate_token(rotate_request(
            &c1.token.clone().expect("token").token_id,
            &c0.secret,
        ))
        .await
        .expect_err("reuse");
    assert_eq!(reused.code(), Code::Unauthenticated);
    inactive_within_the_bound(&slow, &verifier, &c1.secret, "family revoked by reuse").await;

    slow.terminate().await;
    app.stop().await;
}
/// What the health service of `server` says of the whole service.
async fn health_of(server: &Server) -> ServingStatus {
    let status = HealthClient::new(server.channel().await)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known status")
}

/// A PostgreSQL replica measures its clock against the database's and
/// refuses to serve while the offset exceeds `IDENTITY_MAX_CLOCK_SKEW`
/// (1 s by default), the way it does while the database is unreachable: a
/// replica five seconds slow reports NOT_SERVING and says why, with the
/// offset in its metrics; one on the real time serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_clock_is_off_by_more_than_the_bound_does_not_serve() {
    let url = postgres::fresh_database_url().await;
    let app = TestApp::spawn_on(TestDatabase::at(url.clone()), None, |_| {}, plaintext).await;
    let skewed = Server::start(&url, &faketime("-5s")).await;
    let normal = Server::start(&url, &[]).await;

    assert_eq!(health_of(&skewed).await, ServingStatus::NotServing);
    let refused = pb::tokens_service_client::TokensServiceClient::new(skewed.channel().await)
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: app.operator_token.clone(),
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect_err("a replica out of bound refuses calls");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert_eq!(health_of(&normal).await, ServingStatus::Serving);

    let metrics_addr = skewed.metrics_addr.expect("metrics are on");
    let body = crate::observability::scrape(metrics_addr).await;
    let offset: f64 = body
        .lines()
        .find_map(|line| line.strip_prefix("identity_clock_offset_seconds "))
        .unwrap_or_else(|| panic!("no clock offset gauge in:\n{body}"))
        .trim()
        .parse()
        .expect("a number");
    assert!((4.0..6.0).contains(&offset), "offset {offset}");

    let finished = skewed.terminate().await;
    assert!(
        finished.stderr.contains("IDENTITY_MAX_CLOCK_SKEW"),
        "the error names the setting:\n{}",
        finished.stderr
    );
    normal.terminate().await;
    app.stop().await;
}

/// A leak report of a token's live secret racing the thief's rotation of
/// it, the rotation queued first behind the outside lock: whichever commits
/// first, no secret of the family, its successor included, and no child of
/// it stays active. (The report's first pass cannot see a successor the
/// rotation commits while it waits; its confirming pass must.)
async fn leak_report_races_rotation(app: &TestApp) {
    let (alice, session) = app.person("leaky").await;
    let (token, secret) = app
        .token(&session, &alice.account_id, "ci", &["tokens:write"])
        .await;
    let child = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "child".into(),
                scopes: vec!["tokens:write".into()],
                ..Default::default()
            },
            &secret,
        ))
        .await
        .expect("a child")
        .into_inner()
        .secret;
    assert!(app.verify(&secret, &[]).await.active);

    let lock = Outside::lock(&app.db.url, &token.token_id).await;
    let rotated = {
        let client = app.tokens();
        let request = rotate_request(&token.token_id, &secret);
        tokio::spawn(async move { client.clone().rotate_token(request).await })
    };
    until_queued(app, 1).await;
    let reported = {
        let client = app.tokens();
        let request = pb::RevokeLeakedTokenRequest {
            secrets: vec![secret.clone()],
        };
        tokio::spawn(async move { client.clone().revoke_leaked_token(request).await })
    };
    until_queued(app, 2).await;
    lock.release().await;

    reported.await.expect("join").expect("the report is taken");
    let mut secrets = vec![secret, child];
    if let Ok(rotated) = rotated.await.expect("join") {
        secrets.push(rotated.into_inner().secret);
    }
    for presented in &secrets {
        assert!(
            !app.verify(presented, &[]).await.active,
            "a secret of the reported family, or its child, is active"
        );
    }
}

async fn a_leak_report_racing_a_rotation_leaves_no_successor(app: TestApp) {
    leak_report_races_rotation(&app).await;
}
crate::both_backends!(a_leak_report_racing_a_rotation_leaves_no_successor);

async fn reporting_a_rotated_out_secret_revokes_its_successor(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (token, old) = app.token(&session, &alice.account_id, "ci", &[]).await;
    let new = app
        .tokens()
        .rotate_token(rotate_request(&token.token_id, &session))
        .await
        .expect("rotate")
        .into_inner()
        .secret;
    assert!(app.verify(&new, &[]).await.active);
    app.tokens()
        .revoke_leaked_token(pb::RevokeLeakedTokenRequest { secrets: vec![old] })
        .await
        .expect("report");
    assert!(
        !app.verify(&new, &[]).await.active,
        "whoever holds the old secret may have rotated: the family goes"
    );
}
crate::both_backends!(reporting_a_rotated_out_secret_revokes_its_successor);

/// An account's deletion racing a rotation of one of its tokens, the
/// rotation queued first behind a lock on the token's row: they take the
/// account's row in the same order, so neither deadlocks; the deletion
/// succeeds and nothing of the account stays active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_racing_a_rotation_does_not_deadlock() {
    let app = TestApp::spawn(crate::support::Backend::Postgres).await;
    let (alice, session) = app.person("doomed").await;
    let (token, secret) = app.token(&session, &alice.account_id, "ci", &[]).await;
    assert!(app.verify(&secret, &[]).await.active);
    let lock = Outside::lock(&app.db.url, &token.token_id).await;
    let rotated = {
        let client = app.tokens();
        let request = rotate_request(&token.token_id, &secret);
        tokio::spawn(async move { client.clone().rotate_token(request).await })
    };
    until_pg_waiting(&app.db.url, "%", 1).await;
    let deleted = {
        let client = app.accounts();
        let request = bearer(
            pb::DeleteAccountRequest {
                account_id: alice.account_id.clone(),
            },
            &app.operator_token,
        );
        tokio::spawn(async move { client.clone().delete_account(request).await })
    };
    until_pg_waiting(&app.db.url, "%", 2).await;
    lock.release().await;

    deleted.await.expect("join").expect("the deletion succeeds");
    let mut secrets = vec![secret];
    match rotated.await.expect("join") {
        Ok(rotated) => secrets.push(rotated.into_inner().secret),
        Err(status) => assert!(
            matches!(status.code(), Code::NotFound | Code::FailedPrecondition),
            "the rotation failed uncleanly: {status:?}"
        ),
    }
    for presented in &secrets {
        assert!(!app.verify(presented, &[]).await.active);
    }
}
