//! Races between a sign-in and the calls that end an account's sessions,
//! and between token creation and account deletion, forced from outside:
//! a connection of the test's own holds a lock, the real server's calls
//! queue behind it (watched in `pg_stat_activity`, never slept for), and
//! then it lets go.
//!
//! The sign-in races are forced on PostgreSQL only. On SQLite every writer
//! takes the one database write lock, so no outside lock can hold a sign-in
//! while a password change commits; there the session's check and insert
//! are one statement under that lock, so the interleaving cannot happen.

use std::time::Duration;

use sqlx::Connection as _;
use tonic::Code;

use crate::support::{Backend, PASSWORD, TestApp, assert_status, bearer, pb, sign_in};

const NEW_PASSWORD: &str = "quartz meadow lantern 93";

/// A backend as `pg_stat_activity` shows it: pid, state, wait event type
/// and name, the pids blocking it, its query.
type Activity = (
    i32,
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<String>,
);

/// A transaction of the test's own, on PostgreSQL, holding a lock until
/// [`Self::release`], and a second connection, outside any transaction, to
/// watch who waits (a transaction sees `pg_stat_activity` as it was when it
/// first read it).
struct Held(sqlx::PgConnection, sqlx::PgConnection, i32);

impl Held {
    /// Runs `statements` (which begin a transaction and take a lock) on a
    /// connection of its own.
    async fn take(url: &str, statements: &str, bind: Option<&str>) -> Self {
        let mut conn = sqlx::PgConnection::connect(url)
            .await
            .expect("connect the lock holder");
        sqlx::raw_sql("BEGIN")
            .execute(&mut conn)
            .await
            .expect("begin");
        match bind {
            Some(value) => sqlx::query(statements)
                .bind(value)
                .execute(&mut conn)
                .await
                .map(drop),
            None => sqlx::raw_sql(statements).execute(&mut conn).await.map(drop),
        }
        .expect("take the lock");
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await
            .expect("own pid");
        let watch = sqlx::PgConnection::connect(url)
            .await
            .expect("connect the watcher");
        Self(conn, watch, pid)
    }

