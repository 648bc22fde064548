//! What keeps a long run flat: the token limit's count of an account's live
//! tokens reads only its live ones (an index range, however many revoked
//! or rotated tokens the account has), and must still count exactly those.

use std::time::Duration;

use identity::domain::time::{Clock as _, Timestamp};
use tonic::Code;

use crate::support::{Backend, TestApp, assert_status, bearer, pb};

async fn create(
    app: &TestApp,
    creator: &str,
    account_id: &str,
    name: &str,
    max_uses: Option<i64>,
    ttl: Option<Duration>,
) -> Result<pb::CreateTokenResponse, tonic::Status> {
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.into(),
                name: name.into(),
                max_uses,
                ttl: ttl.map(|t| prost_types::Duration {
                    seconds: i64::try_from(t.as_secs()).expect("seconds"),
                    nanos: 0,
                }),
                ..Default::default()
            },
            creator,
        ))
        .await
        .map(tonic::Response::into_inner)
}

async fn revoke(app: &TestApp, creator: &str, token_id: String) {
    app.tokens()
        .revoke_token(bearer(pb::RevokeTokenRequest { token_id }, creator))
        .await
        .expect("revoke");
}

fn refused(answer: Result<pb::CreateTokenResponse, tonic::Status>) {
    assert_status(
        answer,
        Code::ResourceExhausted,
        "ERROR_REASON_TOKEN_LIMIT_REACHED",
    );
}

/// Revoked, used-up, expired and rotated-away tokens do not count; the
/// current ones do, and so does a token whose revocation time is still to
/// come by the server's clock (the count's second range).
async fn the_live_count_skips_every_kind_of_dead_token(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let id = alice.account_id.as_str();
    let token_id = |r: pb::CreateTokenResponse| r.token.expect("token").token_id;
    for i in 0..20 {
        let dead = create(&app, &session, id, &format!("dead-{i}"), None, None).await;
        revoke(&app, &session, token_id(dead.expect("under the cap"))).await;
    }
    let once = create(&app, &session, id, "once", Some(1), None)
        .await
        .expect("once");
    assert!(app.verify(&once.secret, &[]).await.active, "its one use");
    create(
        &app,
        &session,
        id,
        "short",
        None,
        Some(Duration::from_secs(60)),
    )
    .await
    .expect("short");
    app.clock().advance(Duration::from_secs(120));
    // Dead by now: 20 revoked, one used up, one expired.
    let a = create(&app, &session, id, "a", None, None)
        .await
        .expect("a");
    create(&app, &session, id, "b", None, None)
        .await
        .expect("b");
    app.tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token_id(a),
            },
            &session,
        ))
        .await
        .expect("rotation: its predecessor no longer counts");
    let c = create(&app, &session, id, "c", None, None)
        .await
        .expect("the third live token");
    refused(create(&app, &session, id, "d", None, None).await);

    // Revoked now, but with the clock set back ten seconds the revocation
    // is in the future: c is live again, by the count's rule.
    revoke(&app, &session, token_id(c)).await;
    let revoked_at = app.clock().now();
    app.clock()
        .set(Timestamp::from_micros(revoked_at.as_micros() - 10_000_000));
    refused(create(&app, &session, id, "e", None, None).await);
    app.clock()
        .set(Timestamp::from_micros(revoked_at.as_micros() + 1_000_000));
    create(&app, &session, id, "f", None, None)
        .await
        .expect("c's revocation has come");
    refused(create(&app, &session, id, "g", None, None).await);
}

mod the_live_count_skips_every_kind_of_dead_token {
    use super::*;

    fn limit(config: &mut identity::config::Config) {
        config.identity.max_tokens_per_account = 3;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        super::the_live_count_skips_every_kind_of_dead_token(
            TestApp::spawn_with(Backend::Sqlite, limit).await,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        super::the_live_count_skips_every_kind_of_dead_token(
            TestApp::spawn_with(Backend::Postgres, limit).await,
        )
        .await;
    }
}
