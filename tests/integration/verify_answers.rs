//! What `VerifyToken` tells its caller beyond the verdict: which required
//! scopes a credential lacks, and why a `client_address` list is refused.

use tonic::Code;

use crate::{
    on_both_backends,
    support::{assert_status, bearer, pb},
};

on_both_backends! {
    async fn an_insufficient_scope_names_only_the_required_scopes_that_are_missing(app: TestApp) {
        let (alice, session) = app.person("alice").await;
        let (_, secret) = app
            .token(&session, &alice.account_id, "ci", &["project:read", "project:write", "tokens:read"])
            .await;

        let verdict = app
            .verify(&secret, &["project:read", "project:publish", "deploy:prod", "project:publish"])
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
        let active = app.verify(&secret, &["project:read", "project:write"]).await;
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
}

on_both_backends! {
    async fn a_forwarded_for_list_as_client_address_is_refused_saying_what_to_pass(app: TestApp) {
        let robot = app.robot("ci").await;
        let (token, secret) = app.token(&app.operator_token, &robot.account_id, "ci", &[]).await;
        let verifier = app.verifier_token().await;
        for list in ["203.0.113.9, 10.0.0.1", "203.0.113.9,10.0.0.1", "[2001:db8::1]:443, 10.0.0.1:80"] {
            let status = assert_status(
                app.tokens()
                    .verify_token(bearer(
                        pb::VerifyTokenRequest { token: secret.clone(), client_address: list.into(), ..Default::default() },
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
            assert!(!message.contains("203.0.113.9"), "the value is not echoed: {message}");
            use tonic_types::StatusExt as _;
            let details = status.get_error_details();
            let violations = &details.bad_request().expect("a BadRequest").field_violations;
            assert_eq!(violations.len(), 1);
            assert_eq!(violations[0].field, "client_address");
        }
        // Something that is no address at all gets the plain message.
        let status = assert_status(
            app.tokens()
                .verify_token(bearer(
                    pb::VerifyTokenRequest { token: secret.clone(), client_address: "gateway.internal".into(), ..Default::default() },
                    &verifier,
                ))
                .await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        assert!(status.message().contains("must be one IP address"), "{}", status.message());
        // A refused call used nothing: the token has no last use.
        let got = app
            .tokens()
            .get_token(bearer(pb::GetTokenRequest { token_id: token.token_id.clone() }, &app.operator_token))
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
                pb::VerifyTokenRequest { token: secret, client_address: "203.0.113.9".into(), ..Default::default() },
                &verifier,
            ))
            .await
            .expect("verify")
            .into_inner();
        assert!(verdict.active);
    }
}
