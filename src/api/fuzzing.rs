//! Entry points for the fuzz targets in `fuzz/`; not part of the service's
//! interface (hidden from the docs, used by nothing in the crate).
//!
//! Each function runs, on a decoded request message, the parsing that the
//! message's handler runs before it calls the domain: the same parsers
//! (`convert`'s and the domain's validated types) under the same field
//! names, collected the same way. The handlers parse inline, so these
//! mirror them; a handler that changes how it parses a request changes the
//! function here too. Requests whose handler parses with one call to a
//! public parser (`AccountId::parse`, `TokenId::parse`, `PageRequest::parse`)
//! have no entry here: the fuzz target calls that parser itself.
//!
//! Everything here is pure: no I/O, no clock (callers pass `now`), no
//! authentication, so it cannot be used to skip a check the handlers make.

use super::{convert, pb, pb::get_account_request::Lookup};
use crate::domain::{
    DomainError,
    account::{AccountId, AccountKind, Email, Username},
    audit::{AuditFilter, parse_client_address},
    credential::{self, Malformed, ParsedCredential},
    error::Violations,
    page::{ACCOUNTS_LISTING, PageRequest},
    password::{Password, PasswordPolicy},
    resource::Resources,
    scope::Scopes,
    service::{AccountLookup, MAX_LEAKED_SECRETS, NewAccount, TokenRequest},
    store::TokenFilter,
    time::Timestamp,
};

/// `CreateAccount` (`accounts::parse_new_account`).
pub fn create_account(
    req: pb::CreateAccountRequest,
    policy: &PasswordPolicy,
) -> Result<NewAccount, DomainError> {
    let mut violations = Violations::new();
    let username = violations.check(Username::parse("username", &req.username));
    let email = violations.check(Email::parse("email", &req.email));
    let kind = violations.check(convert::parse_account_kind("kind", req.kind));
    let role = violations.check(convert::parse_role("role", req.role));
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

/// `GetAccount`: the lookup by id or by username.
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

/// `SignIn`: the username's bounds and the offered password. The username is
/// passed on as sent (sign-in looks it up case-insensitively).
pub fn sign_in(req: pb::SignInRequest, policy: &PasswordPolicy) -> Result<Password, DomainError> {
    let mut violations = Violations::new();
    if req.username.is_empty() {
        violations.push("username", "is required");
    } else if req.username.len() > 256 {
        violations.push("username", "must be at most 256 bytes");
    }
    let password = violations.check(Password::offered("password", req.password, policy));
    violations.complete(password)
}

/// `ChangePassword`, for a caller whose username is `caller_username`.
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

/// `CreateToken` at `now`.
pub fn create_token(
    req: pb::CreateTokenRequest,
    now: Timestamp,
) -> Result<TokenRequest, DomainError> {
    convert::create_token_request(req, now)
}

/// `ListTokens`, with states judged at `now`: the account (`None` for
/// every account's tokens), the filter, then the page (whose token belongs
/// to that listing).
pub fn list_tokens(
    req: &pb::ListTokensRequest,
    now: Timestamp,
) -> Result<(Option<AccountId>, TokenFilter, PageRequest), DomainError> {
    convert::list_tokens_request(req, now)
}

/// `VerifyToken`: what `Identity::verify` checks before any lookup (the
/// required scopes and resources and the client address), and the verdict on the token's
/// format (a malformed token is an inactive verdict, not an error).
pub fn verify_token(
    req: &pb::VerifyTokenRequest,
) -> Result<(Scopes, String, Result<ParsedCredential, Malformed>), DomainError> {
    let required = Scopes::parse("required_scopes", &req.required_scopes)?;
    Resources::parse_required("required_resources", &req.required_resources)?;
    let client_address = parse_client_address("client_address", &req.client_address)?;
    Ok((required, client_address, credential::parse(&req.token)))
}

/// `RevokeLeakedToken`: what `Identity::revoke_leaked` checks before its one
/// write: the number of secrets, and which of them are credentials at all
/// (the others are ignored, so the answer says nothing about them).
pub fn revoke_leaked_token(
    req: &pb::RevokeLeakedTokenRequest,
) -> Result<Vec<ParsedCredential>, DomainError> {
    if req.secrets.is_empty() || req.secrets.len() > MAX_LEAKED_SECRETS {
        return Err(DomainError::invalid(
            "secrets",
            format!("must hold 1 to {MAX_LEAKED_SECRETS} credentials"),
        ));
    }
    Ok(req
        .secrets
        .iter()
        .filter_map(|s| credential::parse(s).ok())
        .collect())
}

/// `ListAuditEvents`: the filter (the account, empty for every account,
/// the event types and the time range), then the page.
pub fn list_audit_events(
    req: &pb::ListAuditEventsRequest,
) -> Result<(AuditFilter, PageRequest), DomainError> {
    convert::list_audit_events_request(req)
}
