//! One parser per request message: what each handler does to its request
//! before it calls the domain, and what the fuzz targets in `fuzz/` call
//! too. Each turns a decoded message into validated domain values, or into
//! `DomainError::InvalidArgument` naming the message's own fields (all bad
//! fields at once where they are independent), so the status mapping can
//! list them.
//!
//! Everything here is pure: no I/O, no clock (callers pass `now`), no
//! authentication, so calling it cannot skip a check the handlers make.
//! Requests that carry no field (`SignOut`, `GetCaller`) have no parser.

use super::{
    convert,
    pb::{self, get_account_request::Lookup},
};
use crate::domain::{
    DomainError,
    account::{AccountId, AccountKind, Email, Role, Username},
    audit::{AuditFilter, EventType, Origin, parse_client_address},
    credential::{self, LeakedCredentials, Malformed, ParsedCredential},
    error::Violations,
    page::{ACCOUNTS_LISTING, PageRequest, tokens_listing},
    password::{Password, PasswordPolicy},
    resource::Resources,
    scope::Scopes,
    service::{AccountLookup, NewAccount, TokenRequest, audit_listing},
    store::TokenFilter,
    time::Timestamp,
    token::{TokenId, TokenName, TokenState},
};

/// `CreateAccount`: every field, all bad fields reported at once. A
/// person's password is checked against `policy` (and its username).
pub fn create_account(
    req: pb::CreateAccountRequest,
    policy: &PasswordPolicy,
) -> Result<NewAccount, DomainError> {
    let mut violations = Violations::new();
    let username = violations.check(Username::parse("username", &req.username));
    let email = violations.check(Email::parse("email", &req.email));
    let kind = violations.check(parse_account_kind("kind", req.kind));
    let role = violations.check(parse_role("role", req.role));
    let password = match kind {
        Some(AccountKind::Robot) if !req.password.is_empty() => {
            violations.push(
                "password",
                "must be empty for robot accounts, which never sign in",
            );
            None
        }
        Some(AccountKind::Robot) | None => None,
        Some(AccountKind::Person) => violations.check(Password::new_checked(
            "password",
            req.password,
            policy,
            &req.username,
        )),
    };
    violations.complete((|| {
        Some(NewAccount {
            username: username?,
            password,
            email: email?,
            kind: kind?,
            role: role?,
        })
    })())
}

/// `GetAccount`: the lookup, by id or by username.
pub fn get_account(req: pb::GetAccountRequest) -> Result<AccountLookup, DomainError> {
    match req.lookup {
        Some(Lookup::AccountId(id)) => AccountId::parse("account_id", &id).map(AccountLookup::Id),
        Some(Lookup::Username(name)) => {
            Username::parse("username", &name).map(AccountLookup::Username)
        }
        None => Err(DomainError::invalid("lookup", "set account_id or username")),
    }
}

/// `ListAccounts`: the page.
pub fn list_accounts(req: &pb::ListAccountsRequest) -> Result<PageRequest, DomainError> {
    PageRequest::parse(ACCOUNTS_LISTING, req.page_size, &req.page_token)
}

/// `SignIn`: the username and the offered password. A name that breaks the
/// username rules belongs to no account; saying so reveals nothing about
/// which accounts exist.
pub fn sign_in(
    req: pb::SignInRequest,
    policy: &PasswordPolicy,
) -> Result<(Username, Password), DomainError> {
    let mut violations = Violations::new();
    let username = violations.check(Username::parse("username", &req.username));
    let password = violations.check(Password::offered("password", req.password, policy));
    violations.complete(username.zip(password))
}

/// `ChangePassword`, for a caller whose username is `caller_username`: the
/// current password as offered, and the new one checked against `policy`.
pub fn change_password(
    req: pb::ChangePasswordRequest,
    policy: &PasswordPolicy,
    caller_username: &str,
) -> Result<(Password, Password), DomainError> {
    let mut violations = Violations::new();
    let current = violations.check(Password::offered(
        "current_password",
        req.current_password,
        policy,
    ));
    let new = violations.check(Password::new_checked(
        "new_password",
        req.new_password,
        policy,
        caller_username,
    ));
    violations.complete(current.zip(new))
}

/// `SignOutEverywhere`: the account.
pub fn sign_out_everywhere(req: &pb::SignOutEverywhereRequest) -> Result<AccountId, DomainError> {
    AccountId::parse("account_id", &req.account_id)
}

