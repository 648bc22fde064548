//! SQLite keeps what it acknowledged: two `identity migrate` started at once
//! on a fresh file both succeed, and a revocation whose caller gave up while
//! it waited for its commit is still evicted from this replica's cache.

use crate::support::binary::{identity_command, run, sqlite_file};

/// Two `identity migrate` processes of the real binary, started together
/// against a fresh database file, both succeed; a few times, since the race
/// is the processes' own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_migrations_at_once_both_succeed() {
    for round in 0..4 {
        let (_dir, _path, url) = sqlite_file();
        let command = || {
            let mut command = identity_command(&url);
            command.arg("migrate");
            command
        };
        let (first, second) = tokio::join!(run(command()), run(command()));
        for (which, finished) in [("first", first), ("second", second)] {
            assert!(
                finished.status.success(),
                "round {round}: the {which} migrate failed ({}); stderr:\n{}",
                finished.status,
                finished.stderr
            );
        }
    }
}

/// A `RevokeToken` whose deadline passes while its write waits for the
/// database (an outside writer holds SQLite's write lock) still commits once
/// the lock is released, and is then evicted from the server's cache: the
/// token is answered not active at once, not after the cache's 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_whose_caller_gave_up_is_still_evicted() {
    use sqlx::Connection as _;
    use std::time::{Duration, Instant};
    use tonic::Code;

    use crate::support::{Backend, TestApp, bearer, pb};

    let app = TestApp::spawn(Backend::Sqlite).await;
    let (alice, session) = app.person("alice").await;
    let (token, secret) = app.token(&session, &alice.account_id, "ci", &[]).await;
    // Verified twice: the second answer comes from the cache.
    assert!(app.verify(&secret, &[]).await.active);
    assert!(app.verify(&secret, &[]).await.active);

    let mut outside = sqlx::SqliteConnection::connect(&app.db.url)
        .await
        .expect("open the database from outside");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut outside)
        .await
        .expect("hold the write lock");
    let mut request = bearer(
        pb::RevokeTokenRequest {
            token_id: token.token_id.clone(),
        },
        &session,
    );
    request.set_timeout(Duration::from_millis(300));
    let status = app
        .tokens()
        .revoke_token(request)
        .await
        .expect_err("the revocation cannot commit before its deadline");
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut outside)
        .await
        .expect("release the write lock");

    // The server's write now commits (it waited within its busy timeout);
    // wait for it to show in the database, then for the server's answer.
    let limit = Instant::now() + Duration::from_secs(5);
    loop {
        let revoked: Option<i64> =
            sqlx::query_scalar("SELECT revoke_time FROM tokens WHERE token_id = ?")
                .bind(&token.token_id)
                .fetch_one(&mut outside)
                .await
                .expect("read the token");
        if revoked.is_some() {
            break;
        }
        assert!(
            Instant::now() < limit,
            "the revocation was never committed after its caller gave up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Eviction follows the commit in the same task; allow it that instant,
    // but far less than the cache's 30 s.
    loop {
        if !app.verify(&secret, &[]).await.active {
            break;
        }
        assert!(
            Instant::now() < limit,
            "the revoked token is still answered active from the cache"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    app.stop().await;
}
