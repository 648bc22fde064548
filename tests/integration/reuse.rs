//! Reuse detection, exactly as documented: only `RotateToken` detects it.
//! A rotated-out secret presented anywhere else is simply revoked (its
//! successor lives on); presented to `RotateToken` it revokes the whole
//! family, and the audit log records the refused attempt as a failure and
//! the revocations it caused as successes.

use tonic::Code;

use crate::{
    both_backends,
    support::{TestApp, assert_status, bearer, pb},
};

async fn only_rotate_token_detects_reuse_and_the_audit_log_says_the_attempt_was_refused(
    app: TestApp,
) {
    let robot = app.robot("ci").await;
    let (first, first_secret) = app
        .token(
            &app.operator_token,
            &robot.account_id,
            "ci",
            &["tokens:write"],
        )
        .await;
    // A child of the family, revoked with it.
    let (child, child_secret) = app
        .token(&first_secret, &robot.account_id, "child", &["tokens:write"])
        .await;
    let rotated = app
        .tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: first.token_id.clone(),
            },
            &first_secret,
        ))
        .await
        .expect("rotate")
        .into_inner();
    let successor = rotated.token.expect("token");

    // Presented anywhere but RotateToken, the old secret is revoked,
    // nothing more: the successor and the child live on, no reuse.
    assert_eq!(
        app.verify(&first_secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert_status(
        app.tokens()
            .get_caller(bearer(pb::GetCallerRequest {}, &first_secret))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );
    assert_status(
        app.tokens()
            .get_token(bearer(
                pb::GetTokenRequest {
                    token_id: successor.token_id.clone(),
                },
                &first_secret,
            ))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_INVALID",
    );
    assert!(
        app.verify(&rotated.secret, &[]).await.active,
        "the successor stays active"
    );
    assert!(
        app.verify(&child_secret, &[]).await.active,
        "so does the family's child"
    );
    assert!(
        app.audit(&robot.account_id, &[pb::AuditEventType::TokenReuseDetected])
            .await
            .is_empty()
    );

    // Presented to RotateToken, it is reuse: the family and its child go.
    assert_status(
        app.tokens()
            .rotate_token(bearer(
                pb::RotateTokenRequest {
                    token_id: successor.token_id.clone(),
                },
                &first_secret,
            ))
            .await,
        Code::Unauthenticated,
        "ERROR_REASON_CREDENTIAL_REUSED",
    );
    assert_eq!(
        app.verify(&rotated.secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    assert_eq!(
        app.verify(&child_secret, &[]).await.reason,
        pb::InactiveReason::Revoked as i32
    );

    let reuse = app
        .audit(&robot.account_id, &[pb::AuditEventType::TokenReuseDetected])
        .await;
    assert_eq!(reuse.len(), 1, "{reuse:?}");
    assert_eq!(reuse[0].subject_credential_id, first.token_id);
    assert_eq!(
        reuse[0].outcome,
        pb::AuditOutcome::Failure as i32,
        "the rotation was refused"
    );
    let revoked = app
        .audit(&robot.account_id, &[pb::AuditEventType::TokenRevoked])
        .await;
    let child_revoked: Vec<_> = revoked
        .iter()
        .filter(|e| e.subject_credential_id == child.token_id)
        .collect();
    assert_eq!(child_revoked.len(), 1, "{revoked:?}");
    assert_eq!(
        child_revoked[0].outcome,
        pb::AuditOutcome::Success as i32,
        "the child's revocation took effect"
    );
}
both_backends!(only_rotate_token_detects_reuse_and_the_audit_log_says_the_attempt_was_refused);
