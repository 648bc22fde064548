//! The token hierarchy through the real server: a token created with a
//! personal access token is its creator's family's child, and any
//! revocation of that family (by id, by leak report, by reuse detection)
//! revokes its descendants, on every replica; tokens created with a session
//! are nobody's children. Also the revocation details that come with it:
//! exact cache eviction, the audit log's usernames, limited-use tokens and
//! the expiry VerifyToken reports during a rotation's grace period.

use std::time::Duration;

use crate::both_backends;
use crate::support::{Backend, TestApp, bearer, pb};

/// Revokes `token_id` with `credential`.
async fn revoke(app: &TestApp, credential: &str, token_id: &str) -> pb::Token {
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token_id.to_owned(),
            },
            credential,
        ))
        .await
        .expect("revoke")
        .into_inner()
        .token
        .expect("token")
}

/// Rotates `token_id` with `credential`.
async fn rotate(app: &TestApp, credential: &str, token_id: &str) -> pb::RotateTokenResponse {
    app.tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token_id.to_owned(),
            },
            credential,
        ))
        .await
        .expect("rotate")
        .into_inner()
}

/// Reports `secrets` leaked.
async fn report_leaked(app: &TestApp, secrets: &[&str]) {
    app.tokens()
        .revoke_leaked_token(pb::RevokeLeakedTokenRequest {
            secrets: secrets.iter().map(|s| (*s).to_owned()).collect(),
        })
        .await
        .expect("leak report");
}

/// Asserts that `app` answers `secret` with `reason`.
#[track_caller]
fn assert_reason(verdict: &pb::VerifyTokenResponse, reason: pb::InactiveReason, what: &str) {
    assert!(!verdict.active, "{what} is still active");
    assert_eq!(verdict.reason, reason as i32, "{what}: {verdict:?}");
}

/// Waits until `app`'s cache is in use (on PostgreSQL, once its change
/// channel is up), so that a verdict is really served from it.
async fn until_cache_in_use(app: &TestApp) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !app.identity.cache().is_enabled() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cache never came up"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Alice's session, a token `parent` made with it, a `child` made with the
/// parent and a `grandchild` made with the child, each verified once so
/// that every replica's cache holds its active verdict: the session, and
/// each token's metadata and secret.
async fn family_tree(app: &TestApp) -> (String, [(pb::Token, String); 3]) {
    until_cache_in_use(app).await;
    let (alice, session) = app.person("alice").await;
    let parent = app.token(&session, &alice.account_id, "parent", &[]).await;
    let child = app.token(&parent.1, &alice.account_id, "child", &[]).await;
    let grandchild = app
        .token(&child.1, &alice.account_id, "grandchild", &[])
        .await;
    for (_, secret) in [&parent, &child, &grandchild] {
        assert!(app.verify(secret, &[]).await.active);
    }
    (session, [parent, child, grandchild])
}

async fn revoking_a_token_revokes_its_children_and_grandchildren(app: TestApp) {
    let (session, [parent, child, grandchild]) = family_tree(&app).await;
    let (unrelated, unrelated_secret) = app
        .token(&session, &parent.0.account_id, "unrelated", &[])
        .await;
    revoke(&app, &session, &parent.0.token_id).await;
    // At once, on the replica that revoked (whose cache held them).
    for (what, secret) in [
        ("parent", &parent.1),
        ("child", &child.1),
        ("grandchild", &grandchild.1),
    ] {
        assert_reason(
            &app.verify(secret, &[]).await,
            pb::InactiveReason::Revoked,
            what,
        );
    }
    assert!(
        app.verify(&unrelated_secret, &[]).await.active,
        "{unrelated:?}"
    );
}
both_backends!(revoking_a_token_revokes_its_children_and_grandchildren);

async fn a_rotated_creator_keeps_its_children_under_its_successor(app: TestApp) {
    let (_, [parent, child, _]) = family_tree(&app).await;
    let rotated = rotate(&app, &parent.1, &parent.0.token_id).await;
    assert!(
        app.verify(&child.1, &[]).await.active,
        "rotation kept the child"
    );
    let successor = rotated.token.expect("successor");
    revoke(&app, &rotated.secret, &successor.token_id).await;
    assert_reason(
        &app.verify(&child.1, &[]).await,
        pb::InactiveReason::Revoked,
        "child",
    );
}
both_backends!(a_rotated_creator_keeps_its_children_under_its_successor);

