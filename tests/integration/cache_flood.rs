//! A flood of forged tokens (well-formed, since the CRC32 checksum is
//! public) must not push real verdicts out of the verification cache: each
//! forged token costs a lookup, and its negative verdict is kept apart from
//! the positive ones.

use std::time::Duration;

use identity::domain::credential::{CredentialKind, Secret};

use crate::support::{Backend, TestApp, bearer, pb};

/// Valid tokens whose verdicts are cached before the flood.
const VALID: usize = 32;
/// Forged tokens sent in the flood: several times the cache's capacity.
const FORGED: usize = 4_000;
/// Calls in flight during the flood.
const FLOODERS: usize = 4;

async fn a_flood_of_forged_tokens_evicts_no_valid_verdict(backend: Backend) {
    let app = TestApp::spawn_with(backend, |config| {
        // 32 entries a shard: small enough for the flood to fill every shard
        // many times over, large enough for the valid verdicts.
        config.identity.cache_entries = 1024;
        // Nothing may expire by time while the test runs, however slowly.
        config.identity.cache_ttl = Duration::from_secs(3600);
    })
    .await;
    let cache = app.identity.cache();
    // With PostgreSQL the cache is bypassed until the change channel is up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cache.is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let robot = app.robot("ci").await;
    let mut valid = Vec::with_capacity(VALID);
    for i in 0..VALID {
        let (_, secret) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("t{i}"),
                &[],
            )
            .await;
        // The first verification fills the cache; the second is a hit.
        assert!(app.verify(&secret, &[]).await.active);
        valid.push(secret);
    }
    let (_, before) = cache.stats();
    for secret in &valid {
        assert!(app.verify(secret, &[]).await.active);
    }
    let (_, warm) = cache.stats();
    assert_eq!(warm - before, 0, "the valid verdicts were cached");

    let mut flooders = tokio::task::JoinSet::new();
    for _ in 0..FLOODERS {
        let mut client = app.tokens();
        let verifier = app.verifier_token().await;
        flooders.spawn(async move {
            for _ in 0..FORGED / FLOODERS {
                let forged = Secret::generate(CredentialKind::PersonalAccessToken);
                let verdict = client
                    .verify_token(bearer(
                        pb::VerifyTokenRequest {
                            token: forged.expose().to_owned(),
                            ..Default::default()
                        },
                        &verifier,
                    ))
                    .await
                    .expect("verify a forged token")
                    .into_inner();
                assert_eq!(verdict.reason, pb::InactiveReason::Unknown as i32);
            }
        });
    }
    while let Some(done) = flooders.join_next().await {
        done.expect("a flooder");
    }

    // Each call below looks up two verdicts (the verifier's token, then the
    // valid one), so any miss is a verdict the flood pushed out.
    let (_, before) = cache.stats();
    for secret in &valid {
        assert!(app.verify(secret, &[]).await.active);
    }
    let (_, after) = cache.stats();
    let missed = after - before;
    eprintln!("after {FORGED} forged tokens, {missed} of {VALID} valid verdicts missed");
    assert_eq!(missed, 0, "forged tokens evicted valid verdicts");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tokens_evicts_no_valid_verdict_sqlite() {
    a_flood_of_forged_tokens_evicts_no_valid_verdict(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tokens_evicts_no_valid_verdict_postgres() {
    a_flood_of_forged_tokens_evicts_no_valid_verdict(Backend::Postgres).await;
}
