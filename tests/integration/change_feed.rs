//! An ordinary account floods the change channel; revocations made on one
//! replica must still reach the other within the documented staleness bound
//! (`CHANNEL_MAX_SILENCE`, 1 s): a replica that falls behind on its channel
//! must stop trusting its cache, not serve stale verdicts from it.
//!
//! This is a correctness bound, not a speed test: on a slow machine the
//! replica falls further behind, bypasses its cache and answers from the
//! store, which is still correct. Only a verdict answered active more than
//! the bound after the revocation returned fails it.

use std::time::{Duration, Instant};

use identity::{domain::service::CHANNEL_MAX_SILENCE, storage::ChangeFeed};

use crate::support::{TestApp, bearer, pb};

/// The flooder's own tokens: each is cached on replica B, then reported
/// leaked, a thousand per report (one notification each, in one commit).
/// Enough that, before eviction was indexed and the heartbeat proved
/// currency, B fell well over the bound behind while still trusting its
/// cache (a scan of every entry per notification: quadratic in this).
const FLOOD_TOKENS: usize = 6_000;
/// Victim tokens revoked on A while the flood is being delivered to B.
const VICTIMS: usize = 12;
/// Calls in flight while setting up.
const PARALLEL: usize = 8;

/// Runs `make(i)` for every `i` in `0..n`, `PARALLEL` at a time.
async fn in_parallel<T, F>(n: usize, make: impl Fn(usize) -> F) -> Vec<T>
where
    T: Send + 'static,
    F: std::future::Future<Output = T> + Send + 'static,
{
    let mut out = Vec::with_capacity(n);
    let mut running = tokio::task::JoinSet::new();
    for i in 0..n {
        if running.len() == PARALLEL {
            out.push(running.join_next().await.expect("a task").expect("task"));
        }
        running.spawn(make(i));
    }
    while let Some(done) = running.join_next().await {
        out.push(done.expect("task"));
    }
    out
}

/// Verifies `secret` on `replica` until the answer came from its cache.
async fn cached_on(replica: &TestApp, secret: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (hits, _) = replica.identity.cache().stats();
        assert!(replica.verify(secret, &[]).await.active);
        if replica.identity.cache().stats().0 > hits {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the verdict never got cached"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn a_flood_of_notifications_does_not_stretch_cross_replica_staleness(feed: ChangeFeed) {
    let a = TestApp::spawn_on_feed(feed, |config| {
        config.identity.cache_ttl = Duration::from_secs(3600);
        // Above the per-account cap (which bounds a real flood to 1,000
        // tokens per account): the pipeline is measured beyond it.
        config.identity.max_tokens_per_account = u32::try_from(FLOOD_TOKENS + 100).expect("fits");
    })
    .await;
    let setup = Instant::now();
    let b = a
        .replica_with(|config| {
            config.identity.cache_entries = 100_000;
            // Nothing may leave B's cache by time: only an eviction or
            // distrust of the channel can end a stale verdict.
            config.identity.cache_ttl = Duration::from_secs(3600);
        })
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !b.identity.cache().is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "B's cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The flooder: an ordinary person, making tokens of its own.
    let (flooder, session) = a.person("flooder").await;
    let flood: Vec<String> = in_parallel(FLOOD_TOKENS, |i| {
        let mut tokens = a.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: flooder.account_id.clone(),
                name: format!("f{i}"),
                ..Default::default()
            },
            &session,
        );
        async move {
            tokens
                .create_token(request)
                .await
                .expect("the flooder creates a token")
                .into_inner()
                .secret
        }
    })
    .await;
    // In use on B, so B holds a verdict for each.
    let verifier = b.verifier_token().await;
    let active = in_parallel(flood.len(), |i| {
        let mut tokens = b.tokens();
        let request = bearer(
            pb::VerifyTokenRequest {
                token: flood[i].clone(),
                ..Default::default()
            },
            &verifier,
        );
        async move {
            tokens
                .verify_token(request)
                .await
                .expect("verify")
                .into_inner()
                .active
        }
    })
    .await;
    assert!(active.into_iter().all(|a| a));

    let robot = a.robot("victims").await;
    let mut victims = Vec::with_capacity(VICTIMS);
    for i in 0..VICTIMS {
        victims.push(
            a.token(&a.operator_token, &robot.account_id, &format!("v{i}"), &[])
                .await,
        );
    }
    for (_, secret) in &victims {
        cached_on(&b, secret).await;
    }

    println!("flood test set up in {:?}", setup.elapsed());
    // The flood: every report at once, as fast as the flooder can.
    let reports: Vec<Vec<String>> = flood.chunks(1000).map(<[String]>::to_vec).collect();
    let mut flooding = tokio::task::JoinSet::new();
    for secrets in reports {
        let mut tokens = a.tokens();
        flooding.spawn(async move {
            tokens
                .revoke_leaked_token(pb::RevokeLeakedTokenRequest { secrets })
                .await
                .expect("a leak report")
        });
    }
    // Every report committed: B has all their notifications to apply, and
    // the victims' revocations queue behind them.
    while let Some(done) = flooding.join_next().await {
        done.expect("task");
    }
    // Revoke every victim on A, back to back, behind the flood.
    let mut revoked = Vec::with_capacity(VICTIMS);
    for (token, _) in &victims {
        a.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: token.token_id.clone(),
                },
                &a.operator_token,
            ))
            .await
            .expect("revoke");
        revoked.push(Instant::now());
    }
    // Ask B about each in turn until it answers each inactive, keeping the
    // start of the last call it answered active: the cache check happens
    // after it, so it bounds when B last trusted the stale verdict.
    let mut last_active: Vec<Option<Instant>> = vec![None; VICTIMS];
    let mut pending: Vec<usize> = (0..VICTIMS).collect();
    while !pending.is_empty() {
        let mut still = Vec::with_capacity(pending.len());
        for i in pending {
            let asked = Instant::now();
            if b.verify(&victims[i].1, &[]).await.active {
                last_active[i] = Some(asked);
                still.push(i);
            }
        }
        pending = still;
        assert!(
            revoked[0].elapsed() < Duration::from_secs(60),
            "B never saw the revocations"
        );
    }
    let mut staleness: Vec<Duration> = last_active
        .iter()
        .zip(&revoked)
        .map(|(last, revoked)| last.map_or(Duration::ZERO, |at| at.duration_since(*revoked)))
        .collect();
    staleness.sort();
    let median = staleness[staleness.len() / 2];
    let max = staleness[staleness.len() - 1];
    println!(
        "cross-replica staleness under a flood of {FLOOD_TOKENS} notifications, \
         {VICTIMS} revocations: median {median:?}, max {max:?}"
    );
    assert!(
        max <= CHANNEL_MAX_SILENCE,
        "a revoked token stayed active on the other replica for {max:?}, \
         over the documented bound of {CHANNEL_MAX_SILENCE:?} (all: {staleness:?})"
    );
}
crate::both_feeds!(a_flood_of_notifications_does_not_stretch_cross_replica_staleness);