async fn signing_out_leaves_the_tokens_of_the_session_working(app: TestApp) {
    let (session, [parent, child, grandchild]) = family_tree(&app).await;
    app.accounts()
        .sign_out(bearer(pb::SignOutRequest {}, &session))
        .await
        .expect("sign out");
    for (what, secret) in [
        ("parent", &parent.1),
        ("child", &child.1),
        ("grandchild", &grandchild.1),
    ] {
        assert!(
            app.verify(secret, &[]).await.active,
            "{what} ended with the session"
        );
    }
}
both_backends!(signing_out_leaves_the_tokens_of_the_session_working);

async fn a_leak_report_of_a_parent_revokes_its_children(app: TestApp) {
    let (_, [parent, child, grandchild]) = family_tree(&app).await;
    report_leaked(&app, &[&parent.1]).await;
    for (what, secret) in [
        ("parent", &parent.1),
        ("child", &child.1),
        ("grandchild", &grandchild.1),
    ] {
        assert_reason(
            &app.verify(secret, &[]).await,
            pb::InactiveReason::Revoked,
            what,
        );
    }
}
both_backends!(a_leak_report_of_a_parent_revokes_its_children);

async fn reuse_detection_revokes_the_descendants_of_the_family(app: TestApp) {
    let (_, [parent, child, grandchild]) = family_tree(&app).await;
    let rotated = rotate(&app, &parent.1, &parent.0.token_id).await;
    // The old secret, presented again: theft.
    let reused = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: parent.0.token_id.clone(),
            },
            &parent.1,
        ))
        .await;
    assert!(reused.is_err(), "{reused:?}");
    for (what, secret) in [
        ("successor", &rotated.secret),
        ("child", &child.1),
        ("grandchild", &grandchild.1),
    ] {
        assert_reason(
            &app.verify(secret, &[]).await,
            pb::InactiveReason::Revoked,
            what,
        );
    }
}
both_backends!(reuse_detection_revokes_the_descendants_of_the_family);

async fn a_leak_report_keeps_unrelated_cached_verdicts(app: TestApp) {
    until_cache_in_use(&app).await;
    let (alice, alice_session) = app.person("alice").await;
    let (bob, bob_session) = app.person("bob").await;
    let (_, throwaway) = app
        .token(&alice_session, &alice.account_id, "throwaway", &[])
        .await;
    let (_, bobs) = app.token(&bob_session, &bob.account_id, "bobs", &[]).await;
    // Warm the cache: Bob's verdict, and the operator's own (each
    // verification authenticates the operator).
    assert!(app.verify(&bobs, &[]).await.active);
    assert!(app.verify(&bobs, &[]).await.active);
    let (_, misses) = app.identity.cache().stats();

    report_leaked(&app, &[&throwaway]).await;
    assert!(app.verify(&bobs, &[]).await.active);
    let (_, misses_after) = app.identity.cache().stats();
    assert_eq!(
        misses_after, misses,
        "a leak report of Alice's token emptied the cache of other verdicts"
    );
    assert_reason(
        &app.verify(&throwaway, &[]).await,
        pb::InactiveReason::Revoked,
        "the throwaway",
    );
}
both_backends!(a_leak_report_keeps_unrelated_cached_verdicts);

async fn a_revoked_limited_use_token_is_refused(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    let token = created.token.expect("token");
    assert!(app.verify(&created.secret, &[]).await.active);
    revoke(&app, &session, &token.token_id).await;
    assert_reason(
        &app.verify(&created.secret, &[]).await,
        pb::InactiveReason::Revoked,
        "the token",
    );
}
both_backends!(a_revoked_limited_use_token_is_refused);

