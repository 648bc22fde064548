//! TokensService (except VerifyToken) through the real server.

use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::both_backends;
use crate::support::{TestApp, assert_status, bearer, pb};

fn in_the_future(after: Duration) -> prost_types::Timestamp {
    let t = SystemTime::now() + after;
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch");
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).expect("fits"),
        nanos: 0,
    }
}

async fn a_token_shows_its_secret_once_and_its_metadata_always(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci-deploy".into(),
                scopes: vec!["tokens:read".into(), "project:publish".into()],
                expire_time: Some(in_the_future(Duration::from_secs(3600))),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    assert!(created.secret.starts_with("idpat_"));
    assert_eq!(created.secret.len(), 44);
    let token = created.token.expect("token");
    assert_eq!(token.account_id, alice.account_id);
    assert_eq!(token.name, "ci-deploy");
    assert_eq!(token.scopes, ["project:publish", "tokens:read"]);
    assert_eq!(token.state, pb::TokenState::Active as i32);
    assert!(token.expire_time.is_some() && token.revoke_time.is_none());

    let fetched = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: token.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("get")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(fetched, token);
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
        .into_inner();
    assert_eq!(listed.tokens, [token]);
    // The secret appears in no later response.
    assert!(!format!("{fetched:?}{listed:?}").contains(&created.secret[6..]));
}
both_backends!(a_token_shows_its_secret_once_and_its_metadata_always);

async fn token_names_are_unique_among_live_tokens_only(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (first, _) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    let duplicate = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "laptop".into(),
                ..Default::default()
            },
            &session,
        ))
        .await;
    assert_status(
        duplicate,
        Code::AlreadyExists,
        "ERROR_REASON_TOKEN_NAME_TAKEN",
    );

    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: first.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("revoke");
    let (second, _) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    assert_ne!(second.token_id, first.token_id);

    // Another account may use the same name.
    let (bob, bob_session) = app.person("bob").await;
    app.token(&bob_session, &bob.account_id, "laptop", &[])
        .await;
}
both_backends!(token_names_are_unique_among_live_tokens_only);

async fn an_expired_token_gives_up_its_name(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let soon = in_the_future(Duration::from_secs(2));
    app.tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "short-lived".into(),
                expire_time: Some(soon),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create");
    // Move the server's clock past the expiry.
    app.clock().advance(Duration::from_millis(2100));
    let (renewed, _) = app
        .token(&session, &alice.account_id, "short-lived", &[])
        .await;
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
    let states: Vec<_> = listed.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            pb::TokenState::Expired as i32,
            pb::TokenState::Active as i32
        ]
    );
    assert_eq!(listed[1].token_id, renewed.token_id);
}
both_backends!(an_expired_token_gives_up_its_name);

async fn revoking_is_immediate_and_idempotent(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (token, secret) = app.token(&session, &alice.account_id, "script", &[]).await;
    assert!(app.verify(&secret, &[]).await.active);

    let revoked = app
        .tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("revoke")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(revoked.state, pb::TokenState::Revoked as i32);
    let verdict = app.verify(&secret, &[]).await;
    assert!(!verdict.active);
    assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    assert_status(
        app.tokens()
            .get_token(bearer(
                pb::GetTokenRequest {
                    token_id: token.token_id.clone(),
                },
                &secret,
            ))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );

    let again = app
        .tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token.token_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("revoking twice succeeds")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(
        again.revoke_time, revoked.revoke_time,
        "the first revocation time is kept"
    );

    assert_status(
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: uuid::Uuid::now_v7().to_string(),
                },
                &session,
            ))
            .await,
        Code::NotFound,
        "ERROR_REASON_TOKEN_NOT_FOUND",
    );
}
both_backends!(revoking_is_immediate_and_idempotent);

