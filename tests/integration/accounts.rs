//! AccountsService through the real server.

use tonic::Code;

use crate::both_backends;
use crate::support::{PASSWORD, TestApp, assert_status, bearer, pb};

fn person_request(username: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        username: username.into(),
        password: PASSWORD.into(),
        email: String::new(),
        kind: pb::AccountKind::Person as i32,
        role: 0,
    }
}

async fn operator_creates_people_and_robots(app: TestApp) {
    let (alice, _) = app.person("alice").await;
    assert_eq!(alice.username, "alice");
    assert_eq!(alice.email, "alice@example.com");
    assert_eq!(alice.kind, pb::AccountKind::Person as i32);
    assert_eq!(alice.role, pb::AccountRole::User as i32);
    assert!(alice.create_time.is_some());
    assert!(uuid::Uuid::try_parse(&alice.account_id).is_ok());

    let robot = app.robot("ci-bot").await;
    assert_eq!(robot.kind, pb::AccountKind::Robot as i32);

    let fetched = app
        .accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::AccountId(
                    robot.account_id.clone(),
                )),
            },
            &app.operator_token,
        ))
        .await
        .expect("get by id")
        .into_inner()
        .account
        .expect("account");
    assert_eq!(fetched, robot);
}
both_backends!(operator_creates_people_and_robots);

async fn usernames_are_unique_regardless_of_case(app: TestApp) {
    app.person("Alice").await;
    let again = app
        .accounts()
        .create_account(bearer(person_request("aLiCe"), &app.operator_token))
        .await;
    assert_status(again, Code::AlreadyExists, "ERROR_REASON_USERNAME_TAKEN");

    let by_other_case = app
        .accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ALICE".into())),
            },
            &app.operator_token,
        ))
        .await
        .expect("lookup is case-insensitive")
        .into_inner();
    assert_eq!(by_other_case.account.expect("account").username, "Alice");
}
both_backends!(usernames_are_unique_regardless_of_case);

async fn concurrent_creation_of_one_username_yields_exactly_one_account(app: TestApp) {
    let attempts = (0..8).map(|i| {
        let mut client = app.accounts();
        let token = app.operator_token.clone();
        let name = if i % 2 == 0 { "racer" } else { "RACER" };
        tokio::spawn(async move {
            let mut req = person_request(name);
            req.kind = pb::AccountKind::Robot as i32;
            req.password.clear();
            client.create_account(bearer(req, &token)).await
        })
    });
    let mut created = 0;
    let mut taken = 0;
    for attempt in attempts.collect::<Vec<_>>() {
        match attempt.await.expect("task") {
            Ok(_) => created += 1,
            Err(status) if status.code() == Code::AlreadyExists => taken += 1,
            Err(other) => panic!("unexpected status {other:?}"),
        }
    }
    assert_eq!((created, taken), (1, 7));
}
both_backends!(concurrent_creation_of_one_username_yields_exactly_one_account);