    /// How many of the server's connections wait for a lock now.
    async fn waiting(&mut self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&mut self.1)
        .await
        .expect("read pg_stat_activity")
    }

    /// Waits until at least `n` of the server's connections wait for a lock.
    /// (Not by statement text: a statement may wait while it is being
    /// prepared, before `pg_stat_activity` shows its text.)
    async fn wait_for_waiters(&mut self, n: i64, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut self.1)
            .await
            .expect("read pg_stat_activity");
            if waiting >= n {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                let activity: Vec<(Option<String>, Option<String>, Option<String>)> =
                    sqlx::query_as(
                        "SELECT wait_event_type, state, query FROM pg_stat_activity \
                     WHERE datname = current_database() AND pid <> pg_backend_pid()",
                    )
                    .fetch_all(&mut self.1)
                    .await
                    .expect("read pg_stat_activity");
                panic!(
                    "{what} never waited for the lock ({waiting} of {n} waiting): {activity:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until a backend is blocked by this connection's lock; its pid.
    /// (Precise where counting lock waiters is not: the change feed's
    /// heartbeats wait for locks too.)
    async fn wait_for_blocked_by_me(&mut self, what: &str) -> i32 {
        let me = self.2;
        self.wait_for_blocked_by(me, what).await
    }

    /// Waits until a backend other than `besides` is blocked by this
    /// connection's lock, or queued behind `besides` for it (a second waiter
    /// for a row waits on the first); its pid.
    async fn wait_for_blocked_by_me_besides(&mut self, besides: i32, what: &str) -> i32 {
        let me = self.2;
        self.wait_for(me, besides, what).await
    }

    /// Waits until a backend is blocked by the backend `blocker`; its pid.
    async fn wait_for_blocked_by(&mut self, blocker: i32, what: &str) -> i32 {
        self.wait_for(blocker, 0, what).await
    }

    /// Waits until a backend other than `besides` is blocked by `blocker` or
    /// by `besides`.
    async fn wait_for(&mut self, blocker: i32, besides: i32, what: &str) -> i32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let blocked: Option<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
                 AND pid <> $2 AND ($1 = ANY(pg_blocking_pids(pid)) \
                 OR $2 = ANY(pg_blocking_pids(pid))) LIMIT 1",
            )
            .bind(blocker)
            .bind(besides)
            .fetch_optional(&mut self.1)
            .await
            .expect("read pg_stat_activity");
            if let Some(pid) = blocked {
                return pid;
            }
            if tokio::time::Instant::now() >= deadline {
                let activity: Vec<Activity> = sqlx::query_as(
                    "SELECT pid, state, wait_event_type, wait_event, \
                         CAST(pg_blocking_pids(pid) AS TEXT), query FROM pg_stat_activity \
                         WHERE datname = current_database()",
                )
                .fetch_all(&mut self.1)
                .await
                .expect("read pg_stat_activity");
                panic!("{what} never waited behind backend {blocker}: {activity:#?}");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Ends the transaction, releasing the lock.
    async fn release(mut self) {
        sqlx::raw_sql("ROLLBACK")
            .execute(&mut self.0)
            .await
            .expect("release the lock");
    }
}

/// Signs `username` in with the old password while `end` (a call that ends
/// the account's sessions) is in flight. A transaction of the test's own
/// holds the account's row: `end`, which changes the row first, queues
/// behind it; then the sign-in reads the account (a plain read, not held),
/// checks the password and queues its session insert, which takes a share
/// lock on the same row, behind them; then the hold ends. Whatever order
/// the two then commit in, no session checked against the old credentials
/// may be active once `end` has returned: either the sign-in lost (and
/// answers as a wrong password would) or `end` saw its session and ended it.
async fn sign_in_racing(
    app: &TestApp,
    username: &str,
    end: impl std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
    what: &str,
) {
    let mut held = Held::take(
        &app.db.url,
        "SELECT account_id FROM accounts WHERE username = $1 FOR UPDATE",
        Some(username),
    )
    .await;
    let ending = tokio::spawn(end);
    let ending_pid = held.wait_for_blocked_by_me(what).await;

    let signing_in = {
        let client = app.accounts();
        let request = pb::SignInRequest {
            username: username.into(),
            password: PASSWORD.into(),
        };
        tokio::spawn(async move { client.clone().sign_in(request).await })
    };
    held.wait_for_blocked_by_me_besides(ending_pid, "the sign-in")
        .await;
    held.release().await;

    ending.await.expect("join").expect(what);
    let signed_in = signing_in.await.expect("join");
    if let Ok(response) = &signed_in {
        let verdict = app.verify(&response.get_ref().session_token, &[]).await;
        assert!(
            !verdict.active,
            "a sign-in checked against the old credentials left an active session after {what}"
        );
        return;
    }
    assert_status(
        signed_in,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
}

/// A password change that commits while a sign-in with the old password is
/// between its check and its insert leaves no session behind; the right
/// password at the time is not a failure, so the new one still signs in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_with_the_old_password_loses_to_a_concurrent_password_change() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (_, session) = app.person("alice").await;
    let change = {
        let client = app.accounts();
        let request = bearer(
            pb::ChangePasswordRequest {
                current_password: PASSWORD.into(),
                new_password: NEW_PASSWORD.into(),
            },
            &session,
        );
        async move { client.clone().change_password(request).await.map(drop) }
    };
    sign_in_racing(&app, "alice", change, "ChangePassword").await;
    assert!(
        app.verify(&session, &[]).await.active,
        "the caller's session stays"
    );
    sign_in(&app, "alice", NEW_PASSWORD)
        .await
        .expect("the new password signs in: the lost race was not a failure");
}

/// SignOutEverywhere that commits while a sign-in is between its password
/// check and its insert leaves no session behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_loses_to_a_concurrent_sign_out_everywhere() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let everywhere = {
        let client = app.accounts();
        let request = bearer(
            pb::SignOutEverywhereRequest {
                account_id: alice.account_id.clone(),
            },
            &app.operator_token,
        );
        async move { client.clone().sign_out_everywhere(request).await.map(drop) }
    };
    sign_in_racing(&app, "alice", everywhere, "SignOutEverywhere").await;
    assert!(
        !app.verify(&session, &[]).await.active,
        "signed out everywhere"
    );
    sign_in(&app, "alice", PASSWORD)
        .await
        .expect("a sign-in after the call works");
}

/// DisableAccount that commits while a sign-in is between its password
/// check and its insert leaves no session behind, to come back to life
/// when the account is enabled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_in_loses_to_a_concurrent_disable() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, _) = app.person("alice").await;
    let disable = {
        let client = app.accounts();
        let request = bearer(
            pb::DisableAccountRequest {
                account_id: alice.account_id.clone(),
            },
            &app.operator_token,
        );
        async move { client.clone().disable_account(request).await.map(drop) }
    };
    sign_in_racing(&app, "alice", disable, "DisableAccount").await;
}