async fn list_tokens_pages_through_every_token_once(app: TestApp) {
    let robot = app.robot("builder").await;
    for i in 0..5 {
        app.token(
            &app.operator_token,
            &robot.account_id,
            &format!("t{i}"),
            &[],
        )
        .await;
    }
    let mut names = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = app
            .tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: robot.account_id.clone(),
                    page_size: 2,
                    page_token: page_token.clone(),
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await
            .expect("list")
            .into_inner();
        names.extend(page.tokens.into_iter().map(|t| t.name));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(names, ["t0", "t1", "t2", "t3", "t4"]);

    // A page token of one account's listing is refused for another's.
    let first = app
        .tokens()
        .list_tokens(bearer(
            pb::ListTokensRequest {
                account_id: robot.account_id.clone(),
                page_size: 1,
                page_token: String::new(),
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("list")
        .into_inner();
    let other = app.robot("other").await;
    assert_status(
        app.tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: other.account_id,
                    page_size: 1,
                    page_token: first.next_page_token,
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert_status(
        app.tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: uuid::Uuid::now_v7().to_string(),
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await,
        Code::NotFound,
        "ERROR_REASON_ACCOUNT_NOT_FOUND",
    );
}
both_backends!(list_tokens_pages_through_every_token_once);

async fn a_scoped_token_cannot_grant_more_than_it_has(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, writer) = app
        .token(
            &session,
            &alice.account_id,
            "writer",
            &["tokens:write", "project:read"],
        )
        .await;
    let create = |scopes: Vec<&str>, expire: Option<prost_types::Timestamp>| {
        let mut client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: format!("child-{}", uuid::Uuid::now_v7()),
                scopes: scopes.into_iter().map(str::to_owned).collect(),
                expire_time: expire,
                ..Default::default()
            },
            &writer,
        );
        async move { client.create_token(request).await }
    };
    create(vec!["project:read"], None)
        .await
        .expect("a subset is allowed");
    assert_status(
        create(vec![], None).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    assert_status(
        create(vec!["project:write"], None).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );

    let (_, expiring) = {
        let created = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: "expiring".into(),
                    scopes: vec![],
                    expire_time: Some(in_the_future(Duration::from_secs(600))),
                    ..Default::default()
                },
                &session,
            ))
            .await
            .expect("create")
            .into_inner();
        (created.token, created.secret)
    };
    let child = |expire: Option<prost_types::Timestamp>| {
        let mut client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: format!("child-{}", uuid::Uuid::now_v7()),
                scopes: vec![],
                expire_time: expire,
                ..Default::default()
            },
            &expiring,
        );
        async move { client.create_token(request).await }
    };
    child(Some(in_the_future(Duration::from_secs(60))))
        .await
        .expect("an earlier expiry is allowed");
    let defaulted = child(None)
        .await
        .expect("the default lifetime is capped")
        .into_inner()
        .token
        .expect("token");
    let parent_expiry = app
        .verify(&expiring, &[])
        .await
        .principal
        .expect("principal")
        .expire_time
        .expect("expiry");
    assert_eq!(
        defaulted.expire_time,
        Some(parent_expiry),
        "capped at the parent's expiry"
    );
    assert_status(
        child(Some(in_the_future(Duration::from_secs(6000)))).await,
        Code::PermissionDenied,
        "ERROR_REASON_ESCALATION",
    );
    let never = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "never".into(),
                never_expires: true,
                ..Default::default()
            },
            &expiring,
        ))
        .await;
    assert_status(never, Code::InvalidArgument, "ERROR_REASON_TOKEN_LIFETIME");
}
both_backends!(a_scoped_token_cannot_grant_more_than_it_has);

async fn bad_token_requests_are_invalid_arguments(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let cases = [
        pb::CreateTokenRequest {
            account_id: "nope".into(),
            name: "x".into(),
            ..Default::default()
        },
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: String::new(),
            ..Default::default()
        },
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "x".into(),
            scopes: vec!["Bad Scope".into()],
            ..Default::default()
        },
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "x".into(),
            expire_time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            ..Default::default()
        },
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "x".into(),
            expire_time: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            ..Default::default()
        },
        pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: "x".into(),
            expire_time: Some(prost_types::Timestamp {
                seconds: 4_000_000_000,
                nanos: -5,
            }),
            ..Default::default()
        },
    ];
    for case in cases {
        assert_status(
            app.tokens().create_token(bearer(case, &session)).await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
    }
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
        .into_inner();
    assert!(
        listed.tokens.is_empty(),
        "no refused request stored a token"
    );
}
both_backends!(bad_token_requests_are_invalid_arguments);

async fn a_caller_without_the_scope_cannot_probe_which_token_ids_exist(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (existing, _) = app.token(&session, &alice.account_id, "real", &[]).await;
    let (_, reader) = app
        .token(&session, &alice.account_id, "reader", &["project:read"])
        .await;
    let missing = uuid::Uuid::now_v7().to_string();
    for id in [existing.token_id.clone(), missing] {
        assert_status(
            app.tokens()
                .get_token(bearer(
                    pb::GetTokenRequest {
                        token_id: id.clone(),
                    },
                    &reader,
                ))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_SCOPE_MISSING",
        );
        assert_status(
            app.tokens()
                .revoke_token(bearer(
                    pb::RevokeTokenRequest {
                        token_id: id.clone(),
                    },
                    &reader,
                ))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_SCOPE_MISSING",
        );
        assert_status(
            app.tokens()
                .rotate_token(bearer(
                    pb::RotateTokenRequest {
                        token_id: id.clone(),
                    },
                    &reader,
                ))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_SCOPE_MISSING",
        );
    }
}
both_backends!(a_caller_without_the_scope_cannot_probe_which_token_ids_exist);

