//! Conversions from domain values to protobuf messages, for the responses.
//! (Requests go the other way in [`super::parse`].)

use super::pb;
use crate::domain::{
    account::{Account, AccountKind, Role},
    audit::{AuditEvent, EventType, Outcome},
    credential::CredentialKind,
    policy::Principal,
    service::InactiveReason,
    time::Timestamp,
    token::{Token, TokenState},
};

pub(super) fn timestamp(ts: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = ts.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

pub(super) fn account(a: Account) -> pb::Account {
    pb::Account {
        account_id: a.id.as_str().to_owned(),
        username: a.username.as_str().to_owned(),
        email: a.email.as_str().to_owned(),
        kind: account_kind(a.kind) as i32,
        role: role(a.role) as i32,
        create_time: Some(timestamp(a.create_time)),
        disabled: a.disable_time.is_some(),
        disable_time: a.disable_time.map(timestamp),
    }
}

pub(super) fn account_kind(kind: AccountKind) -> pb::AccountKind {
    match kind {
        AccountKind::Person => pb::AccountKind::Person,
        AccountKind::Robot => pb::AccountKind::Robot,
    }
}

pub(super) fn role(role: Role) -> pb::AccountRole {
    match role {
        Role::User => pb::AccountRole::User,
        Role::Operator => pb::AccountRole::Operator,
    }
}

pub(super) fn token(t: Token, now: Timestamp) -> pb::Token {
    let state = match t.state(now) {
        TokenState::Active => pb::TokenState::Active,
        TokenState::Expired => pb::TokenState::Expired,
        TokenState::Revoked => pb::TokenState::Revoked,
        TokenState::Exhausted => pb::TokenState::Exhausted,
    };
    pb::Token {
        token_id: t.id.as_str().to_owned(),
        account_id: t.account_id.as_str().to_owned(),
        name: t.name.as_str().to_owned(),
        scopes: t.scopes.names().map(str::to_owned).collect(),
        resources: t.resources.names().map(str::to_owned).collect(),
        create_time: Some(timestamp(t.create_time)),
        expire_time: t.expire_time.map(timestamp),
        // The earlier of an explicit revocation and the end of a rotation's
        // grace period (the proto has one field for both).
        revoke_time: match (t.revoke_time, t.retire_time) {
            (Some(revoke), Some(retire)) => Some(revoke.min(retire)),
            (revoke, retire) => revoke.or(retire),
        }
        .map(timestamp),
        state: state as i32,
        max_uses: t.max_uses,
        uses_remaining: t.uses_remaining,
        last_used_time: t.last_used_time.map(timestamp),
        last_used_address: t.last_used_address,
        family_id: t.family_id.as_str().to_owned(),
        replaced_by_token_id: t
            .replaced_by
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
    }
}

pub(super) fn audit_event(e: AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        event_id: e.id,
        time: Some(timestamp(e.time)),
        r#type: event_type(e.kind) as i32,
        outcome: match e.outcome {
            Outcome::Success => pb::AuditOutcome::Success,
            Outcome::Failure => pb::AuditOutcome::Failure,
        } as i32,
        actor_account_id: e
            .actor_account
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        actor_credential_id: e
            .actor_credential
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        subject_account_id: e
            .subject_account
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        subject_credential_id: e
            .subject_credential
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default(),
        subject_username: e.subject_username,
        source_address: e.source_address,
    }
}

pub(super) fn event_type(kind: EventType) -> pb::AuditEventType {
    use pb::AuditEventType as P;
    match kind {
        EventType::AccountCreated => P::AccountCreated,
        EventType::AccountDisabled => P::AccountDisabled,
        EventType::AccountEnabled => P::AccountEnabled,
        EventType::AccountDeleted => P::AccountDeleted,
        EventType::SignIn => P::SignIn,
        EventType::SignedOut => P::SignedOut,
        EventType::SignedOutEverywhere => P::SignedOutEverywhere,
        EventType::PasswordChanged => P::PasswordChanged,
        EventType::TokenCreated => P::TokenCreated,
        EventType::TokenRotated => P::TokenRotated,
        EventType::TokenRevoked => P::TokenRevoked,
        EventType::TokenLeaked => P::TokenLeaked,
        EventType::TokenReuseDetected => P::TokenReuseDetected,
        EventType::SignInThrottled => P::SignInThrottled,
        EventType::TokenRenewed => P::TokenRenewed,
    }
}

pub(super) fn principal(p: &Principal) -> pb::Principal {
    pb::Principal {
        account_id: p.account.id.as_str().to_owned(),
        username: p.account.username.as_str().to_owned(),
        account_kind: account_kind(p.account.kind) as i32,
        account_role: role(p.account.role) as i32,
        credential_kind: match p.credential {
            CredentialKind::Session => pb::CredentialKind::Session,
            CredentialKind::PersonalAccessToken => pb::CredentialKind::PersonalAccessToken,
        } as i32,
        token_id: p.credential_id.as_str().to_owned(),
        scopes: p.scopes.names().map(str::to_owned).collect(),
        expire_time: p.expire_time.map(timestamp),
        uses_remaining: p.uses_remaining,
        resources: p.resources.names().map(str::to_owned).collect(),
    }
}

pub(super) fn inactive_reason(reason: InactiveReason) -> pb::InactiveReason {
    match reason {
        InactiveReason::Malformed => pb::InactiveReason::Malformed,
        InactiveReason::Unknown => pb::InactiveReason::Unknown,
        InactiveReason::Expired => pb::InactiveReason::Expired,
        InactiveReason::Revoked => pb::InactiveReason::Revoked,
        InactiveReason::AccountDisabled => pb::InactiveReason::AccountDisabled,
        InactiveReason::InsufficientScope => pb::InactiveReason::InsufficientScope,
        InactiveReason::Exhausted => pb::InactiveReason::Exhausted,
        InactiveReason::ResourceNotAllowed => pb::InactiveReason::ResourceNotAllowed,
    }
}