async fn invalid_account_requests_name_every_bad_field(app: TestApp) {
    use tonic_types::StatusExt as _;
    let status = assert_status(
        app.accounts()
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: "bad name!".into(),
                    password: "short".into(),
                    email: "not-an-address".into(),
                    kind: pb::AccountKind::Person as i32,
                    role: 99,
                },
                &app.operator_token,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    let details = status.get_error_details();
    let mut fields: Vec<_> = details
        .bad_request()
        .expect("BadRequest detail")
        .field_violations
        .iter()
        .map(|v| v.field.as_str())
        .collect();
    fields.sort_unstable();
    assert_eq!(fields, ["email", "password", "role", "username"]);
    assert!(
        !status.message().contains("short"),
        "the password must not be echoed"
    );

    let robot_with_password = pb::CreateAccountRequest {
        kind: pb::AccountKind::Robot as i32,
        ..person_request("robo")
    };
    assert_status(
        app.accounts()
            .create_account(bearer(robot_with_password, &app.operator_token))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    let no_kind = pb::CreateAccountRequest {
        kind: 0,
        ..person_request("nokind")
    };
    assert_status(
        app.accounts()
            .create_account(bearer(no_kind, &app.operator_token))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    // Nothing was stored by the refused requests.
    let listed = app
        .accounts()
        .list_accounts(bearer(
            pb::ListAccountsRequest::default(),
            &app.operator_token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.accounts.len(), 1, "only the operator exists");
}
both_backends!(invalid_account_requests_name_every_bad_field);

async fn list_accounts_pages_through_every_account_once(app: TestApp) {
    for i in 0..7 {
        app.robot(&format!("robot-{i}")).await;
    }
    let mut seen = Vec::new();
    let mut page_token = String::new();
    let mut pages = 0;
    loop {
        let page = app
            .accounts()
            .list_accounts(bearer(
                pb::ListAccountsRequest {
                    page_size: 3,
                    page_token: page_token.clone(),
                },
                &app.operator_token,
            ))
            .await
            .expect("list")
            .into_inner();
        pages += 1;
        assert!(page.accounts.len() <= 3);
        seen.extend(page.accounts.into_iter().map(|a| a.username));
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    let mut expected: Vec<String> = (0..7).map(|i| format!("robot-{i}")).collect();
    expected.push("ops".into());
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);

    assert_status(
        app.accounts()
            .list_accounts(bearer(
                pb::ListAccountsRequest {
                    page_size: -1,
                    page_token: String::new(),
                },
                &app.operator_token,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert_status(
        app.accounts()
            .list_accounts(bearer(
                pb::ListAccountsRequest {
                    page_size: 1,
                    page_token: "forged".into(),
                },
                &app.operator_token,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(list_accounts_pages_through_every_account_once);

async fn sign_in_starts_a_session_that_authenticates_calls(app: TestApp) {
    let (alice, _) = app.person("alice").await;
    let signed_in = app
        .accounts()
        .sign_in(pb::SignInRequest {
            username: "ALICE".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("sign in with any case of the username")
        .into_inner();
    assert!(signed_in.session_token.starts_with("idses_"));
    assert_eq!(
        signed_in.account.expect("account").account_id,
        alice.account_id
    );
    assert!(signed_in.expire_time.is_some());

    let own = app
        .accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::AccountId(
                    alice.account_id.clone(),
                )),
            },
            &signed_in.session_token,
        ))
        .await
        .expect("a session reads its own account");
    assert_eq!(own.into_inner().account.expect("account").username, "alice");
}
both_backends!(sign_in_starts_a_session_that_authenticates_calls);

async fn failed_sign_ins_are_indistinguishable(app: TestApp) {
    app.person("alice").await;
    app.robot("robot").await;
    let attempts = [
        ("alice", "wrong password, long enough"),
        ("nobody", PASSWORD),
        ("robot", PASSWORD),
        ("ops", PASSWORD),
    ];
    let mut messages = Vec::new();
    for (username, password) in attempts {
        let status = assert_status(
            app.accounts()
                .sign_in(pb::SignInRequest {
                    username: username.into(),
                    password: password.into(),
                })
                .await,
            Code::Unauthenticated,
            "ERROR_REASON_SIGN_IN_FAILED",
        );
        messages.push(status.message().to_owned());
    }
    messages.dedup();
    assert_eq!(
        messages.len(),
        1,
        "every failure must read the same: {messages:?}"
    );

    assert_status(
        app.accounts()
            .sign_in(pb::SignInRequest {
                username: String::new(),
                password: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(failed_sign_ins_are_indistinguishable);

async fn sign_out_ends_only_the_calling_session(app: TestApp) {
    let (_, first) = app.person("alice").await;
    let second = app
        .accounts()
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("second session")
        .into_inner()
        .session_token;
    app.accounts()
        .sign_out(bearer(pb::SignOutRequest {}, &first))
        .await
        .expect("sign out");

    let verdict = app.verify(&first, &[]).await;
    assert!(!verdict.active);
    assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    assert_status(
        app.accounts()
            .sign_out(bearer(pb::SignOutRequest {}, &first))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );
    assert!(
        app.verify(&second, &[]).await.active,
        "the other session lives on"
    );
}
both_backends!(sign_out_ends_only_the_calling_session);

async fn personal_access_tokens_cannot_sign_in_or_out(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, pat) = app.token(&session, &alice.account_id, "laptop", &[]).await;
    let mut request = bearer(
        pb::SignInRequest {
            username: "alice".into(),
            password: PASSWORD.into(),
        },
        &pat,
    );
    request.metadata_mut();
    assert_status(
        app.accounts().sign_in(request).await,
        Code::PermissionDenied,
        "ERROR_REASON_SESSION_REQUIRED",
    );
    assert_status(
        app.accounts()
            .sign_out(bearer(pb::SignOutRequest {}, &pat))
            .await,
        Code::PermissionDenied,
        "ERROR_REASON_SESSION_REQUIRED",
    );
    assert!(app.verify(&pat, &[]).await.active);
}
both_backends!(personal_access_tokens_cannot_sign_in_or_out);

async fn people_read_only_their_own_account(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (bob, _) = app.person("bob").await;
    for lookup in [
        pb::get_account_request::Lookup::AccountId(bob.account_id.clone()),
        pb::get_account_request::Lookup::Username("bob".into()),
        pb::get_account_request::Lookup::Username("nobody".into()),
        pb::get_account_request::Lookup::AccountId(uuid::Uuid::now_v7().to_string()),
    ] {
        assert_status(
            app.accounts()
                .get_account(bearer(
                    pb::GetAccountRequest {
                        lookup: Some(lookup),
                    },
                    &session,
                ))
                .await,
            Code::PermissionDenied,
            "ERROR_REASON_NOT_ALLOWED",
        );
    }
    let own = app
        .accounts()
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("Alice".into())),
            },
            &session,
        ))
        .await
        .expect("own account by username")
        .into_inner();
    assert_eq!(own.account.expect("account").account_id, alice.account_id);
    assert_status(
        app.accounts()
            .get_account(bearer(
                pb::GetAccountRequest {
                    lookup: Some(pb::get_account_request::Lookup::AccountId(
                        uuid::Uuid::now_v7().to_string(),
                    )),
                },
                &app.operator_token,
            ))
            .await,
        Code::NotFound,
        "ERROR_REASON_ACCOUNT_NOT_FOUND",
    );
    assert_status(
        app.accounts()
            .get_account(bearer(pb::GetAccountRequest { lookup: None }, &session))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
}
both_backends!(people_read_only_their_own_account);