async fn scopes_that_look_built_in_are_refused_naming_the_one_they_resemble(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let create = |scopes: &[&str]| {
        let mut client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
            &session,
        );
        async move { client.create_token(request).await }
    };
    let typo = assert_status(
        create(&["project:publish", "token:verify"]).await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert!(typo.message().contains("scopes[1]"), "{typo:?}");
    assert!(
        typo.message().contains("did you mean 'tokens:verify'"),
        "{typo:?}"
    );
    let reserved = assert_status(
        create(&["tokens:delete"]).await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert!(
        reserved
            .message()
            .contains("'tokens:' namespace is reserved"),
        "{reserved:?}"
    );
    create(&["tokens:verify", "project:publish"])
        .await
        .expect("built-in and own scopes");

    // A calling service's typo in required_scopes is refused too, rather
    // than answered "active" for every full-access token.
    let (_, secret) = app.token(&session, &alice.account_id, "full", &[]).await;
    let required = app
        .tokens()
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret,
                required_scopes: vec!["tokens:wirte".into()],
                ..Default::default()
            },
            &app.verifier_token().await,
        ))
        .await;
    let required = assert_status(
        required,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert!(
        required.message().contains("did you mean 'tokens:write'"),
        "{required:?}"
    );
}
both_backends!(scopes_that_look_built_in_are_refused_naming_the_one_they_resemble);

async fn a_lifetime_can_be_given_as_a_ttl_instead_of_an_expire_time(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let create = |name: &str, ttl: Option<prost_types::Duration>, expire_time| {
        let mut client = app.tokens();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: name.into(),
                ttl,
                expire_time,
                ..Default::default()
            },
            &session,
        );
        async move { client.create_token(request).await }
    };
    let seconds = |s| {
        Some(prost_types::Duration {
            seconds: s,
            nanos: 0,
        })
    };
    let before = in_the_future(Duration::ZERO).seconds;
    let token = create("thirty-days", seconds(30 * 86_400), None)
        .await
        .expect("a ttl")
        .into_inner()
        .token
        .expect("token");
    let after = in_the_future(Duration::ZERO).seconds;
    let expires = token.expire_time.expect("an expiry").seconds;
    assert!(
        (before + 30 * 86_400..=after + 30 * 86_400).contains(&expires),
        "{expires}"
    );

    let both = create(
        "both",
        seconds(60),
        Some(in_the_future(Duration::from_secs(60))),
    )
    .await;
    let both = assert_status(both, Code::InvalidArgument, "ERROR_REASON_INVALID_ARGUMENT");
    assert!(both.message().contains("ttl"), "{both:?}");
    for bad in [
        prost_types::Duration {
            seconds: 0,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: -60,
            nanos: 0,
        },
        prost_types::Duration {
            seconds: 1,
            nanos: -1,
        },
    ] {
        let refused = create("bad", Some(bad), None).await;
        let refused = assert_status(
            refused,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        assert!(
            refused.message().contains("positive duration"),
            "{refused:?}"
        );
    }
    // Over the server's maximum lifetime: refused as an expire_time would
    // be, naming the field the caller set.
    let long = create("long", seconds(400 * 86_400), None).await;
    let long = assert_status(long, Code::InvalidArgument, "ERROR_REASON_TOKEN_LIFETIME");
    assert!(long.message().contains("lifetime: ttl:"), "{long:?}");
    let huge = create("huge", seconds(i64::MAX), None).await;
    let huge = assert_status(huge, Code::InvalidArgument, "ERROR_REASON_INVALID_ARGUMENT");
    assert!(huge.message().contains("before the year 10000"), "{huge:?}");
}
both_backends!(a_lifetime_can_be_given_as_a_ttl_instead_of_an_expire_time);

async fn a_caller_learns_who_it_is_without_knowing_its_ids(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let who = |credential: String| {
        let mut client = app.tokens();
        async move {
            client
                .get_caller(bearer(pb::GetCallerRequest {}, &credential))
                .await
                .expect("get caller")
                .into_inner()
                .principal
                .expect("a principal")
        }
    };
    let by_session = who(session.clone()).await;
    assert_eq!(by_session.account_id, alice.account_id);
    assert_eq!(by_session.username, "alice");
    assert_eq!(
        by_session.credential_kind,
        pb::CredentialKind::Session as i32
    );
    assert!(by_session.scopes.is_empty());

    // A two-use token limited to another service's scope: it learns its
    // own id, scope and uses; each call, this one too, spends a use.
    let created = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                scopes: vec!["project:publish".into()],
                max_uses: Some(2),
                ttl: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner();
    let token = created.token.expect("token");
    for left in [1, 0] {
        let by_token = who(created.secret.clone()).await;
        assert_eq!(by_token.account_id, alice.account_id);
        assert_eq!(by_token.token_id, token.token_id);
        assert_eq!(
            by_token.credential_kind,
            pb::CredentialKind::PersonalAccessToken as i32
        );
        assert_eq!(by_token.scopes, ["project:publish"]);
        assert_eq!(by_token.expire_time, token.expire_time);
        assert_eq!(by_token.uses_remaining, Some(left));
    }
    let verdict = app.verify(&created.secret, &[]).await;
    assert_eq!(verdict.reason, pb::InactiveReason::Exhausted as i32);
}
both_backends!(a_caller_learns_who_it_is_without_knowing_its_ids);
