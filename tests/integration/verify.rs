//! VerifyToken: every reason, the principal, and who may ask.

use std::time::{Duration, SystemTime};

use tonic::Code;

use crate::both_backends;
use crate::support::{TestApp, assert_status, bearer, pb};

async fn an_active_token_reports_its_principal(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (token, secret) = app
        .token(&session, &alice.account_id, "ci", &["project:publish"])
        .await;
    let verdict = app.verify(&secret, &["project:publish"]).await;
    assert!(verdict.active);
    assert_eq!(verdict.reason, pb::InactiveReason::Unspecified as i32);
    let principal = verdict.principal.expect("principal");
    assert_eq!(principal.account_id, alice.account_id);
    assert_eq!(principal.username, "alice");
    assert_eq!(principal.account_kind, pb::AccountKind::Person as i32);
    assert_eq!(principal.account_role, pb::AccountRole::User as i32);
    assert_eq!(
        principal.credential_kind,
        pb::CredentialKind::PersonalAccessToken as i32
    );
    assert_eq!(principal.token_id, token.token_id);
    assert_eq!(principal.scopes, ["project:publish"]);
    assert_eq!(
        principal.expire_time, token.expire_time,
        "the default lifetime applies"
    );
    assert!(principal.expire_time.is_some());
    assert_eq!(principal.uses_remaining, None);

    let session_verdict = app.verify(&session, &["anything:at-all"]).await;
    assert!(session_verdict.active, "a session has full access");
    let principal = session_verdict.principal.expect("principal");
    assert_eq!(
        principal.credential_kind,
        pb::CredentialKind::Session as i32
    );
    assert!(principal.scopes.is_empty());
    assert!(principal.expire_time.is_some());
}
both_backends!(an_active_token_reports_its_principal);