/// A token creation and the deletion of its account, queued behind the
/// same lock on the account row and released together: each either
/// finishes or fails cleanly (NOT_FOUND), never INTERNAL, and no token of
/// the deleted account verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_creation_racing_its_accounts_deletion_fails_cleanly() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = app.robot("ci").await;
    let mut held = Held::take(
        &app.db.url,
        "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE",
        Some(&robot.account_id),
    )
    .await;
    let creating = {
        let client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "racer".into(),
                ..Default::default()
            },
            &app.operator_token,
        );
        tokio::spawn(async move { client.clone().create_token(request).await })
    };
    held.wait_for_waiters(1, "the creation").await;
    let deleting = tokio::spawn(delete_account(&app, &robot.account_id, &app.operator_token));
    held.wait_for_waiters(2, "the deletion").await;
    held.release().await;

    let created = creating.await.expect("join");
    let deleted = deleting.await.expect("join");
    deleted.expect("the deletion succeeds");
    match created {
        Ok(response) => {
            let secret = response.into_inner().secret;
            assert!(
                !app.verify(&secret, &[]).await.active,
                "a token of a deleted account verifies"
            );
        }
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
    }
}

/// A credential looping CreateToken does not keep its account from
/// being deleted: the deletion succeeds, every creation succeeds or is
/// NOT_FOUND (never INTERNAL), and no token created verifies afterwards.
async fn deleting_an_account_while_its_tokens_are_being_created_succeeds(app: TestApp) {
    let robot = app.robot("ci").await;
    let looping = {
        let client = app.tokens();
        let account_id = robot.account_id.clone();
        let operator = app.operator_token.clone();
        tokio::spawn(async move {
            let mut secrets = Vec::new();
            for i in 0..300 {
                let request = bearer(
                    pb::CreateTokenRequest {
                        account_id: account_id.clone(),
                        name: format!("loop-{i}"),
                        ..Default::default()
                    },
                    &operator,
                );
                match client.clone().create_token(request).await {
                    Ok(response) => secrets.push(response.into_inner().secret),
                    Err(status) if status.code() == Code::NotFound => return (secrets, true),
                    Err(status) => panic!("creation {i} failed: {status:?}"),
                }
            }
            (secrets, false)
        })
    };
    // Let the loop get going, then delete under it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = app
            .tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: robot.account_id.clone(),
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await
            .expect("list")
            .into_inner()
            .tokens
            .len();
        if listed >= 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the loop never created tokens"
        );
        tokio::task::yield_now().await;
    }
    delete_account(&app, &robot.account_id, &app.operator_token)
        .await
        .expect("the deletion succeeds while tokens are being created");
    let (secrets, refused) = looping.await.expect("the loop never failed otherwise");
    assert!(refused, "the loop finished before the deletion");
    for secret in &secrets {
        assert!(
            !app.verify(secret, &[]).await.active,
            "a token of a deleted account verifies"
        );
    }
}
crate::both_backends!(deleting_an_account_while_its_tokens_are_being_created_succeeds);

/// Starts `create` (a call that creates a token with `credential`) while
/// a transaction of the test's own holds `account_id`'s row, which the
/// creation locks first; once it queues there, `end` ends the credential
/// (it takes no account lock, so it commits); then the hold ends. The
/// creation must then fail as the ended credential would: a new secret
/// never outlives the credential that asked for it.
async fn creation_racing<T: std::fmt::Debug + Send + 'static>(
    app: &TestApp,
    account_id: &str,
    create: impl std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
    end: impl std::future::Future<Output = Result<(), tonic::Status>>,
    what: &str,
) {
    let mut held = Held::take(
        &app.db.url,
        "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE",
        Some(account_id),
    )
    .await;
    let creating = tokio::spawn(create);
    held.wait_for_waiters(1, "the creation").await;
    end.await.expect(what);
    held.release().await;
    let created = creating.await.expect("join");
    assert_status(
        created,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );
}

/// `SignOut` of `session`, to race a call with.
fn sign_out(
    app: &TestApp,
    session: String,
) -> impl std::future::Future<Output = Result<(), tonic::Status>> {
    let mut accounts = app.accounts();
    async move {
        accounts
            .sign_out(bearer(pb::SignOutRequest {}, &session))
            .await
            .map(drop)
    }
}