/// `DisableAccount`: the account.
pub fn disable_account(req: &pb::DisableAccountRequest) -> Result<AccountId, DomainError> {
    AccountId::parse("account_id", &req.account_id)
}

/// `EnableAccount`: the account.
pub fn enable_account(req: &pb::EnableAccountRequest) -> Result<AccountId, DomainError> {
    AccountId::parse("account_id", &req.account_id)
}

/// `DeleteAccount`: the account.
pub fn delete_account(req: &pb::DeleteAccountRequest) -> Result<AccountId, DomainError> {
    AccountId::parse("account_id", &req.account_id)
}

/// `ListAuditEvents`: the filter (an empty account_id for every account's
/// events; the time range checked), then the page.
pub fn list_audit_events(
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

/// `CreateToken` at `now`: `ttl` becomes an expiry `now` plus the
/// duration.
pub fn create_token(
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

/// `GetToken`: the token.
pub fn get_token(req: &pb::GetTokenRequest) -> Result<TokenId, DomainError> {
    TokenId::parse("token_id", &req.token_id)
}

/// `ListTokens`, judging states at `now`: the account (`None`, from an
/// empty account_id, for every account's tokens), the filter, then the page
/// (whose token belongs to that listing).
pub fn list_tokens(
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

/// `RevokeToken`: the token.
pub fn revoke_token(req: &pb::RevokeTokenRequest) -> Result<TokenId, DomainError> {
    TokenId::parse("token_id", &req.token_id)
}

/// `VerifyToken`: the verdict on the token's format (a malformed token is an
/// inactive answer, not an error), the required scopes and the client
/// address the use is recorded from (both checked, and reported together).
pub fn verify_token(req: &pb::VerifyTokenRequest) -> Result<VerifyQuery, DomainError> {
    let mut violations = Violations::new();
    let scopes = violations.check(Scopes::parse("required_scopes", &req.required_scopes));
    let resources = violations.check(Resources::parse_required(
        "required_resources",
        &req.required_resources,
    ));
    let client = violations.check(parse_client_address("client_address", &req.client_address));
    let ((scopes, resources), client) = violations.complete(scopes.zip(resources).zip(client))?;
    Ok(VerifyQuery {
        credential: credential::parse(&req.token),
        scopes,
        resources,
        client: Origin::new(client),
    })
}

/// A `VerifyToken` request, parsed: the credential (a malformed one is an
/// inactive answer, not an error), what it must allow, and who presented
/// it.
#[derive(Debug)]
pub struct VerifyQuery {
    /// The presented credential, parsed without I/O.
    pub credential: Result<ParsedCredential, Malformed>,
    /// The scopes it must carry.
    pub scopes: Scopes,
    /// The resources it must allow (names, never patterns).
    pub resources: Resources,
    /// The client that presented it to the calling service.
    pub client: Origin,
}

/// `RotateToken`: the token.
pub fn rotate_token(req: &pb::RotateTokenRequest) -> Result<TokenId, DomainError> {
    TokenId::parse("token_id", &req.token_id)
}

/// `RenewToken`: the token, its new expiry (`None` when unset) and whether
/// it is to never expire.
pub fn renew_token(
    req: &pb::RenewTokenRequest,
) -> Result<(TokenId, Option<Timestamp>, bool), DomainError> {
    let mut violations = Violations::new();
    let id = violations.check(TokenId::parse("token_id", &req.token_id));
    let expire_time = violations.check(parse_timestamp("expire_time", req.expire_time));
    let (id, expire_time) = violations.complete((|| Some((id?, expire_time?)))())?;
    Ok((id, expire_time, req.never_expires))
}

/// `RevokeLeakedToken`: the reported secrets, of which only the credentials
/// count (the others are ignored, so the answer says nothing about them).
pub fn revoke_leaked_token(
    req: &pb::RevokeLeakedTokenRequest,
) -> Result<LeakedCredentials, DomainError> {
    LeakedCredentials::parse("secrets", &req.secrets)
}

/// Parses an optional client timestamp; out-of-range values are invalid.
fn parse_timestamp(
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

/// Parses an optional lifetime into the instant it ends, counted from
/// `now`: positive, a valid protobuf `Duration`, ending before year 10000.
fn parse_ttl(
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

fn parse_account_kind(field: &str, raw: i32) -> Result<AccountKind, DomainError> {
    match pb::AccountKind::try_from(raw) {
        Ok(pb::AccountKind::Person) => Ok(AccountKind::Person),
        Ok(pb::AccountKind::Robot) => Ok(AccountKind::Robot),
        _ => Err(DomainError::invalid(
            field,
            "must be ACCOUNT_KIND_PERSON or ACCOUNT_KIND_ROBOT",
        )),
    }
}

fn parse_role(field: &str, raw: i32) -> Result<Role, DomainError> {
    match pb::AccountRole::try_from(raw) {
        Ok(pb::AccountRole::Unspecified | pb::AccountRole::User) => Ok(Role::User),
        Ok(pb::AccountRole::Operator) => Ok(Role::Operator),
        Err(_) => Err(DomainError::invalid(
            field,
            "must be ACCOUNT_ROLE_USER or ACCOUNT_ROLE_OPERATOR",
        )),
    }
}

/// The most entries an enum filter (`ListTokensRequest.states`,
/// `ListAuditEventsRequest.types`) may hold. Each value needs to be named
/// once; the bound keeps a request from asking for thousands of field
/// violations.
const MAX_FILTER_VALUES: usize = 32;

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
fn parse_token_states(field: &str, raw: &[i32]) -> Result<Vec<TokenState>, DomainError> {
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

/// Parses the `types` filter of `ListAuditEventsRequest`. As the proto
/// says, `AUDIT_EVENT_TYPE_UNSPECIFIED` entries are ignored.
fn parse_event_types(field: &str, raw: &[i32]) -> Result<Vec<EventType>, DomainError> {
    check_filter_len(field, raw)?;
    let mut violations = Violations::new();
    let types = raw
        .iter()
        .enumerate()
        .filter(|&(_, &value)| value != pb::AuditEventType::Unspecified as i32)
        .filter_map(|(i, &value)| {
            let found = EventType::ALL
                .into_iter()
                .find(|&t| convert::event_type(t) as i32 == value);
            violations.check(found.ok_or_else(|| {
                DomainError::invalid(format!("{field}[{i}]"), "is not an event type")
            }))
        })
        .collect();
    violations.complete(Some(types))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::credential::{CredentialKind, Secret};

    /// The fields an `InvalidArgument` names, in order.
    fn fields(err: DomainError) -> Vec<String> {
        match err {
            DomainError::InvalidArgument(violations) => {
                violations.into_iter().map(|v| v.field).collect()
            }
            other => panic!("not InvalidArgument: {other:?}"),
        }
    }

    #[test]
    fn verify_token_reports_its_scopes_and_address_together() {
        let req = pb::VerifyTokenRequest {
            token: "x".to_owned(),
            required_scopes: vec!["Not A Scope".to_owned()],
            required_resources: vec![],
            client_address: "10.0.0.1, 10.0.0.2".to_owned(),
        };
        let err = verify_token(&req).expect_err("both are bad");
        assert_eq!(fields(err), ["required_scopes[0]", "client_address"]);
    }

    #[test]
    fn verify_token_leaves_a_malformed_token_to_the_verdict() {
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let req = pb::VerifyTokenRequest {
            token: secret.expose().to_owned(),
            required_scopes: vec!["project:read".to_owned()],
            required_resources: vec![],
            client_address: "[2001:db8::1]:443".to_owned(),
        };
        let query = verify_token(&req).expect("valid");
        assert_eq!(
            query.credential.expect("well-formed").digest,
            secret.digest()
        );
        assert_eq!(query.scopes.names().collect::<Vec<_>>(), ["project:read"]);
        assert_eq!(query.client.address, "[2001:db8::1]:443");
        let malformed = pb::VerifyTokenRequest {
            token: "garbage".to_owned(),
            ..pb::VerifyTokenRequest::default()
        };
        let query = verify_token(&malformed).expect("an answer, not an error");
        assert_eq!(query.credential, Err(Malformed));
        assert_eq!(query.client, Origin::default());
    }

    #[test]
    fn renew_token_reports_every_bad_field() {
        let req = pb::RenewTokenRequest {
            token_id: "nope".to_owned(),
            expire_time: Some(prost_types::Timestamp {
                seconds: i64::MAX,
                nanos: 0,
            }),
            never_expires: false,
        };
        assert_eq!(
            fields(renew_token(&req).expect_err("bad")),
            ["token_id", "expire_time"]
        );
    }
}