async fn every_inactive_reason_is_reported(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let reason = |r: pb::InactiveReason| r as i32;

    for malformed in [
        "",
        "garbage",
        "idpat_",
        &format!("{session}x"),
        &session.replace("idses_", "idpat_"),
    ] {
        let verdict = app.verify(malformed, &[]).await;
        assert!(!verdict.active && verdict.principal.is_none());
        assert_eq!(
            verdict.reason,
            reason(pb::InactiveReason::Malformed),
            "{malformed:?}"
        );
    }

    // Well-formed (valid checksum) but never issued.
    let unknown = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::PersonalAccessToken,
    );
    assert_eq!(
        app.verify(unknown.expose(), &[]).await.reason,
        reason(pb::InactiveReason::Unknown)
    );

    let (_, scoped) = app
        .token(&session, &alice.account_id, "scoped", &["tokens:read"])
        .await;
    let verdict = app
        .verify(&scoped, &["tokens:read", "project:publish"])
        .await;
    assert!(!verdict.active);
    assert_eq!(
        verdict.reason,
        reason(pb::InactiveReason::InsufficientScope)
    );

    let (revoked_token, revoked) = app.token(&session, &alice.account_id, "revoked", &[]).await;
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: revoked_token.token_id,
            },
            &session,
        ))
        .await
        .expect("revoke");
    assert_eq!(
        app.verify(&revoked, &[]).await.reason,
        reason(pb::InactiveReason::Revoked)
    );

    let soon = SystemTime::now() + Duration::from_secs(1);
    let soon = soon
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after the epoch");
    let expiring = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "expiring".into(),
                scopes: vec![],
                expire_time: Some(prost_types::Timestamp {
                    seconds: i64::try_from(soon.as_secs()).expect("fits"),
                    nanos: i32::try_from(soon.subsec_nanos()).expect("fits"),
                }),
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create")
        .into_inner()
        .secret;
    // Move the server's clock past the expiry.
    app.clock().advance(Duration::from_millis(1100));
    assert_eq!(
        app.verify(&expiring, &[]).await.reason,
        reason(pb::InactiveReason::Expired)
    );

    let (_, live) = app.token(&session, &alice.account_id, "live", &[]).await;
    app.accounts()
        .disable_account(bearer(
            pb::DisableAccountRequest {
                account_id: alice.account_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("disable");
    assert_eq!(
        app.verify(&live, &[]).await.reason,
        reason(pb::InactiveReason::AccountDisabled)
    );
    assert_eq!(
        app.verify(&session, &[]).await.reason,
        reason(pb::InactiveReason::AccountDisabled)
    );
}
both_backends!(every_inactive_reason_is_reported);

async fn verifying_needs_the_verify_scope(app: TestApp) {
    let robot = app.robot("gateway").await;
    let (_, verifier) = app
        .token(
            &app.operator_token,
            &robot.account_id,
            "verifier",
            &["tokens:verify"],
        )
        .await;
    let (_, reader) = app
        .token(
            &app.operator_token,
            &robot.account_id,
            "reader",
            &["tokens:read"],
        )
        .await;
    let request = |caller: &str| {
        bearer(
            pb::VerifyTokenRequest {
                token: reader.clone(),
                required_scopes: vec![],
                ..Default::default()
            },
            caller,
        )
    };

    let verdict = app
        .tokens()
        .verify_token(request(&verifier))
        .await
        .expect("allowed")
        .into_inner();
    assert!(verdict.active);
    let status = assert_status(
        app.tokens().verify_token(request(&reader)).await,
        Code::PermissionDenied,
        "ERROR_REASON_SCOPE_MISSING",
    );
    use tonic_types::StatusExt as _;
    assert_eq!(
        status
            .get_error_details()
            .error_info()
            .expect("info")
            .metadata
            .get("required_scope")
            .map(String::as_str),
        Some("tokens:verify")
    );
    assert_status(
        app.tokens()
            .verify_token(pb::VerifyTokenRequest {
                token: reader.clone(),
                required_scopes: vec![],
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_MISSING",
    );
    assert_status(
        app.tokens()
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: reader.clone(),
                    required_scopes: vec!["NOT VALID".into()],
                    ..Default::default()
                },
                &verifier,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(verifying_needs_the_verify_scope);

async fn full_access_does_not_include_the_verify_scope(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, full) = app.token(&session, &alice.account_id, "full", &[]).await;
    let (limited, limited_secret) = {
        let created = app
            .tokens()
            .create_token(bearer(
                pb::CreateTokenRequest {
                    account_id: alice.account_id.clone(),
                    name: "one-time".into(),
                    max_uses: Some(1),
                    ..Default::default()
                },
                &session,
            ))
            .await
            .expect("create")
            .into_inner();
        (created.token.expect("token"), created.secret)
    };
    // Sessions, full-access tokens and the operator's full-access token
    // are refused before anything is looked at: the one-time token keeps
    // its use and no last use is written.
    for caller in [&session, &full, &app.operator_token] {
        let status = assert_status(
            app.tokens()
                .verify_token(bearer(
                    pb::VerifyTokenRequest {
                        token: limited_secret.clone(),
                        client_address: "203.0.113.9:1".into(),
                        ..Default::default()
                    },
                    caller,
                ))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_SCOPE_MISSING",
        );
        use tonic_types::StatusExt as _;
        assert_eq!(
            status
                .get_error_details()
                .error_info()
                .expect("info")
                .metadata
                .get("required_scope")
                .map(String::as_str),
            Some("tokens:verify")
        );
    }
    let token = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: limited.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("get")
        .into_inner()
        .token
        .expect("token");
    assert_eq!(token.uses_remaining, Some(1), "no use was spent");
    assert!(token.last_used_time.is_none() && token.last_used_address.is_empty());
    // A token granted the scope by name verifies it (and spends the use).
    let verdict = app.verify(&limited_secret, &[]).await;
    assert!(verdict.active);
    assert_eq!(
        verdict.principal.expect("principal").uses_remaining,
        Some(0)
    );
}
both_backends!(full_access_does_not_include_the_verify_scope);
