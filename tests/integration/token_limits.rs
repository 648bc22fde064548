//! The per-account bounds on token creation: live tokens at most
//! `IDENTITY_MAX_TOKENS_PER_ACCOUNT` (exact under concurrency), and
//! creations per minute on each replica at most
//! `IDENTITY_TOKEN_CREATIONS_PER_MINUTE`.

use tonic::Code;

use crate::support::{Backend, TestApp, assert_status, bearer, pb};

/// Creates a token named `name` for `account_id` as `creator`.
async fn create(
    app: &TestApp,
    creator: &str,
    account_id: &str,
    name: &str,
) -> Result<pb::CreateTokenResponse, tonic::Status> {
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.into(),
                name: name.into(),
                ..Default::default()
            },
            creator,
        ))
        .await
        .map(tonic::Response::into_inner)
}

/// One test per backend, each on a server whose configuration `$adjust`
/// changed.
macro_rules! with_config {
    ($adjust:expr, $name:ident($app:ident) $body:block) => {
        mod $name {
            use super::*;

            async fn run($app: TestApp) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                run(TestApp::spawn_with(Backend::Sqlite, $adjust).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                run(TestApp::spawn_with(Backend::Postgres, $adjust).await).await;
            }
        }
    };
}

with_config!(|c| c.identity.max_tokens_per_account = 3, an_account_at_its_token_cap_creates_no_more_until_it_revokes_one(app) {
    let (alice, session) = app.person("alice").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let created = create(&app, &session, &alice.account_id, &format!("t{i}")).await.expect("under the cap");
        ids.push(created.token.expect("token").token_id);
    }
    let refused = assert_status(
        create(&app, &session, &alice.account_id, "one-more").await,
        Code::ResourceExhausted,
        "ERROR_REASON_TOKEN_LIMIT_REACHED",
    );
    assert!(refused.message().contains("3 live tokens"), "{refused:?}");
    assert!(refused.message().contains("revoke"), "says how to recover: {refused:?}");

    // Rotation replaces a token: allowed at the cap, and it frees nothing.
    let rotated = app
        .tokens()
        .rotate_token(bearer(pb::RotateTokenRequest { token_id: ids[0].clone() }, &session))
        .await
        .expect("rotation at the cap")
        .into_inner();
    assert_status(
        create(&app, &session, &alice.account_id, "still-one-more").await,
        Code::ResourceExhausted,
        "ERROR_REASON_TOKEN_LIMIT_REACHED",
    );

    // Another account has its own cap.
    let bob = app.robot("bob").await;
    create(&app, &app.operator_token, &bob.account_id, "bobs").await.expect("another account");

    // Revoking one makes room for one.
    let successor = rotated.token.expect("successor").token_id;
    app.tokens()
        .revoke_token(bearer(pb::RevokeTokenRequest { token_id: successor }, &session))
        .await
        .expect("revoke");
    create(&app, &session, &alice.account_id, "after-revoke").await.expect("room after a revocation");
    assert_status(
        create(&app, &session, &alice.account_id, "over-again").await,
        Code::ResourceExhausted,
        "ERROR_REASON_TOKEN_LIMIT_REACHED",
    );
});

with_config!(|c| c.identity.max_tokens_per_account = 5, concurrent_creations_one_below_the_cap_create_exactly_one(app) {
    let robot = app.robot("ci").await;
    for i in 0..4 {
        create(&app, &app.operator_token, &robot.account_id, &format!("t{i}")).await.expect("under the cap");
    }
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let client = app.tokens();
            let request = bearer(
                pb::CreateTokenRequest {
                    account_id: robot.account_id.clone(),
                    name: format!("racer-{i}"),
                    ..Default::default()
                },
                &app.operator_token,
            );
            tokio::spawn(async move { client.clone().create_token(request).await })
        })
        .collect();
    let mut created = 0;
    for racer in racers {
        match racer.await.expect("join") {
            Ok(_) => created += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(crate::support::reason(&status), "ERROR_REASON_TOKEN_LIMIT_REACHED");
            }
        }
    }
    assert_eq!(created, 1, "exactly one creation fits under the cap");
    let listed = app
        .tokens()
        .list_tokens(bearer(
            pb::ListTokensRequest { account_id: robot.account_id.clone(), ..Default::default() },
            &app.operator_token,
        ))
        .await
        .expect("list")
        .into_inner()
        .tokens
        .len();
    assert_eq!(listed, 5);
});

// Creations per account per minute are limited on each replica: the
// refusal says which limit and when to retry, and other accounts are not
// affected.
with_config!(|c| c.identity.token_creations_per_minute = 3, token_creations_per_account_are_rate_limited(app) {
    let robot = app.robot("ci").await;
    for i in 0..3 {
        create(&app, &app.operator_token, &robot.account_id, &format!("t{i}")).await.expect("within the rate");
    }
    let refused = assert_status(
        create(&app, &app.operator_token, &robot.account_id, "t3").await,
        Code::ResourceExhausted,
        "ERROR_REASON_RATE_LIMITED",
    );
    assert!(refused.message().contains("tokens created for this account"), "{refused:?}");
    assert!(refused.message().contains("retry in"), "{refused:?}");
    let other = app.robot("other").await;
    create(&app, &app.operator_token, &other.account_id, "t0").await.expect("another account");
});
