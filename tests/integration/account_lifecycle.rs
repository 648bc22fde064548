//! The life of an account around its tokens: password changes, signing out
//! everywhere, suspension, deletion, the password policy, and the audit log.

use tonic::Code;

use crate::both_backends;
use crate::support::{PASSWORD, TestApp, assert_status, bearer, pb, sign_in};

const NEW_PASSWORD: &str = "granite lantern 9 orchard";

fn audit_client(
    app: &TestApp,
) -> pb::audit_service_client::AuditServiceClient<tonic::transport::Channel> {
    pb::audit_service_client::AuditServiceClient::new(app.channel.clone())
}

async fn changing_the_password_ends_other_sessions_but_keeps_tokens(app: TestApp) {
    let (alice, first) = app.person("alice").await;
    let second = sign_in(&app, "alice", PASSWORD)
        .await
        .expect("second session");
    let (_, pat) = app.token(&first, &alice.account_id, "laptop", &[]).await;
    let change = |caller: &str, current: &str, new: &str| {
        let mut client = app.accounts();
        let request = bearer(
            pb::ChangePasswordRequest {
                current_password: current.into(),
                new_password: new.into(),
            },
            caller,
        );
        async move { client.change_password(request).await }
    };

    assert_status(
        change(&pat, PASSWORD, NEW_PASSWORD).await,
        Code::PermissionDenied,
        "ERROR_REASON_SESSION_REQUIRED",
    );
    assert_status(
        change(&first, "not the password at all", NEW_PASSWORD).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
    for weak in ["short", "passwordpassword", "ALICE"] {
        assert_status(
            change(&first, PASSWORD, weak).await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
    }
    let ended = change(&first, PASSWORD, NEW_PASSWORD)
        .await
        .expect("change")
        .into_inner()
        .ended_sessions;
    assert_eq!(ended, 1);

    assert!(
        app.verify(&first, &[]).await.active,
        "the calling session lives on"
    );
    assert_eq!(
        app.verify(&second, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert!(
        app.verify(&pat, &[]).await.active,
        "personal access tokens keep working"
    );
    assert_status(
        sign_in(&app, "alice", PASSWORD).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
    sign_in(&app, "alice", NEW_PASSWORD)
        .await
        .expect("the new password works");

    let events = app
        .audit(&alice.account_id, &[pb::AuditEventType::PasswordChanged])
        .await;
    let outcomes: Vec<_> = events.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [
            pb::AuditOutcome::Success as i32,
            pb::AuditOutcome::Failure as i32
        ],
        "newest first"
    );
}
both_backends!(changing_the_password_ends_other_sessions_but_keeps_tokens);

async fn signing_out_everywhere_ends_every_session_but_no_token(app: TestApp) {
    let (alice, first) = app.person("alice").await;
    let second = sign_in(&app, "alice", PASSWORD)
        .await
        .expect("second session");
    let (_, pat) = app.token(&first, &alice.account_id, "laptop", &[]).await;
    let everywhere = |caller: &str, account: &str| {
        let mut client = app.accounts();
        let request = bearer(
            pb::SignOutEverywhereRequest {
                account_id: account.into(),
            },
            caller,
        );
        async move { client.sign_out_everywhere(request).await }
    };
    assert_status(
        everywhere(&pat, &alice.account_id).await,
        Code::PermissionDenied,
        "ERROR_REASON_SESSION_REQUIRED",
    );
    let (bob, bob_session) = app.person("bob").await;
    assert_status(
        everywhere(&bob_session, &alice.account_id).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );

    let ended = everywhere(&first, &alice.account_id)
        .await
        .expect("sign out everywhere")
        .into_inner()
        .ended_sessions;
    assert_eq!(ended, 2);
    for session in [&first, &second] {
        assert_eq!(
            app.verify(session, &[]).await.reason,
            pb::InactiveReason::Revoked as i32
        );
    }
    assert!(app.verify(&pat, &[]).await.active);

    // An operator may do it to anyone.
    let ended = everywhere(&app.operator_token, &bob.account_id)
        .await
        .expect("operator")
        .into_inner()
        .ended_sessions;
    assert_eq!(ended, 1);
    assert_eq!(
        app.verify(&bob_session, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
}
both_backends!(signing_out_everywhere_ends_every_session_but_no_token);

async fn a_disabled_account_fails_everywhere_until_enabled(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, pat) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    let set = |caller: &str, account: &str, disable: bool| {
        let mut client = app.accounts();
        let account = account.to_owned();
        let caller = caller.to_owned();
        async move {
            if disable {
                client
                    .disable_account(bearer(
                        pb::DisableAccountRequest {
                            account_id: account,
                        },
                        &caller,
                    ))
                    .await
                    .map(|r| r.into_inner().account.expect("account"))
            } else {
                client
                    .enable_account(bearer(
                        pb::EnableAccountRequest {
                            account_id: account,
                        },
                        &caller,
                    ))
                    .await
                    .map(|r| r.into_inner().account.expect("account"))
            }
        }
    };
    assert_status(
        set(&session, &alice.account_id, true).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );

    let disabled = set(&app.operator_token, &alice.account_id, true)
        .await
        .expect("disable");
    assert!(disabled.disabled && disabled.disable_time.is_some());
    let again = set(&app.operator_token, &alice.account_id, true)
        .await
        .expect("idempotent");
    assert_eq!(again.disable_time, disabled.disable_time);

    for credential in [&pat, &session] {
        assert_eq!(
            app.verify(credential, &[]).await.reason,
            pb::InactiveReason::AccountDisabled as i32
        );
    }
    assert_status(
        sign_in(&app, "alice", PASSWORD).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
    assert_status(
        app.tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: alice.account_id.clone(),
                    ..Default::default()
                },
                &pat,
            ))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );

    let enabled = set(&app.operator_token, &alice.account_id, false)
        .await
        .expect("enable");
    assert!(!enabled.disabled && enabled.disable_time.is_none());
    assert!(app.verify(&pat, &[]).await.active, "nothing was deleted");
    assert!(app.verify(&session, &[]).await.active);

    // An operator cannot lock themselves out.
    let ops = app
        .verify(&app.operator_token, &[])
        .await
        .principal
        .expect("principal")
        .account_id;
    assert_status(
        set(&app.operator_token, &ops, true).await,
        Code::FailedPrecondition,
        "ERROR_REASON_SELF_LOCKOUT",
    );

    let types: Vec<_> = app
        .audit(
            &alice.account_id,
            &[
                pb::AuditEventType::AccountDisabled,
                pb::AuditEventType::AccountEnabled,
            ],
        )
        .await
        .iter()
        .map(|e| e.r#type)
        .collect();
    assert_eq!(
        types,
        [
            pb::AuditEventType::AccountEnabled as i32,
            pb::AuditEventType::AccountDisabled as i32
        ]
    );
}
both_backends!(a_disabled_account_fails_everywhere_until_enabled);

async fn a_deleted_account_stops_at_once_and_its_audit_trail_remains(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, pat) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    let delete = |caller: &str, account: &str| {
        let mut client = app.accounts();
        let request = bearer(
            pb::DeleteAccountRequest {
                account_id: account.into(),
            },
            caller,
        );
        async move { client.delete_account(request).await }
    };
    assert_status(
        delete(&pat, &alice.account_id).await,
        Code::PermissionDenied,
        "ERROR_REASON_SESSION_REQUIRED",
    );
    delete(&app.operator_token, &alice.account_id)
        .await
        .expect("delete");

    for credential in [&pat, &session] {
        assert_eq!(
            app.verify(credential, &[]).await.reason,
            pb::InactiveReason::Unknown as i32
        );
    }
    assert_status(
        delete(&app.operator_token, &alice.account_id).await,
        Code::NotFound,
        "ERROR_REASON_ACCOUNT_NOT_FOUND",
    );
    let events = app.audit(&alice.account_id, &[]).await;
    let deleted = events.first().expect("events remain");
    assert_eq!(deleted.r#type, pb::AuditEventType::AccountDeleted as i32);
    assert_eq!(deleted.subject_username, "alice");
    assert!(
        events
            .iter()
            .any(|e| e.r#type == pb::AuditEventType::AccountCreated as i32)
    );

    // The username is free again, and a person may delete themselves.
    let (again, again_session) = app.person("alice").await;
    assert_ne!(again.account_id, alice.account_id);
    delete(&again_session, &again.account_id)
        .await
        .expect("self-deletion with a session");
}
both_backends!(a_deleted_account_stops_at_once_and_its_audit_trail_remains);

async fn common_and_short_passwords_are_refused_with_a_clear_violation(app: TestApp) {
    use tonic_types::StatusExt as _;
    for (password, expected) in [
        ("passwordpassword", "most common"),
        ("1234567890123456", "most common"),
        ("fourteen chars", "at least 15"),
        ("carol-the-admin", "username"),
    ] {
        let status = assert_status(
            app.accounts()
                .create_account(bearer(
                    pb::CreateAccountRequest {
                        username: "carol-the-admin".into(),
                        password: password.into(),
                        kind: pb::AccountKind::Person as i32,
                        ..Default::default()
                    },
                    &app.operator_token,
                ))
                .await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!(violation.field, "password");
        assert!(
            violation.description.contains(expected),
            "{password}: {}",
            violation.description
        );
    }
    // Every Unicode character counts as one: 15 of them are enough.
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "dmitri".into(),
                password: "пароль-для-дим!".into(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("fifteen Cyrillic characters");
}
both_backends!(common_and_short_passwords_are_refused_with_a_clear_violation);

async fn every_security_event_is_audited_without_secrets(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    assert!(
        sign_in(&app, "alice", "definitely the wrong one")
            .await
            .is_err()
    );
    assert!(
        sign_in(&app, "nobody-at-all", "definitely the wrong one")
            .await
            .is_err()
    );
    let (token, pat) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    let rotated = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("rotate")
        .into_inner();
    let new_id = rotated.token.as_ref().expect("token").token_id.clone();
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: new_id.clone(),
            },
            &session,
        ))
        .await
        .expect("revoke");
    app.accounts()
        .sign_out(bearer(pb::SignOutRequest {}, &session))
        .await
        .expect("sign out");

    let events = app.audit(&alice.account_id, &[]).await;
    let mut types: Vec<_> = events.iter().map(|e| (e.r#type, e.outcome)).collect();
    types.reverse();
    use pb::{AuditEventType as T, AuditOutcome as O};
    assert_eq!(
        types,
        [
            (T::AccountCreated as i32, O::Success as i32),
            (T::SignIn as i32, O::Success as i32),
            (T::SignIn as i32, O::Failure as i32),
            (T::TokenCreated as i32, O::Success as i32),
            (T::TokenRotated as i32, O::Success as i32),
            (T::TokenRevoked as i32, O::Success as i32),
            (T::SignedOut as i32, O::Success as i32),
        ]
    );
    let created = events
        .iter()
        .find(|e| e.r#type == T::AccountCreated as i32)
        .expect("created");
    assert!(
        !created.actor_account_id.is_empty(),
        "the operator is the actor"
    );
    assert!(
        events
            .iter()
            .all(|e| !e.source_address.is_empty() && e.time.is_some())
    );

    // The failed sign-in of an unknown user is recorded without a subject.
    let all = audit_client(&app)
        .list_audit_events(bearer(
            pb::ListAuditEventsRequest {
                types: vec![T::SignIn as i32],
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("operator lists everything")
        .into_inner()
        .events;
    assert!(
        all.iter()
            .any(|e| e.outcome == O::Failure as i32 && e.subject_account_id.is_empty())
    );

    let shown = format!("{events:?}{all:?}");
    for secret in [&session, &pat, &rotated.secret, &app.operator_token] {
        assert!(
            !shown.contains(&secret[6..]),
            "an audit event leaked a secret"
        );
    }
    for password in [PASSWORD, "definitely the wrong one"] {
        assert!(!shown.contains(password));
    }
}
both_backends!(every_security_event_is_audited_without_secrets);

async fn the_audit_log_is_scoped_to_the_caller_and_paginated(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (bob, _) = app.person("bob").await;
    for i in 0..4 {
        app.token(&session, &alice.account_id, &format!("t{i}"), &[])
            .await;
    }
    let list = |caller: &str, account: &str, page_size: i32, page_token: String| {
        let mut client = audit_client(&app);
        let request = bearer(
            pb::ListAuditEventsRequest {
                account_id: account.into(),
                types: vec![],
                page_size,
                page_token,
                ..Default::default()
            },
            caller,
        );
        async move {
            client
                .list_audit_events(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };
    assert_status(
        list(&session, "", 0, String::new()).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );
    assert_status(
        list(&session, &bob.account_id, 0, String::new()).await,
        Code::PermissionDenied,
        "ERROR_REASON_NOT_ALLOWED",
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(&session, &alice.account_id, 2, token)
            .await
            .expect("own events");
        assert!(page.events.len() <= 2);
        seen.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // created, signed in, four tokens
    assert_eq!(seen.len(), 6);
    let ids: Vec<_> = seen.iter().map(|e| e.event_id.clone()).collect();
    let mut newest_first = ids.clone();
    newest_first.sort_by(|a, b| b.cmp(a));
    assert_eq!(ids, newest_first);
    assert!(seen.iter().all(
        |e| e.subject_account_id == alice.account_id || e.actor_account_id == alice.account_id
    ));
}
both_backends!(the_audit_log_is_scoped_to_the_caller_and_paginated);
