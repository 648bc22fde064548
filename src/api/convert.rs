//! Conversions between protobuf messages and domain values. Parsing client
//! input here produces `DomainError::InvalidArgument` with the request's field
//! names, so the status mapping can list them.

use super::pb;
use crate::domain::store::TokenFilter;
use crate::domain::{
    DomainError,
    account::{Account, AccountId, AccountKind, Role},
    audit::{AuditEvent, AuditFilter, EventType, Outcome},
    credential::CredentialKind,
    error::Violations,
    page::{PageRequest, tokens_listing},
    policy::Principal,
    resource::Resources,
    scope::Scopes,
    service::{InactiveReason, TokenRequest, audit_listing},
    time::Timestamp,
    token::{Token, TokenName, TokenState},
};

pub(super) fn timestamp(ts: Timestamp) -> prost_types::Timestamp {
    let (seconds, nanos) = ts.to_seconds_nanos();
    prost_types::Timestamp { seconds, nanos }
}

/// Parses an optional client timestamp; out-of-range values are invalid.
pub(super) fn parse_timestamp(
    field: &str,
    ts: Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>, DomainError> {
    ts.map(|ts| {
        Timestamp::from_seconds_nanos(ts.seconds, ts.nanos).ok_or_else(|| {
            DomainError::invalid(field, "must be a valid time between years 1 and 9999")
        })
    })
    .transpose()
}

/// Parses `CreateToken`'s request at `now`: `ttl` becomes an expiry `now`
/// plus the duration. Shared by the handler and the fuzz targets.
pub(super) fn create_token_request(
    req: pb::CreateTokenRequest,
    now: Timestamp,
) -> Result<TokenRequest, DomainError> {
    let mut violations = Violations::new();
    let account_id = violations.check(AccountId::parse("account_id", &req.account_id));
    let name = violations.check(TokenName::parse("name", &req.name));
    let scopes = violations.check(Scopes::parse("scopes", &req.scopes));
    let resources = violations.check(Resources::parse("resources", &req.resources));
    let both = req.expire_time.is_some() && req.ttl.is_some();
    let expire_time = violations.check(parse_timestamp("expire_time", req.expire_time));
    let ttl = violations.check(parse_ttl("ttl", req.ttl, now));
    let expire_time = match (expire_time, ttl) {
        (Some(at), Some(from_ttl)) if !both => Some(at.or(from_ttl)),
        _ => None,
    };
    if both {
        violations.push("ttl", "set expire_time or ttl, not both");
    }
    violations.complete((|| {
        Some(TokenRequest {
            account_id: account_id?,
            name: name?,
            scopes: scopes?,
            resources: resources?,
            expire_time: expire_time?,
            expire_field: if req.ttl.is_some() {
                "ttl"
            } else {
                "expire_time"
            },
            never_expires: req.never_expires,
            max_uses: req.max_uses,
        })
    })())
}

/// Parses `ListTokens`' request, judging states at `now`: the account
/// (`None`, from an empty account_id, for every account's tokens), the
/// filter, then the page (whose token belongs to that listing). Shared by
/// the handler and the fuzz targets.
pub(super) fn list_tokens_request(
    req: &pb::ListTokensRequest,
    now: Timestamp,
) -> Result<(Option<AccountId>, TokenFilter, PageRequest), DomainError> {
    let mut violations = Violations::new();
    let account = if req.account_id.is_empty() {
        Some(None)
    } else {
        violations.check(AccountId::parse("account_id", &req.account_id).map(Some))
    };
    let states = violations.check(parse_token_states("states", &req.states));
    let expire_before = violations.check(parse_timestamp("expire_before", req.expire_before));
    let last_used_before =
        violations.check(parse_timestamp("last_used_before", req.last_used_before));
    let (account, filter) = violations.complete((|| {
        let filter = TokenFilter {
            now,
            states: states?,
            expire_before: expire_before?,
            last_used_before: last_used_before?,
        };
        Some((account?, filter))
    })())?;
    let page = PageRequest::parse(
        &tokens_listing(account.as_ref()),
        req.page_size,
        &req.page_token,
    )?;
    Ok((account, filter, page))
}

/// Parses `ListAuditEvents`' request: the filter (an empty account_id for
/// every account's events; the time range checked), then the page. Shared
/// by the handler and the fuzz targets.
pub(super) fn list_audit_events_request(
    req: &pb::ListAuditEventsRequest,
) -> Result<(AuditFilter, PageRequest), DomainError> {
    let mut violations = Violations::new();
    let account = if req.account_id.is_empty() {
        Some(None)
    } else {
        violations.check(AccountId::parse("account_id", &req.account_id).map(Some))
    };
    let types = violations.check(parse_event_types("types", &req.types));
    let start = violations.check(parse_timestamp("start_time", req.start_time));
    let end = violations.check(parse_timestamp("end_time", req.end_time));
    let filter = (|| {
        let filter = AuditFilter {
            account: account?,
            types: types?,
            ..AuditFilter::default()
        };
        violations.check(filter.with_time_range(("start_time", start?), ("end_time", end?)))
    })();
    let filter = violations.complete(filter)?;
    let page = PageRequest::parse_timed(
        &audit_listing(filter.account.as_ref()),
        req.page_size,
        &req.page_token,
    )?;
    Ok((filter, page))
}

/// Parses an optional lifetime into the instant it ends, counted from
/// `now`: positive, a valid protobuf `Duration`, ending before year 10000.
pub(super) fn parse_ttl(
    field: &str,
    ttl: Option<prost_types::Duration>,
    now: Timestamp,
) -> Result<Option<Timestamp>, DomainError> {
    let Some(ttl) = ttl else {
        return Ok(None);
    };
    let positive = "must be a positive duration, such as \"2592000s\" for 30 days";
    if ttl.seconds < 0 || !(0..1_000_000_000).contains(&ttl.nanos) {
        return Err(DomainError::invalid(field, positive));
    }
    let too_far = || DomainError::invalid(field, "must end before the year 10000");
    let micros = ttl
        .seconds
        .checked_mul(1_000_000)
        .and_then(|m| m.checked_add(i64::from(ttl.nanos / 1_000)))
        .ok_or_else(too_far)?;
    if micros == 0 {
        return Err(DomainError::invalid(field, positive));
    }
    now.as_micros()
        .checked_add(micros)
        .map(Timestamp::from_micros)
        .filter(|end| *end <= Timestamp::MAX)
        .map(Some)
        .ok_or_else(too_far)
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

pub(super) fn parse_account_kind(field: &str, raw: i32) -> Result<AccountKind, DomainError> {
    match pb::AccountKind::try_from(raw) {
        Ok(pb::AccountKind::Person) => Ok(AccountKind::Person),
        Ok(pb::AccountKind::Robot) => Ok(AccountKind::Robot),
        _ => Err(DomainError::invalid(
            field,
            "must be ACCOUNT_KIND_PERSON or ACCOUNT_KIND_ROBOT",
        )),
    }
}

pub(super) fn parse_role(field: &str, raw: i32) -> Result<Role, DomainError> {
    match pb::AccountRole::try_from(raw) {
        Ok(pb::AccountRole::Unspecified | pb::AccountRole::User) => Ok(Role::User),
        Ok(pb::AccountRole::Operator) => Ok(Role::Operator),
        Err(_) => Err(DomainError::invalid(
            field,
            "must be ACCOUNT_ROLE_USER or ACCOUNT_ROLE_OPERATOR",
        )),
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

/// The most entries an enum filter (`ListTokensRequest.states`,
/// `ListAuditEventsRequest.types`) may hold. Each value needs to be named
/// once; the bound keeps a request from asking for thousands of field
/// violations.
pub(super) const MAX_FILTER_VALUES: usize = 32;

/// Refuses an enum filter with more than [`MAX_FILTER_VALUES`] entries.
fn check_filter_len(field: &str, raw: &[i32]) -> Result<(), DomainError> {
    if raw.len() > MAX_FILTER_VALUES {
        return Err(DomainError::invalid(
            field,
            format!("must have at most {MAX_FILTER_VALUES} entries"),
        ));
    }
    Ok(())
}

/// Parses the `states` filter of `ListTokensRequest`.
pub(super) fn parse_token_states(field: &str, raw: &[i32]) -> Result<Vec<TokenState>, DomainError> {
    check_filter_len(field, raw)?;
    let mut violations = Violations::new();
    let states = raw
        .iter()
        .enumerate()
        .filter_map(|(i, &value)| {
            let state = match pb::TokenState::try_from(value) {
                Ok(pb::TokenState::Active) => Ok(TokenState::Active),
                Ok(pb::TokenState::Expired) => Ok(TokenState::Expired),
                Ok(pb::TokenState::Revoked) => Ok(TokenState::Revoked),
                Ok(pb::TokenState::Exhausted) => Ok(TokenState::Exhausted),
                _ => Err(DomainError::invalid(
                    format!("{field}[{i}]"),
                    "is not a token state",
                )),
            };
            violations.check(state)
        })
        .collect();
    violations.complete(Some(states))
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

fn event_type(kind: EventType) -> pb::AuditEventType {
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

/// Parses the `types` filter of `ListAuditEventsRequest`. As the proto
/// says, `AUDIT_EVENT_TYPE_UNSPECIFIED` entries are ignored.
pub(super) fn parse_event_types(field: &str, raw: &[i32]) -> Result<Vec<EventType>, DomainError> {
    check_filter_len(field, raw)?;
    let mut violations = Violations::new();
    let types = raw
        .iter()
        .enumerate()
        .filter(|&(_, &value)| value != pb::AuditEventType::Unspecified as i32)
        .filter_map(|(i, &value)| {
            let found = EventType::ALL
                .into_iter()
                .find(|&t| event_type(t) as i32 == value);
            violations.check(found.ok_or_else(|| {
                DomainError::invalid(format!("{field}[{i}]"), "is not an event type")
            }))
        })
        .collect();
    violations.complete(Some(types))
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
