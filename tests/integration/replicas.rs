//! Several replicas on one PostgreSQL: each caches verdicts, and every
//! revocation must reach all of them, through either change feed
//! (`both_feeds!`). (The delay itself is measured by the benchmark harness,
//! not asserted here.)

use std::time::Duration;

use identity::storage::ChangeFeed;

use crate::support::{Backend, TestApp, bearer, pb};

/// Polls `replica` until `secret` is inactive, or fails after a generous
/// bound (a correctness check, not a latency measurement).
pub(crate) async fn until_inactive(replica: &TestApp, secret: &str) -> pb::VerifyTokenResponse {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let verdict = replica.verify(secret, &[]).await;
        if !verdict.active {
            return verdict;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a replica kept answering active"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until a replica's cache is in use (its change channel is up).
pub(crate) async fn until_cache_in_use(replica: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !replica.identity.cache().is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn a_revocation_on_one_replica_reaches_every_other_replica(feed: ChangeFeed) {
    let a = TestApp::spawn_on_feed(feed, |_| {}).await;
    let b = a.replica().await;
    let c = a.replica().await;
    for replica in [&a, &b, &c] {
        until_cache_in_use(replica).await;
    }
    let robot = a.robot("ci").await;
    for round in 0..5 {
        let (token, secret) = a
            .token(
                &a.operator_token,
                &robot.account_id,
                &format!("t{round}"),
                &[],
            )
            .await;
        // Warm every replica's cache with the active verdict.
        for replica in [&a, &b, &c] {
            assert!(replica.verify(&secret, &[]).await.active);
            assert!(replica.verify(&secret, &[]).await.active);
        }
        a.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: token.token_id,
                },
                &a.operator_token,
            ))
            .await
            .expect("revoke");
        // The replica that revoked answers at once, with no polling.
        assert_eq!(
            a.verify(&secret, &[]).await.reason,
            pb::InactiveReason::Revoked as i32
        );
        for replica in [&b, &c] {
            assert_eq!(
                until_inactive(replica, &secret).await.reason,
                pb::InactiveReason::Revoked as i32
            );
        }
    }
    let (hits, _) = b.identity.cache().stats();
    assert!(hits > 0, "the replicas did serve from their caches");

    // Account-wide changes travel too: disabling on B is honoured by C.
    let (_, secret) = a
        .token(&a.operator_token, &robot.account_id, "wide", &[])
        .await;
    assert!(c.verify(&secret, &[]).await.active);
    b.accounts()
        .disable_account(bearer(
            pb::DisableAccountRequest {
                account_id: robot.account_id.clone(),
            },
            &b.operator_token,
        ))
        .await
        .expect("disable");
    assert_eq!(
        until_inactive(&c, &secret).await.reason,
        pb::InactiveReason::AccountDisabled as i32
    );
    b.accounts()
        .enable_account(bearer(
            pb::EnableAccountRequest {
                account_id: robot.account_id.clone(),
            },
            &b.operator_token,
        ))
        .await
        .expect("enable");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !c.verify(&secret, &[]).await.active {
        assert!(
            tokio::time::Instant::now() < deadline,
            "enabling did not reach the other replica"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
crate::both_feeds!(a_revocation_on_one_replica_reaches_every_other_replica);

async fn a_lost_change_channel_yields_no_stale_positive_beyond_the_documented_bound(
    feed: ChangeFeed,
) {
    use sqlx::Connection as _;
    let a = TestApp::spawn_on_feed(feed, |_| {}).await;
    let b = a.replica().await;
    until_cache_in_use(&b).await;
    let robot = a.robot("ci").await;
    let mut admin = sqlx::PgConnection::connect(&a.db.url)
        .await
        .expect("connect");
    for round in 0..10 {
        let (token, secret) = a
            .token(
                &a.operator_token,
                &robot.account_id,
                &format!("t{round}"),
                &[],
            )
            .await;
        assert!(b.verify(&secret, &[]).await.active);
        assert!(b.verify(&secret, &[]).await.active, "now cached on B");
        // Cut every replica's change channel, then revoke while it is down:
        // the notification is lost (a polled change is not, but the
        // replica cannot know what it missed either).
        let cut: Vec<i32> = sqlx::query_scalar(&format!(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND {}",
            a.feed_connections()
        ))
        .fetch_all(&mut admin)
        .await
        .expect("find listeners");
        assert!(!cut.is_empty(), "the replicas listen for changes");
        for pid in cut {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut admin)
                .await
                .expect("terminate");
        }
        a.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: token.token_id,
                },
                &a.operator_token,
            ))
            .await
            .expect("revoke");
        // B may answer from its cache only until it notices the cut: at once
        // when the connection reports it, and at the latest when the
        // channel's heartbeat has been silent for CHANNEL_MAX_SILENCE.
        let bound = identity::domain::service::CHANNEL_MAX_SILENCE + Duration::from_millis(500);
        let deadline = tokio::time::Instant::now() + bound;
        while b.verify(&secret, &[]).await.active {
            assert!(
                tokio::time::Instant::now() < deadline,
                "round {round}: stale beyond the documented bound"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Once inactive, never active again: the missed notification does
        // not come back through a re-enabled cache.
        for _ in 0..20 {
            let verdict = b.verify(&secret, &[]).await;
            assert_eq!(
                verdict.reason,
                pb::InactiveReason::Revoked as i32,
                "round {round}"
            );
        }
        // And B resubscribes by itself.
        until_cache_in_use(&b).await;
    }
}
crate::both_feeds!(a_lost_change_channel_yields_no_stale_positive_beyond_the_documented_bound);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_use_tokens_count_exactly_across_replicas() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = a.replica().await;
    let robot = a.robot("ci").await;
    let created = a
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
            &a.operator_token,
        ))
        .await
        .expect("create")
        .into_inner();
    let verifier = a.verifier_token().await;
    let mut calls = Vec::new();
    for i in 0..30 {
        let replica = if i % 2 == 0 { &a } else { &b };
        let mut client = replica.tokens();
        let request = bearer(
            pb::VerifyTokenRequest {
                token: created.secret.clone(),
                ..Default::default()
            },
            &verifier,
        );
        calls.push(tokio::spawn(
            async move { client.verify_token(request).await },
        ));
    }
    let mut active = 0;
    for call in calls {
        if call
            .await
            .expect("task")
            .expect("verify")
            .into_inner()
            .active
        {
            active += 1;
        }
    }
    assert_eq!(active, 3, "exactly K uses succeed across replicas");
}
