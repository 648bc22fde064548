//! New tokens' verdicts are pre-warmed: the replica that issues a token (by
//! `CreateToken`, or as a rotation's successor) puts the verdict a cache
//! miss would build into its cache, so that the token's first verification
//! there is a hit. Under the miss path's rules: the same answer, never a
//! limited-use token, and never a verdict that a revocation or disable
//! racing the creation made stale.
//!
//! The races are forced on PostgreSQL only: a connection of the test's own
//! holds a lock, the server's calls queue behind it (watched in
//! `pg_stat_activity`, never slept for), and then it lets go. On SQLite
//! every writer takes the one database write lock and readers are never
//! blocked, so no outside lock can hold a creation while a disable commits.

use std::time::Duration;

use sqlx::Connection as _;

use crate::support::{Backend, TestApp, bearer, pb};

/// Waits until the cache is in use (with PostgreSQL it is bypassed until
/// the change channel is up and proven current).
async fn cache_up(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app.identity.cache().is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The cache's misses so far.
fn misses(app: &TestApp) -> u64 {
    app.identity.cache().stats().1
}

/// A robot, and the verifier token already cached (so that a call's only
/// possible miss is the token it verifies).
async fn ready(app: &TestApp) -> pb::Account {
    cache_up(app).await;
    let robot = app.robot("ci").await;
    let verifier = app.verifier_token().await;
    assert!(app.verify(&verifier, &[]).await.active);
    robot
}

/// `CreateToken` as the operator with `request`'s fields: the token and its
/// secret.
async fn create(app: &TestApp, request: pb::CreateTokenRequest) -> (pb::Token, String) {
    let created = app
        .tokens()
        .create_token(bearer(request, &app.operator_token))
        .await
        .expect("create a token")
        .into_inner();
    (created.token.expect("token"), created.secret)
}

async fn a_new_tokens_first_verification_is_a_cache_hit(app: TestApp) {
    let robot = ready(&app).await;
    let (token, secret) = create(
        &app,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "fresh".into(),
            ..Default::default()
        },
    )
    .await;
    let before = misses(&app);
    let verdict = app.verify(&secret, &[]).await;
    assert!(verdict.active, "{verdict:?}");
    assert_eq!(misses(&app), before, "the first verification missed");

    // A rotation's successor too (the rotation authenticates with the
    // token itself, a hit, and evicts it).
    let rotated = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token.token_id.clone(),
            },
            &secret,
        ))
        .await
        .expect("rotate")
        .into_inner();
    let before = misses(&app);
    let verdict = app.verify(&rotated.secret, &[]).await;
    assert!(verdict.active, "{verdict:?}");
    assert_eq!(
        misses(&app),
        before,
        "the successor's first verification missed"
    );
    app.stop().await;
}
crate::both_backends!(a_new_tokens_first_verification_is_a_cache_hit);

async fn a_prewarmed_verdict_is_the_one_a_miss_gives(app: TestApp) {
    let robot = ready(&app).await;
    let (_, secret) = create(
        &app,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "scoped".into(),
            scopes: vec!["builds:read".into(), "builds:write".into()],
            resources: vec!["projects/a".into()],
            ttl: Some(prost_types::Duration {
                seconds: 3600,
                nanos: 0,
            }),
            ..Default::default()
        },
    )
    .await;
    let before = misses(&app);
    let hit = app
        .verify_for(&secret, &["builds:read"], &["projects/a"])
        .await;
    assert_eq!(misses(&app), before, "not served from the cache");
    assert!(hit.active, "{hit:?}");
    // The same question once the cache is empty: read from the store.
    app.identity.cache().clear();
    let before = misses(&app);
    let missed = app
        .verify_for(&secret, &["builds:read"], &["projects/a"])
        .await;
    assert!(misses(&app) > before, "served from the cache");
    assert_eq!(hit, missed);
    app.stop().await;
}
crate::both_backends!(a_prewarmed_verdict_is_the_one_a_miss_gives);

async fn a_limited_use_token_is_not_prewarmed_and_counts_exactly(app: TestApp) {
    let robot = ready(&app).await;
    let (_, secret) = create(
        &app,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "twice".into(),
            max_uses: Some(2),
            ..Default::default()
        },
    )
    .await;
    let before = misses(&app);
    let first = app.verify(&secret, &[]).await;
    assert_eq!(misses(&app), before + 1, "a limited-use token was cached");
    assert!(first.active, "{first:?}");
    let uses = |v: &pb::VerifyTokenResponse| v.principal.as_ref().and_then(|p| p.uses_remaining);
    assert_eq!(uses(&first), Some(1));
    let second = app.verify(&secret, &[]).await;
    assert!(second.active, "{second:?}");
    assert_eq!(uses(&second), Some(0));
    let third = app.verify(&secret, &[]).await;
    assert!(!third.active, "{third:?}");
    assert_eq!(third.reason, pb::InactiveReason::Exhausted as i32);
    app.stop().await;
}
crate::both_backends!(a_limited_use_token_is_not_prewarmed_and_counts_exactly);

async fn a_token_revoked_right_after_creation_is_inactive_at_once(app: TestApp) {
    let robot = ready(&app).await;
    let (token, secret) = create(
        &app,
        pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "short-lived".into(),
            ..Default::default()
        },
    )
    .await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token.token_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("revoke");
    let verdict = app.verify(&secret, &[]).await;
    assert!(!verdict.active, "{verdict:?}");
    assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    app.stop().await;
}
crate::both_backends!(a_token_revoked_right_after_creation_is_inactive_at_once);