/// A call's answer.
type Answer<T> = Result<tonic::Response<T>, tonic::Status>;

/// `DeleteAccount` of `account_id` with `credential`, to race a call with.
fn delete_account(
    app: &TestApp,
    account_id: &str,
    credential: &str,
) -> impl std::future::Future<Output = Answer<pb::DeleteAccountResponse>> + Send + 'static {
    let mut accounts = app.accounts();
    let request = bearer(
        pb::DeleteAccountRequest {
            account_id: account_id.to_owned(),
        },
        credential,
    );
    async move { accounts.delete_account(request).await }
}

/// `RenewToken` of `token_id` with `credential`, for the server's default
/// lifetime from now, to race a call with.
fn renew_token(
    app: &TestApp,
    token_id: &str,
    credential: &str,
) -> impl std::future::Future<Output = Answer<pb::RenewTokenResponse>> + Send + 'static {
    let mut tokens = app.tokens();
    let request = bearer(
        pb::RenewTokenRequest {
            token_id: token_id.to_owned(),
            ..Default::default()
        },
        credential,
    );
    async move { tokens.renew_token(request).await }
}

/// `CreateToken` of a token named `name` for `account_id` with
/// `credential`, to race a call with.
fn create_token(
    app: &TestApp,
    account_id: &str,
    name: &str,
    credential: &str,
) -> impl std::future::Future<Output = Answer<pb::CreateTokenResponse>> + Send + 'static {
    let mut tokens = app.tokens();
    let request = bearer(
        pb::CreateTokenRequest {
            account_id: account_id.to_owned(),
            name: name.to_owned(),
            ..Default::default()
        },
        credential,
    );
    async move { tokens.create_token(request).await }
}

/// A token creation queued behind its account's row when its session is
/// signed out fails: the sign-out was acknowledged first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_creation_loses_to_a_concurrent_sign_out_of_its_session() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    creation_racing(
        &app,
        &alice.account_id,
        create_token(&app, &alice.account_id, "late", &session),
        sign_out(&app, session),
        "SignOut",
    )
    .await;
}

/// A token creation queued behind its account's row while the session
/// asking for it expires fails: the store judges the creator by the clock
/// once it holds the lock, not at the time read before the wait. (It once
/// did the latter: an expired session's creation landed, found by an
/// attacker.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_creation_loses_to_its_sessions_expiry_during_the_wait() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let expiry = async {
        // Past the default 12-hour session.
        app.clock().advance(Duration::from_secs(13 * 3600));
        Ok(())
    };
    creation_racing(
        &app,
        &alice.account_id,
        create_token(&app, &alice.account_id, "late", &session),
        expiry,
        "the session's expiry",
    )
    .await;
}

/// A rotation queued behind its account's row when the session asking
/// for it is signed out fails: no fresh secret for an ended session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_loses_to_a_concurrent_sign_out_of_its_session() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let (ci, _) = app.token(&session, &alice.account_id, "ci", &[]).await;
    let rotate = {
        let client = app.tokens();
        let request = bearer(
            pb::RotateTokenRequest {
                token_id: ci.token_id.clone(),
            },
            &session,
        );
        async move { client.clone().rotate_token(request).await }
    };
    creation_racing(
        &app,
        &alice.account_id,
        rotate,
        sign_out(&app, session),
        "SignOut",
    )
    .await;
}

/// A renewal queued behind its account's row when the session asking for
/// it is signed out fails: an ended session extends no token's life.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_loses_to_a_concurrent_sign_out_of_its_session() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let (ci, _) = app.token(&session, &alice.account_id, "ci", &[]).await;
    // The server's default lifetime from now is later than the token's
    // own, so a renewal that landed would show.
    creation_racing(
        &app,
        &alice.account_id,
        renew_token(&app, &ci.token_id, &session),
        sign_out(&app, session),
        "SignOut",
    )
    .await;
    let listed = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: ci.token_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("the token is still there")
        .into_inner()
        .token
        .expect("a token");
    assert_eq!(
        listed.expire_time, ci.expire_time,
        "the refused renewal changed nothing"
    );
}