async fn revocation_and_rotation_events_name_their_subject(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (first, _) = app.token(&session, &alice.account_id, "first", &[]).await;
    let (second, _) = app.token(&session, &alice.account_id, "second", &[]).await;
    revoke(&app, &session, &first.token_id).await;
    rotate(&app, &session, &second.token_id).await;
    // And by an operator, for another account.
    let (third, _) = app.token(&session, &alice.account_id, "third", &[]).await;
    revoke(&app, &app.operator_token, &third.token_id).await;
    let events = app
        .audit(
            &alice.account_id,
            &[
                pb::AuditEventType::TokenRevoked,
                pb::AuditEventType::TokenRotated,
            ],
        )
        .await;
    assert_eq!(events.len(), 3, "{events:?}");
    for event in &events {
        assert_eq!(event.subject_username, "alice", "{event:?}");
    }
}
both_backends!(revocation_and_rotation_events_name_their_subject);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_token_reports_a_scheduled_revocation_as_the_expiry() {
    for backend in [Backend::Sqlite, Backend::Postgres] {
        let app = TestApp::spawn_with(backend, |config| {
            config.identity.rotation_grace = Duration::from_secs(600);
        })
        .await;
        let (alice, session) = app.person("alice").await;
        let (token, secret) = app.token(&session, &alice.account_id, "ci", &[]).await;
        let rotated = rotate(&app, &session, &token.token_id).await;
        let scheduled = rotated
            .previous
            .expect("previous")
            .revoke_time
            .expect("a scheduled revocation");
        let verdict = app.verify(&secret, &[]).await;
        assert!(verdict.active, "within the grace period");
        let reported = verdict.principal.expect("principal").expire_time;
        assert_eq!(reported, Some(scheduled), "{backend:?}");
    }
}

/// A parent revoked on one replica revokes its child on every other one,
/// whose cache held the child's active verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cascaded_revocation_reaches_every_other_replica() {
    let a = TestApp::spawn(Backend::Postgres).await;
    let b = a.replica().await;
    until_cache_in_use(&b).await;
    let (session, [parent, child, grandchild]) = family_tree(&a).await;
    for (_, secret) in [&child, &grandchild] {
        assert!(b.verify(secret, &[]).await.active);
        assert!(b.verify(secret, &[]).await.active);
    }
    let (hits, _) = b.identity.cache().stats();
    assert!(hits > 0, "B serves from its cache");
    revoke(&a, &session, &parent.0.token_id).await;
    for (what, secret) in [("child", &child.1), ("grandchild", &grandchild.1)] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let verdict = b.verify(secret, &[]).await;
            if !verdict.active {
                assert_reason(&verdict, pb::InactiveReason::Revoked, what);
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replica B kept answering active for the {what}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// A child whose creation is in flight while its parent is revoked is
/// revoked too. The test plays the creation itself, as the store does it
/// (a share lock on the parent family's live token, then the insert), and
/// commits it only once the revocation waits for that lock: the first pass
/// of the cascade cannot see the child, the confirming pass must.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_created_during_its_parents_revocation_is_revoked_too() {
    use identity::domain::credential::{CredentialKind, Secret};

    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let (parent, _) = app.token(&session, &alice.account_id, "parent", &[]).await;
    let pool = sqlx::PgPool::connect(&app.db.url)
        .await
        .expect("open PostgreSQL");

    let mut creation = pool.begin().await.expect("begin");
    sqlx::query(
        "SELECT revoke_time FROM tokens WHERE family_id = $1 AND replaced_by IS NULL FOR SHARE",
    )
    .bind(&parent.family_id)
    .fetch_all(&mut *creation)
    .await
    .expect("lock the parent");
    let child_id = uuid::Uuid::now_v7().to_string();
    let secret = Secret::generate(CredentialKind::PersonalAccessToken);
    sqlx::query(
        "INSERT INTO tokens (token_id, account_id, name, live_name, digest, scopes, create_time, \
         family_id, parent_family_id) VALUES ($1, $2, 'child', 'child', $3, '', 0, $1, $4)",
    )
    .bind(&child_id)
    .bind(&alice.account_id)
    .bind(&secret.digest().as_bytes()[..])
    .bind(&parent.family_id)
    .execute(&mut *creation)
    .await
    .expect("insert the child");

    let revoking = {
        let client = app.tokens();
        let request = bearer(
            pb::RevokeTokenRequest {
                token_id: parent.token_id.clone(),
            },
            &session,
        );
        tokio::spawn(async move { client.clone().revoke_token(request).await })
    };
    // Wait until the revocation waits for the creation's lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%UPDATE tokens%'",
        )
        .fetch_one(&pool)
        .await
        .expect("read pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revocation never waited for the creation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    creation.commit().await.expect("commit the creation");
    revoking.await.expect("join").expect("revoke");

    let child = app
        .tokens()
        .get_token(bearer(pb::GetTokenRequest { token_id: child_id }, &session))
        .await
        .expect("get the child")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(child.state, pb::TokenState::Revoked as i32, "{child:?}");
    assert_reason(
        &app.verify(secret.expose(), &[]).await,
        pb::InactiveReason::Revoked,
        "the child",
    );
}