/// A transaction of the test's own holding a lock until [`Self::release`],
/// and a second connection, outside any transaction, watching who waits.
struct Held {
    holder: sqlx::PgConnection,
    watcher: sqlx::PgConnection,
    pid: i32,
}

impl Held {
    /// Begins a transaction and runs `statement` (with `bind` as `$1`, if
    /// any) in it.
    async fn take(url: &str, statement: &str, bind: Option<&str>) -> Self {
        let mut holder = sqlx::PgConnection::connect(url)
            .await
            .expect("connect the lock holder");
        sqlx::raw_sql("BEGIN")
            .execute(&mut holder)
            .await
            .expect("begin");
        match bind {
            Some(value) => sqlx::query(statement)
                .bind(value)
                .execute(&mut holder)
                .await
                .map(drop),
            None => sqlx::raw_sql(statement)
                .execute(&mut holder)
                .await
                .map(drop),
        }
        .expect("take the lock");
        let pid = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut holder)
            .await
            .expect("own pid");
        let watcher = sqlx::PgConnection::connect(url)
            .await
            .expect("connect the watcher");
        Self {
            holder,
            watcher,
            pid,
        }
    }

    /// Waits until a backend running a statement that contains `text` is
    /// blocked by this transaction or by `behind` (a second waiter for a
    /// row waits on the first); its pid.
    async fn wait_for(&mut self, text: &str, behind: i32, what: &str) -> i32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let blocked: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND ($1 = ANY(pg_blocking_pids(pid)) OR $2 = ANY(pg_blocking_pids(pid))) \
                 AND strpos(query, $3) > 0 LIMIT 1",
            )
            .bind(self.pid)
            .bind(behind)
            .bind(text)
            .fetch_optional(&mut self.watcher)
            .await
            .expect("read pg_stat_activity");
            if let Some(pid) = blocked {
                return pid;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what} never waited for the lock"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets go of the lock.
    async fn release(mut self) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut self.holder)
            .await
            .expect("rollback");
    }
}

/// `DisableAccount` of `account` as the operator, in a task of its own.
fn disable(app: &TestApp, account: &str) -> tokio::task::JoinHandle<()> {
    let mut accounts = app.accounts();
    let request = bearer(
        pb::DisableAccountRequest {
            account_id: account.to_owned(),
        },
        &app.operator_token,
    );
    tokio::spawn(async move {
        accounts.disable_account(request).await.expect("disable");
    })
}

/// `CreateToken` for `account` as the operator, in a task of its own.
fn create_in_background(app: &TestApp, account: &str) -> tokio::task::JoinHandle<String> {
    let mut tokens = app.tokens();
    let request = bearer(
        pb::CreateTokenRequest {
            account_id: account.to_owned(),
            name: "raced".into(),
            ..Default::default()
        },
        &app.operator_token,
    );
    tokio::spawn(async move {
        tokens
            .create_token(request)
            .await
            .expect("create a token")
            .into_inner()
            .secret
    })
}

/// The disable commits (and evicts) after the creation has read the account
/// (as enabled) and before the creation commits: the verdict the creation
/// would put was stale before it was put, and the eviction's number, later
/// than the epoch the creation took before its reads, refuses it. Forced
/// by holding the tokens table, which the creation reads (its parent
/// token, the operator's) after the account and the disable never touches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_between_a_creations_reads_and_its_commit_is_not_undone_by_the_prewarm() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = ready(&app).await;
    let held = Held::take(
        &app.db.url,
        "LOCK TABLE tokens IN ACCESS EXCLUSIVE MODE",
        None,
    )
    .await;
    let mut held = held;
    let creation = create_in_background(&app, &robot.account_id);
    held.wait_for(
        "FROM tokens t WHERE t.token_id",
        0,
        "the creation's parent lookup",
    )
    .await;
    disable(&app, &robot.account_id)
        .await
        .expect("the disable ran");
    held.release().await;
    let secret = creation.await.expect("the creation ran");
    let verdict = app.verify(&secret, &[]).await;
    assert!(!verdict.active, "{verdict:?}");
    assert_eq!(verdict.reason, pb::InactiveReason::AccountDisabled as i32);
    app.stop().await;
}

/// The disable queues behind a creation whose commit is held (both need
/// the account's row): the creation commits and puts its verdict first,
/// and the disable's eviction, once it commits, takes it out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disable_queued_behind_a_held_creation_evicts_the_prewarmed_verdict() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = ready(&app).await;
    let mut held = Held::take(
        &app.db.url,
        "SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE",
        Some(&robot.account_id),
    )
    .await;
    let creation = create_in_background(&app, &robot.account_id);
    let creator = held
        .wait_for(
            "FROM accounts WHERE account_id = $1 FOR NO KEY UPDATE",
            0,
            "the creation",
        )
        .await;
    let disabling = disable(&app, &robot.account_id);
    held.wait_for("SET disable_time", creator, "the disable")
        .await;
    held.release().await;
    let secret = creation.await.expect("the creation ran");
    disabling.await.expect("the disable ran");
    let verdict = app.verify(&secret, &[]).await;
    assert!(!verdict.active, "{verdict:?}");
    assert_eq!(verdict.reason, pb::InactiveReason::AccountDisabled as i32);
    app.stop().await;
}
