//! What `VerifyToken` tells its caller beyond the verdict: which required
//! scopes a credential lacks, why a `client_address` list is refused, and
//! when the verifier's own credential expires (a gauge, and a warning in
//! the log a week ahead).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Code;

use crate::{
    both_backends,
    observability::scrape,
    support::binary::{Secrets, Server, bootstrap_operator, printed_token},
    support::{Backend, TestApp, TestDatabase, assert_status, bearer, pb},
};

const EXPIRY_GAUGE: &str = "identity_verifier_credential_expiry_timestamp_seconds";

/// A `VerifyToken` request for `token` requiring `scopes`.
fn verify_request(token: &str, scopes: &[&str]) -> pb::VerifyTokenRequest {
    pb::VerifyTokenRequest {
        token: token.into(),
        required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

async fn an_insufficient_scope_names_only_the_required_scopes_that_are_missing(app: TestApp) {
    let (alice, session) = app.person("alice").await;
    let (_, secret) = app
        .token(
            &session,
            &alice.account_id,
            "ci",
            &["project:read", "project:write", "tokens:read"],
        )
        .await;

    let verdict = app
        .verify(
            &secret,
            &[
                "project:read",
                "project:publish",
                "deploy:prod",
                "project:publish",
            ],
        )
        .await;
    assert!(!verdict.active && verdict.principal.is_none());
    assert_eq!(verdict.reason, pb::InactiveReason::InsufficientScope as i32);
    assert_eq!(
        verdict.missing_scopes,
        ["deploy:prod", "project:publish"],
        "the missing ones, sorted, once each; never the token's own scopes"
    );

    // Nothing is listed when nothing is missing, or when the credential
    // is refused for another reason.
    let active = app
        .verify(&secret, &["project:read", "project:write"])
        .await;
    assert!(active.active);
    assert!(active.missing_scopes.is_empty());
    let unknown = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::PersonalAccessToken,
    );
    let verdict = app.verify(unknown.expose(), &["deploy:prod"]).await;
    assert_eq!(verdict.reason, pb::InactiveReason::Unknown as i32);
    assert!(verdict.missing_scopes.is_empty());
    // Full access lacks nothing.
    let session_verdict = app.verify(&session, &["deploy:prod"]).await;
    assert!(session_verdict.active && session_verdict.missing_scopes.is_empty());
}
both_backends!(an_insufficient_scope_names_only_the_required_scopes_that_are_missing);

async fn a_forwarded_for_list_as_client_address_is_refused_saying_what_to_pass(app: TestApp) {
    let robot = app.robot("ci").await;
    let (token, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    let verifier = app.verifier_token().await;
    for list in [
        "203.0.113.9, 10.0.0.1",
        "203.0.113.9,10.0.0.1",
        "[2001:db8::1]:443, 10.0.0.1:80",
    ] {
        let status = assert_status(
            app.tokens()
                .verify_token(bearer(
                    pb::VerifyTokenRequest {
                        token: secret.clone(),
                        client_address: list.into(),
                        ..Default::default()
                    },
                    &verifier,
                ))
                .await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        let message = status.message();
        assert!(
            message.contains("client_address")
                && message.contains("takes one IP address, not a list")
                && message.contains("right-most X-Forwarded-For entry"),
            "{list:?}: {message}"
        );
        assert!(
            !message.contains("203.0.113.9"),
            "the value is not echoed: {message}"
        );
        use tonic_types::StatusExt as _;
        let details = status.get_error_details();
        let violations = &details
            .bad_request()
            .expect("a BadRequest")
            .field_violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].field, "client_address");
    }
    // Something that is no address at all gets the plain message.
    let status = assert_status(
        app.tokens()
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: secret.clone(),
                    client_address: "gateway.internal".into(),
                    ..Default::default()
                },
                &verifier,
            ))
            .await,
        Code::InvalidArgument,
        "ERROR_REASON_INVALID_ARGUMENT",
    );
    assert!(
        status.message().contains("must be one IP address"),
        "{}",
        status.message()
    );
    // A refused call used nothing: the token has no last use.
    let got = app
        .tokens()
        .get_token(bearer(
            pb::GetTokenRequest {
                token_id: token.token_id.clone(),
            },
            &app.operator_token,
        ))
        .await
        .expect("get")
        .into_inner()
        .token
        .expect("token");
    assert!(got.last_used_time.is_none() && got.last_used_address.is_empty());
    // One address, as the calling service trusts it, is accepted.
    let verdict = app
        .tokens()
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret,
                client_address: "203.0.113.9".into(),
                ..Default::default()
            },
            &verifier,
        ))
        .await
        .expect("verify")
        .into_inner();
    assert!(verdict.active);
}
both_backends!(a_forwarded_for_list_as_client_address_is_refused_saying_what_to_pass);

/// A timestamp `days` from now.
fn days_from_now(days: u64) -> prost_types::Timestamp {
    let at = SystemTime::now() + Duration::from_secs(days * 24 * 60 * 60);
    let since = at.duration_since(UNIX_EPOCH).expect("after the epoch");
    prost_types::Timestamp {
        seconds: i64::try_from(since.as_secs()).expect("fits"),
        nanos: 0,
    }
}

/// The value of the series `name` (no labels) in a scrape.
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name} is not a number ({e}) in:\n{text}"))
}

