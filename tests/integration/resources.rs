//! Tokens limited to resources (issue 15 part 1), through the real server on
//! both stores: `VerifyToken`'s `required_resources` on a cache miss and on
//! a hit (also after a rotation), the grammar's refusals, and the grant
//! rule's resources dimension through CreateToken, RotateToken and
//! RenewToken.

use tonic::Code;
use tonic_types::StatusExt as _;

use crate::both_backends;
use crate::support::{Backend, TestApp, assert_status, bearer, pb};

/// Asserts that `token` is active for `resources`, twice (a cache miss,
/// then a hit), and that the principal carries `own`.
async fn assert_allowed(app: &TestApp, token: &str, resources: &[&str], own: &[&str]) {
    for attempt in ["miss", "hit"] {
        let verdict = app.verify_for(token, &[], resources).await;
        assert!(verdict.active, "{resources:?} ({attempt}): {verdict:?}");
        assert!(verdict.missing_resources.is_empty());
        let principal = verdict.principal.expect("principal");
        assert_eq!(principal.resources, own, "{attempt}");
    }
}

/// Asserts that `token` is refused for `resources`, twice (a miss, then a
/// hit), naming `missing`.
async fn assert_refused(app: &TestApp, token: &str, resources: &[&str], missing: &[&str]) {
    for attempt in ["miss", "hit"] {
        let verdict = app.verify_for(token, &[], resources).await;
        assert!(!verdict.active, "{resources:?} ({attempt}): {verdict:?}");
        assert_eq!(
            verdict.reason,
            pb::InactiveReason::ResourceNotAllowed as i32,
            "{attempt}"
        );
        assert!(verdict.principal.is_none());
        assert!(verdict.missing_scopes.is_empty());
        assert_eq!(verdict.missing_resources, missing, "{attempt}");
    }
}

/// Creates a token of `account_id` with `scopes` and `resources`, as
/// `creator`.
async fn create(
    app: &TestApp,
    creator: &str,
    account_id: &str,
    name: &str,
    scopes: &[&str],
    resources: &[&str],
) -> Result<(pb::Token, String), tonic::Status> {
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.into(),
                name: name.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                resources: resources.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
            creator,
        ))
        .await
        .map(|r| {
            let r = r.into_inner();
            (r.token.expect("token"), r.secret)
        })
}