/// A renewal queued behind its account's row, behind the account's
/// deletion: the deletion goes first (the row's lock is granted in the
/// order asked), and the renewal then finds no account and answers as it
/// would have after the deletion (the token is gone with its account):
/// NOT_FOUND, not FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_queued_behind_its_accounts_deletion_is_not_found() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = app.robot("ci").await;
    let (ci, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    let mut held = Held::take(
        &app.db.url,
        "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE",
        Some(&robot.account_id),
    )
    .await;
    let deleting = tokio::spawn(delete_account(&app, &robot.account_id, &app.operator_token));
    let deletion = held.wait_for_blocked_by_me("the deletion").await;
    let renewing = tokio::spawn(renew_token(&app, &ci.token_id, &app.operator_token));
    held.wait_for_blocked_by_me_besides(deletion, "the renewal")
        .await;
    held.release().await;

    deleting
        .await
        .expect("join")
        .expect("the deletion succeeds");
    let renewed = renewing.await.expect("join");
    assert_status(renewed, Code::NotFound, "ERROR_REASON_TOKEN_NOT_FOUND");
    assert!(
        !app.verify(&secret, &[]).await.active,
        "a token of a deleted account verifies"
    );
}

/// A renewal or a rotation queued behind its account's row while the
/// token ends (its last use is spent, which takes no account lock, or it
/// expires) is refused as one sent after that end is: FAILED_PRECONDITION,
/// and the token is left as it was. (The renewal once checked every state
/// but the uses left: it answered OK, extended the used-up token and
/// audited a renewal. Both judged expiry at the time read before the wait:
/// a token expired during it was renewed back to life, or rotated into an
/// expired successor. Found by attackers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_queued_while_its_token_ends_is_refused() {
    let app = TestApp::spawn(Backend::Postgres).await;
    // A token may rotate only itself, and its own use as the credential
    // would spend one: the changes are asked for with a session.
    let (alice, session) = app.person("alice").await;
    for (last_use, rotate) in [(true, false), (true, true), (false, false), (false, true)] {
        let case = format!("ended by its last use: {last_use}, rotated: {rotate}");
        let created = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: format!("ending-{last_use}-{rotate}"),
                    max_uses: last_use.then_some(2),
                    ttl: (!last_use).then_some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                    ..Default::default()
                },
                &session,
            ))
            .await
            .expect("create a token")
            .into_inner();
        let token = created.token.expect("token");
        assert!(
            app.verify(&created.secret, &[]).await.active,
            "{case}: live"
        );
        let mut held = Held::take(
            &app.db.url,
            "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE",
            Some(&alice.account_id),
        )
        .await;
        let changing = if rotate {
            let mut tokens = app.tokens();
            let request = bearer(
                pb::RotateTokenRequest {
                    token_id: token.token_id.clone(),
                },
                &session,
            );
            tokio::spawn(async move { tokens.rotate_token(request).await.map(drop) })
        } else {
            let renewal = renew_token(&app, &token.token_id, &session);
            tokio::spawn(async move { renewal.await.map(drop) })
        };
        held.wait_for_blocked_by_me("the change").await;
        if last_use {
            assert!(
                app.verify(&created.secret, &[]).await.active,
                "{case}: the last use, while the change waits"
            );
        } else {
            app.clock().advance(Duration::from_secs(120));
        }
        assert!(
            !app.verify(&created.secret, &[]).await.active,
            "{case}: ended while the change waits"
        );
        held.release().await;
        assert_status(
            changing.await.expect("join"),
            Code::FailedPrecondition,
            "ERROR_REASON_TOKEN_INACTIVE",
        );
        let after = app
            .tokens()
            .get_token(bearer(
                pb::GetTokenRequest {
                    token_id: token.token_id.clone(),
                },
                &app.operator_token,
            ))
            .await
            .expect("the token is still there")
            .into_inner()
            .token
            .expect("a token");
        assert_eq!(after.expire_time, token.expire_time, "{case}");
        assert_eq!(after.replaced_by_token_id, "", "{case}");
        assert_eq!(after.uses_remaining, last_use.then_some(0), "{case}");
        assert!(
            !app.verify(&created.secret, &[]).await.active,
            "{case}: verifies after the refused change"
        );
    }
}