/// The real binary (a process of its own, so the gauge is its alone): a
/// verifier token that expires in 30 days shows in the gauge without a
/// warning; one that expires in 3 days becomes the soonest and is warned
/// about, by id, once. A service admitted by its client certificate has no
/// credential to expire (tls.rs covers that mode); the first scrape, before
/// any verifier called, reads `+Inf`.
async fn the_verifier_credential_expiry_is_exported_and_warned_about_on(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let mut secrets = Secrets::default();
    let operator = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    secrets.token("operator token", &operator);
    let server = Server::start(&db.url, &[]).await;
    let metrics_addr = server.metrics_addr.expect("metrics are on");
    let channel = server.channel().await;
    let mut accounts = pb::accounts_service_client::AccountsServiceClient::new(channel.clone());
    let mut tokens = pb::tokens_service_client::TokensServiceClient::new(channel);

    let before = scrape(metrics_addr).await;
    assert!(
        gauge(&before, EXPIRY_GAUGE).is_infinite(),
        "no verifier has called yet:\n{before}"
    );

    let gateway = accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "gateway".into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create the gateway robot")
        .into_inner()
        .account
        .expect("account");
    let verifier = |name: &'static str, expire_time: prost_types::Timestamp| {
        let mut tokens = tokens.clone();
        let operator = operator.clone();
        let account_id = gateway.account_id.clone();
        async move {
            let created = tokens
                .create_token(bearer(
                    pb::CreateTokenRequest {
                        account_id,
                        name: name.into(),
                        scopes: vec!["tokens:verify".into()],
                        expire_time: Some(expire_time),
                        ..Default::default()
                    },
                    &operator,
                ))
                .await
                .expect("create a verifier token")
                .into_inner();
            (created.token.expect("token"), created.secret)
        }
    };
    let (month, month_secret) = verifier("verifier-month", days_from_now(30)).await;
    let (soon, soon_secret) = verifier("verifier-soon", days_from_now(3)).await;
    secrets.token("30-day verifier", &month_secret);
    secrets.token("3-day verifier", &soon_secret);
    let month_expiry = month.expire_time.expect("expires").seconds as f64;
    let soon_expiry = soon.expire_time.expect("expires").seconds as f64;

    // The 30-day verifier calls (twice: the second changes nothing).
    for _ in 0..2 {
        let verdict = tokens
            .verify_token(bearer(verify_request(&operator, &[]), &month_secret))
            .await
            .expect("verify with the 30-day verifier")
            .into_inner();
        assert!(verdict.active);
    }
    let after_month = scrape(metrics_addr).await;
    assert_eq!(
        gauge(&after_month, EXPIRY_GAUGE),
        month_expiry,
        "{after_month}"
    );

    // A person's own `tokens:verify` token, a day from expiry, calls too:
    // robots alone are watched, so it moves nothing and warns of nothing.
    let mallory = accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "mallory".into(),
                password: format!("mallory-{}-password", crate::support::binary::random_hex()),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create a person")
        .into_inner()
        .account
        .expect("account");
    let own = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: mallory.account_id.clone(),
                name: "my-verifier".into(),
                scopes: vec!["tokens:verify".into()],
                expire_time: Some(days_from_now(1)),
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create the person's verifier token")
        .into_inner();
    secrets.token("the person's verifier", &own.secret);
    let own_id = own.token.expect("token").token_id;
    tokens
        .verify_token(bearer(verify_request(&operator, &[]), &own.secret))
        .await
        .expect("a person's token may verify");
    let after_person = scrape(metrics_addr).await;
    assert_eq!(
        gauge(&after_person, EXPIRY_GAUGE),
        month_expiry,
        "a person's token does not move the gauge:\n{after_person}"
    );

    // The 3-day verifier calls, and is now the soonest.
    for _ in 0..3 {
        tokens
            .verify_token(bearer(verify_request(&operator, &[]), &soon_secret))
            .await
            .expect("verify with the 3-day verifier");
    }
    let after_soon = scrape(metrics_addr).await;
    assert_eq!(
        gauge(&after_soon, EXPIRY_GAUGE),
        soon_expiry,
        "{after_soon}"
    );
    assert!(
        after_soon.contains(&format!("# TYPE {EXPIRY_GAUGE} gauge")),
        "{after_soon}"
    );

    let stopped = server.terminate().await;
    assert!(stopped.status.success(), "{stopped:?}");
    let warnings: Vec<&str> = stopped
        .stderr
        .lines()
        .filter(|line| line.contains("calls VerifyToken expires within a week"))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, for the 3-day verifier, once:\n{}",
        stopped.stderr
    );
    assert!(warnings[0].contains("WARN"), "{}", warnings[0]);
    assert!(
        warnings.iter().all(|line| !line.contains(&own_id)),
        "the person's token is not warned about: {warnings:?}"
    );
    assert!(
        warnings[0].contains(&soon.token_id) && !warnings[0].contains(&month.token_id),
        "{}",
        warnings[0]
    );
    secrets.assert_absent_from(&[
        ("the server's stderr", &stopped.stderr),
        ("the server's metrics", &after_soon),
    ]);
}

mod the_verifier_credential_expiry_is_exported_and_warned_about {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        the_verifier_credential_expiry_is_exported_and_warned_about_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        the_verifier_credential_expiry_is_exported_and_warned_about_on(Backend::Postgres).await;
    }
}
