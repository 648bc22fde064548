//! The polled change feed (`IDENTITY_CHANGE_FEED=poll`) beyond what it
//! shares with the notification channel (`both_feeds!` in replicas.rs and
//! change_feed.rs): a change whose row commits after a later one's is
//! still applied, the feed needs no `LISTEN`, and old rows are pruned.

use std::time::Duration;

use identity::domain::retention::RetentionSettings;
use sqlx::Connection as _;

use crate::{
    replicas::{until_cache_in_use, until_inactive},
    retention::count,
    support::{POLL_FEED, TestApp, bearer, pb},
};

/// Waits until a statement on the database at `url` whose text is like
/// `like` waits for a lock.
async fn until_waiting(url: &str, like: &str) {
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
        if waiting > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no statement like {like:?} waited for the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_after_a_later_numbered_one_still_reaches_the_other_replica() {
    let long_ttl = |config: &mut identity::config::Config| {
        // Only an eviction may end a cached verdict.
        config.identity.cache_ttl = Duration::from_secs(3600);
    };
    let a = TestApp::spawn_on_feed(POLL_FEED, long_ttl).await;
    let b = a.replica_with(long_ttl).await;
    until_cache_in_use(&b).await;
    let mut admin = sqlx::PgConnection::connect(&a.db.url)
        .await
        .expect("connect");
    let listening: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN %'",
    )
    .fetch_one(&mut admin)
    .await
    .expect("count listeners");
    assert_eq!(listening, 0, "the polled feed needs no LISTEN");

    let robot = a.robot("ci").await;
    let (first, first_secret) = a
        .token(&a.operator_token, &robot.account_id, "first", &[])
        .await;
    let (second, second_secret) = a
        .token(&a.operator_token, &robot.account_id, "second", &[])
        .await;
    for secret in [&first_secret, &second_secret] {
        assert!(b.verify(secret, &[]).await.active);
        assert!(b.verify(secret, &[]).await.active, "now cached on B");
    }

    // The outside connection takes the next change number and holds a row
    // under the one after it, uncommitted: the first revocation's row gets
    // that number and waits on the unique index until the outside
    // transaction ends, its transaction open.
    let mut outside = sqlx::PgConnection::connect(&a.db.url)
        .await
        .expect("connect the outside connection");
    sqlx::raw_sql("BEGIN")
        .execute(&mut outside)
        .await
        .expect("begin");
    let taken: i64 =
        sqlx::query_scalar("SELECT nextval(pg_get_serial_sequence('changes', 'change_id'))")
            .fetch_one(&mut outside)
            .await
            .expect("take a change number");
    sqlx::query(
        "INSERT INTO changes (change_id, writer, horizon, change_time, kind, subject_id) \
         OVERRIDING SYSTEM VALUE \
         SELECT $1, pg_current_xact_id(), pg_current_xact_id(), 0, 'account', $2",
    )
    .bind(taken + 1)
    .bind(uuid::Uuid::now_v7().to_string())
    .execute(&mut outside)
    .await
    .expect("hold the next change number");

    let mut tokens = a.tokens();
    let request = bearer(
        pb::RevokeTokenRequest {
            token_id: first.token_id.clone(),
        },
        &a.operator_token,
    );
    let held = tokio::spawn(async move { tokens.revoke_token(request).await });
    until_waiting(&a.db.url, "INSERT INTO changes%").await;

    // The second revocation's row, numbered after the first's, commits
    // first, and B applies it: B's polls have moved past the first's
    // number while that row is not yet visible.
    a.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: second.token_id,
            },
            &a.operator_token,
        ))
        .await
        .expect("revoke the second");
    assert_eq!(
        until_inactive(&b, &second_secret).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    let numbers: Vec<i64> = sqlx::query_scalar("SELECT change_id FROM changes ORDER BY change_id")
        .fetch_all(&mut admin)
        .await
        .expect("read the change numbers");
    assert_eq!(
        numbers,
        vec![taken + 2],
        "only the later-numbered change is visible yet"
    );
    assert!(
        b.verify(&first_secret, &[]).await.active,
        "the first revocation has not committed"
    );

    // Now the first commits, under the lower number: B must still apply it.
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut outside)
        .await
        .expect("release the number");
    held.await.expect("task").expect("revoke the first");
    assert_eq!(
        until_inactive(&b, &first_secret).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert!(
        b.identity.cache().is_enabled(),
        "B's cache stayed in use: the eviction came through the feed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_rows_are_pruned_once_every_replica_has_long_seen_them() {
    let app = TestApp::spawn_on_feed(POLL_FEED, |config| {
        config.retention = RetentionSettings {
            credentials: None,
            audit: None,
            interval: Duration::from_millis(20),
            batch: 2,
        };
    })
    .await;
    let url = app.db.url.clone();
    let mut admin = sqlx::PgConnection::connect(&url).await.expect("connect");
    // Five rows dated twenty minutes ago by the database's clock, each
    // written in a transaction of its own: each one's horizon is past the
    // writers of those before it, so all but the last have been visible
    // since a row that is old enough to count was written.
    let old = "INSERT INTO changes (writer, horizon, change_time, kind, subject_id) \
        SELECT pg_current_xact_id(), pg_snapshot_xmin(pg_current_snapshot()), \
        CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT) - 1200000000, \
        'credential', $1";
    let mut old_ids = Vec::new();
    for _ in 0..5 {
        let id = uuid::Uuid::now_v7().to_string();
        sqlx::query(old)
            .bind(&id)
            .execute(&mut admin)
            .await
            .expect("an old row");
        old_ids.push(id);
    }
    let last_old = old_ids.pop().expect("five");
    // A change written now, through the service.
    let robot = app.robot("ci").await;
    let (token, _) = app
        .token(&app.operator_token, &robot.account_id, "t", &[])
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

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: Vec<String> = sqlx::query_scalar("SELECT subject_id FROM changes")
            .fetch_all(&mut admin)
            .await
            .expect("read the changes");
        if old_ids.iter().all(|id| !left.contains(id)) {
            // The newest old row stays: no old row's horizon is past its
            // writer. The recent one stays: it is not old.
            assert!(left.contains(&last_old), "the newest old row was kept");
            assert!(left.contains(&token.token_id), "the recent row was kept");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old rows were never pruned: {} left",
            left.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(count(&url, "changes").await, 2);
}