/// An operator's token renewing a token it created for another account
/// while the operator's account is deleted (the deletion's cascade revokes
/// that token): both calls finish, the renewal refused as its caller is
/// gone. (The deletion once locked its own credentials after the cascade,
/// the reverse of the renewal's order: a deadlock, found by an attacker,
/// one of the two answered UNAVAILABLE.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_by_a_deleted_accounts_token_does_not_deadlock_with_the_deletion() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let night_ops = app
        .accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "night-ops".into(),
                kind: pb::AccountKind::Robot as i32,
                role: pb::AccountRole::Operator as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create an operator robot")
        .into_inner()
        .account
        .expect("account");
    let (_, operator) = app
        .token(&app.operator_token, &night_ops.account_id, "ops", &[])
        .await;
    let robot = app.robot("ci").await;
    // The robot's token descends from the operator token's family.
    let (target, _) = app.token(&operator, &robot.account_id, "deploy", &[]).await;
    let mut held = Held::take(
        &app.db.url,
        "SELECT token_id FROM tokens WHERE token_id = $1 FOR UPDATE",
        Some(&target.token_id),
    )
    .await;
    let deleting = tokio::spawn(delete_account(
        &app,
        &night_ops.account_id,
        &app.operator_token,
    ));
    let deletion = held.wait_for_blocked_by_me("the deletion's cascade").await;
    let renewing = tokio::spawn(renew_token(&app, &target.token_id, &operator));
    // The renewal queues behind the deletion, on its caller's row.
    held.wait_for_blocked_by(deletion, "the renewal").await;
    held.release().await;
    deleting
        .await
        .expect("join")
        .expect("the deletion finishes");
    assert_status(
        renewing.await.expect("join"),
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );
}

/// A sign-out that arrives after a token creation has checked its session
/// (the creation paused there by a test's own uncommitted token holding
/// the new token's name) waits for the creation to finish: it cannot be
/// acknowledged while a creation it would have refused is in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sign_out_waits_for_a_creation_that_already_checked_its_session() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let mut held = Held::take(
        &app.db.url,
        "INSERT INTO tokens (token_id, account_id, name, live_name, digest, create_time, family_id) \
         VALUES ('held', $1, 'racing', 'racing', '\\x00'::bytea, 0, 'held')",
        Some(&alice.account_id),
    )
    .await;
    let creating = {
        let client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "racing".into(),
                ..Default::default()
            },
            &session,
        );
        tokio::spawn(async move { client.clone().create_token(request).await })
    };
    held.wait_for_waiters(1, "the creation, past its check")
        .await;
    let signing_out = {
        let client = app.accounts();
        let request = bearer(pb::SignOutRequest {}, &session);
        tokio::spawn(async move { client.clone().sign_out(request).await })
    };
    held.wait_for_waiters(2, "the sign-out, behind the creation")
        .await;
    assert!(!signing_out.is_finished(), "acknowledged mid-creation");
    held.release().await;
    let created = creating
        .await
        .expect("join")
        .expect("the creation finishes");
    signing_out
        .await
        .expect("join")
        .expect("the sign-out finishes");
    assert!(
        app.verify(&created.into_inner().secret, &[]).await.active,
        "a token created before the sign-out stays, as every token does"
    );
}

/// An operator creating a token for another account while the operator's
/// own account is signed out everywhere: both calls finish, in some order.
/// (The creation once locked the creator's account row after the new
/// token's, the reverse of SignOutEverywhere's order: a deadlock, one of
/// them answered UNAVAILABLE.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_for_another_account_does_not_deadlock_with_signing_the_creator_out_everywhere() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let robot = app.robot("ci").await;
    let operator = app
        .accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "night-ops".into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                role: pb::AccountRole::Operator as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create an operator person")
        .into_inner()
        .account
        .expect("account");
    let first = sign_in(&app, "night-ops", PASSWORD).await.expect("sign in");
    let second = sign_in(&app, "night-ops", PASSWORD)
        .await
        .expect("sign in again");
    let mut held = Held::take(
        &app.db.url,
        "SELECT account_id FROM accounts WHERE account_id = $1 FOR UPDATE",
        Some(&operator.account_id),
    )
    .await;
    let everywhere = {
        let client = app.accounts();
        let request = bearer(
            pb::SignOutEverywhereRequest {
                account_id: operator.account_id.clone(),
            },
            &second,
        );
        tokio::spawn(async move { client.clone().sign_out_everywhere(request).await })
    };
    held.wait_for_waiters(1, "SignOutEverywhere").await;
    let creating = {
        let client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "deploy".into(),
                ..Default::default()
            },
            &first,
        );
        tokio::spawn(async move { client.clone().create_token(request).await })
    };
    // The creation either finishes under the hold or queues behind it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !creating.is_finished() && tokio::time::Instant::now() < deadline {
        if held.waiting().await >= 2 {
            break;
        }

        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    held.release().await;
    everywhere
        .await
        .expect("join")
        .expect("SignOutEverywhere finishes");
    let created = creating.await.expect("join");
    if let Err(status) = &created {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
}