/// The fields a status's BadRequest detail names.
fn violated_fields(status: &tonic::Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

async fn a_token_is_active_only_for_the_resources_it_allows(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (one, one_secret) = create(
        &app,
        &session,
        &alice.account_id,
        "one",
        &[],
        &["projects/a"],
    )
    .await
    .expect("create");
    let (below, below_secret) = create(
        &app,
        &session,
        &alice.account_id,
        "below",
        &["project:read"],
        &["projects/a/*"],
    )
    .await
    .expect("create");
    assert_eq!(one.resources, ["projects/a"]);
    assert_eq!(below.resources, ["projects/a/*"]);

    // A name allows itself only.
    assert_allowed(&app, &one_secret, &["projects/a"], &["projects/a"]).await;
    assert_allowed(&app, &one_secret, &[], &["projects/a"]).await;
    assert_refused(
        &app,
        &one_secret,
        &["projects/a/datasets/1"],
        &["projects/a/datasets/1"],
    )
    .await;
    assert_refused(
        &app,
        &one_secret,
        &["projects/b", "projects/a"],
        &["projects/b"],
    )
    .await;

    // A pattern allows what is strictly below it, nothing beside.
    assert_allowed(
        &app,
        &below_secret,
        &["projects/a/datasets/1"],
        &["projects/a/*"],
    )
    .await;
    assert_allowed(
        &app,
        &below_secret,
        &["projects/a/x", "projects/a/y/z"],
        &["projects/a/*"],
    )
    .await;
    assert_refused(&app, &below_secret, &["projects/a"], &["projects/a"]).await;
    assert_refused(
        &app,
        &below_secret,
        &["projects/ab/x", "projects/a/x", "orgs/b", "orgs/b"],
        &["orgs/b", "projects/ab/x"],
    )
    .await;

    // The scopes are checked first.
    let verdict = app
        .verify_for(&below_secret, &["project:write"], &["projects/b"])
        .await;
    assert_eq!(verdict.reason, pb::InactiveReason::InsufficientScope as i32);
    assert_eq!(verdict.missing_scopes, ["project:write"]);
    assert!(verdict.missing_resources.is_empty());

    // No resources, and a session, allow every resource.
    let (_, unlimited) = app
        .token(&session, &alice.account_id, "unlimited", &[])
        .await;
    assert_allowed(&app, &unlimited, &["projects/a", "orgs/b/x"], &[]).await;
    assert_allowed(&app, &session, &["projects/z"], &[]).await;

    // Shown by GetToken and ListTokens.
    let got = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: below.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("get")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(got.resources, ["projects/a/*"]);
    let listed = app
        .tokens()
        .list_tokens(bearer(
            pb::ListTokensRequest {
                account_id: alice.account_id.clone(),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("list")
        .into_inner()
        .tokens;
    let resources_of = |id: &str| {
        listed
            .iter()
            .find(|t| t.token_id == id)
            .map(|t| t.resources.clone())
            .expect("listed")
    };
    assert_eq!(resources_of(&one.token_id), ["projects/a"]);
    assert_eq!(resources_of(&below.token_id), ["projects/a/*"]);

    // A rotation keeps the resources, and the successor is checked on
    // every verification too.
    let rotated = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: one.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("rotate")
        .into_inner();
    assert_eq!(
        rotated.token.as_ref().expect("token").resources,
        ["projects/a"]
    );
    assert_allowed(&app, &rotated.secret, &["projects/a"], &["projects/a"]).await;
    assert_refused(&app, &rotated.secret, &["projects/a/x"], &["projects/a/x"]).await;
}
both_backends!(a_token_is_active_only_for_the_resources_it_allows);

async fn resources_outside_the_grammar_are_invalid_arguments(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, secret) = app.token(&session, &alice.account_id, "any", &[]).await;
    // A caller names the one resource it serves: no pattern.
    for (required, field) in [
        (vec!["projects/a/*"], "required_resources[0]"),
        (vec!["projects/a", "*"], "required_resources[1]"),
        (vec!["projects//a"], "required_resources[0]"),
        (vec!["projects/a b"], "required_resources[0]"),
        (vec!["projects/../x"], "required_resources[0]"),
    ] {
        let status = assert_status(
            app.tokens()
                .verify_token(bearer(
                    pb::VerifyTokenRequest {
                        token: secret.clone(),
                        required_resources: required.iter().map(|s| (*s).to_owned()).collect(),
                        ..Default::default()
                    },
                    &app.verifier_token().await,
                ))
                .await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field], "{required:?}");
    }
    for (resources, field) in [
        (vec!["*"], "resources[0]"),
        (vec!["projects/a", "projects/*/x"], "resources[1]"),
        (vec![""], "resources[0]"),
        (vec!["projects/é"], "resources[0]"),
    ] {
        let status = assert_status(
            create(&app, &session, &alice.account_id, "bad", &[], &resources).await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        assert_eq!(violated_fields(&status), [field], "{resources:?}");
    }
}
both_backends!(resources_outside_the_grammar_are_invalid_arguments);

async fn a_resource_limited_token_grants_no_wider_resources(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (caller, caller_secret) = create(
        &app,
        &session,
        &alice.account_id,
        "caller",
        &["tokens:write", "tokens:read"],
        &["projects/a/*", "orgs/b"],
    )
    .await
    .expect("create");

    // CreateToken: within the caller's resources, or refused.
    for (n, resources) in [
        &["projects/a/x"][..],
        &["projects/a/*"],
        &["projects/a/x/*", "orgs/b"],
        &["orgs/b"],
    ]
    .into_iter()
    .enumerate()
    {
        let (token, _) = create(
            &app,
            &caller_secret,
            &alice.account_id,
            &format!("ok-{n}"),
            &["tokens:read"],
            resources,
        )
        .await
        .unwrap_or_else(|e| panic!("{resources:?}: {e:?}"));
        let mut sorted = resources.to_vec();
        sorted.sort_unstable();
        assert_eq!(token.resources, sorted);
    }
    for (n, resources) in [
        &[][..],
        &["projects/a"],
        &["orgs/b/x"],
        &["orgs/*"],
        &["projects/a/x", "projects/b"],
    ]
    .into_iter()
    .enumerate()
    {
        assert_status(
            create(
                &app,
                &caller_secret,
                &alice.account_id,
                &format!("wide-{n}"),
                &["tokens:read"],
                resources,
            )
            .await,
            Code::PermissionDenied,
            "ERROR_REASON_ESCALATION",
        );
    }

    // RenewToken: a token within the caller's resources, yes; a wider
    // one, no.
    // (Their scopes within the caller's: only the resources differ.)
    let victim = |name: &'static str, resources: &'static [&'static str]| {
        create(
            &app,
            &session,
            &alice.account_id,
            name,
            &["tokens:read"],
            resources,
        )
    };
    let (narrow, _) = victim("narrow", &["projects/a/1"]).await.expect("create");
    let (wide, _) = victim("wide", &["projects/b"]).await.expect("create");
    let (full, _) = victim("every-resource", &[]).await.expect("create");
    let renew = |token_id: &str| {
        let mut tokens = app.tokens();
        let request = bearer(
            pb::RenewTokenRequest {
                token_id: token_id.into(),
                ..Default::default()
            },
            &caller_secret,
        );
        async move { tokens.renew_token(request).await }
    };
    let renewed = renew(&narrow.token_id)
        .await
        .expect("renew a narrower token")
        .into_inner();
    assert_eq!(renewed.token.expect("token").resources, ["projects/a/1"]);
    for victim in [&wide, &full] {
        assert_status(
            renew(&victim.token_id).await,
            Code::PermissionDenied,
            "ERROR_REASON_ESCALATION",
        );
    }

    // RotateToken: rotating itself keeps its resources.
    let rotated = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: caller.token_id.clone(),
            },
            &caller_secret,
        ))
        .await
        .expect("rotate itself")
        .into_inner();
    assert_eq!(
        rotated.token.expect("token").resources,
        ["orgs/b", "projects/a/*"]
    );
    // The successor is as limited as its predecessor was.
    assert_status(
        create(
            &app,
            &rotated.secret,
            &alice.account_id,
            "after",
            &["tokens:read"],
            &[],
        )
        .await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    create(
        &app,
        &rotated.secret,
        &alice.account_id,
        "after",
        &["tokens:read"],
        &["orgs/b"],
    )
    .await
    .expect("within the successor's resources");
}
both_backends!(a_resource_limited_token_grants_no_wider_resources);

/// A token of the operator `ops` with full scopes and no expiry or use
/// limit, limited only in its resources, cannot give the operator role
/// (an operator reaches every resource of every account); it can still
/// make a user account.
async fn a_resource_limited_operator_token_cannot_make_an_operator(backend: Backend) {
    let app = TestApp::spawn_with(backend, |config| {
        config.identity.allow_non_expiring_robot_tokens = true;
    })
    .await;

    let ops = app
        .accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &app.operator_token,
        ))
        .await
        .expect("look up the operator")
        .into_inner()
        .account
        .expect("account");
    // Full scopes, no expiry or use limit: only the resources are less
    // than an operator's, who reaches every resource of every account.
    let limited = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: ops.account_id.clone(),
                name: "ops-projects-a".into(),
                resources: vec!["projects/a".into()],
                never_expires: true,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create")
        .into_inner()
        .secret;
    let create = |role: pb::AccountRole, username: &str| {
        let mut accounts = app.accounts();
        let request = bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                kind: pb::AccountKind::Robot as i32,
                role: role as i32,
                ..Default::default()
            },
            &limited,
        );
        async move { accounts.create_account(request).await }
    };
    assert_status(
        create(pb::AccountRole::Operator, "root").await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    create(pb::AccountRole::User, "user")
        .await
        .expect("a user account is within its reach");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_limited_operator_token_cannot_make_an_operator_sqlite() {
    a_resource_limited_operator_token_cannot_make_an_operator(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_limited_operator_token_cannot_make_an_operator_postgres() {
    a_resource_limited_operator_token_cannot_make_an_operator(Backend::Postgres).await;
}