/// A limited-use token revoked between its lookup and the spending of a
/// use is refused as revoked. The test holds the revocation open (a row
/// lock) until the verification's spending waits for it, then commits it:
/// the spending must re-check revocation, not only the uses left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_use_token_revoked_while_being_verified_is_refused() {
    let app = TestApp::spawn(Backend::Postgres).await;
    let (alice, session) = app.person("alice").await;
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    let token = created.token.expect("token");
    let pool = sqlx::PgPool::connect(&app.db.url)
        .await
        .expect("open PostgreSQL");
    let verifier = app.verifier_token().await;

    let mut revocation = pool.begin().await.expect("begin");
    sqlx::query(
        "UPDATE tokens SET revoke_time = (extract(epoch FROM now()) * 1000000)::bigint \
         WHERE token_id = $1",
    )
    .bind(&token.token_id)
    .execute(&mut *revocation)
    .await
    .expect("revoke, uncommitted");

    let verifying = {
        let client = app.tokens();
        let request = bearer(
            pb::VerifyTokenRequest {
                token: created.secret.clone(),
                ..Default::default()
            },
            &verifier,
        );
        tokio::spawn(async move { client.clone().verify_token(request).await })
    };
    // Wait until the spending of a use waits for the revocation's lock.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
             AND wait_event_type = 'Lock' AND query LIKE '%uses_remaining - 1%'",
        )
        .fetch_one(&pool)
        .await
        .expect("read pg_stat_activity");
        if waiting > 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the verification never waited for the revocation"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    revocation.commit().await.expect("commit the revocation");
    let verdict = verifying.await.expect("join").expect("verify").into_inner();
    assert_reason(
        &verdict,
        pb::InactiveReason::Revoked,
        "the limited-use token",
    );
    let stored = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: token.token_id,
            },
            &session,
        ))
        .await
        .expect("get")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(
        stored.uses_remaining,
        Some(3),
        "no use was spent on a revoked token"
    );
}

/// Deleting an account deletes its tokens, and revokes what they created
/// in other accounts (an operator's tokens may create tokens for anyone).
async fn deleting_an_account_revokes_what_its_tokens_created_elsewhere(app: TestApp) {
    let op3 = app
        .accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "op3".into(),
                kind: pb::AccountKind::Robot as i32,
                role: pb::AccountRole::Operator as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create an operator")
        .into_inner()
        .account
        .expect("account");
    let (_, op3_token) = app
        .token(
            &app.operator_token,
            &op3.account_id,
            "op3",
            &["tokens:write"],
        )
        .await;
    let robot = app.robot("ci").await;
    let (_, child) = app
        .token(&op3_token, &robot.account_id, "from-op3", &["tokens:write"])
        .await;
    assert!(app.verify(&child, &[]).await.active, "cached as active");
    app.accounts()
        .delete_account(bearer(
            pb::DeleteAccountRequest {
                account_id: op3.account_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("delete the operator");
    assert_eq!(
        app.verify(&child, &[]).await.reason,
        pb::InactiveReason::Revoked as i32,
        "a token made by a deleted account's token"
    );
}
both_backends!(deleting_an_account_revokes_what_its_tokens_created_elsewhere);
