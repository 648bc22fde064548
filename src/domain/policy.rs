//! Who may do what. Every rule of the service is in [`authorize`]: one match
//! over [`Action`], so a new action cannot compile without a rule, and the
//! rules can be read in one place.
//!
//! The rules: operators may act on every account; everyone else on their own
//! account only. A personal access token is further limited to its scopes and
//! can never sign in or out. A session carries its account's full access.
//! `VerifyToken` may also be asked by a service the transport authenticated
//! ([`Verifier::TrustedService`]), which the wire layer vouches for.

use super::{
    DomainError,
    account::{Account, AccountId, Role},
    credential::CredentialKind,
    scope::{self, Scopes},
    time::Timestamp,
    token::TokenId,
};

/// An authenticated caller: an account and the credential it presented.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The account the credential speaks for. Its password hash is cleared.
    pub account: Account,
    /// Session or personal access token.
    pub credential: CredentialKind,
    /// The session's or token's id.
    pub credential_id: TokenId,
    /// What the credential is limited to (full for sessions).
    pub scopes: Scopes,
    /// When the credential expires, if ever.
    pub expire_time: Option<Timestamp>,
    /// Uses left for a limited-use token (after this use, once admitted).
    pub uses_remaining: Option<i64>,
    /// When the token was last recorded as used, if ever (tokens only).
    pub last_used_time: Option<Timestamp>,
}

impl Principal {
    /// Whether the caller is an operator.
    pub fn is_operator(&self) -> bool {
        self.account.role == Role::Operator
    }

    /// Whether the caller may act on `account`'s resources.
    pub fn owns_or_operates(&self, account: &AccountId) -> bool {
        self.is_operator() || &self.account.id == account
    }
}

/// Something a caller wants to do.
#[derive(Debug, Clone, Copy)]
pub enum Action<'a> {
    /// Create an account.
    CreateAccount,
    /// Read one account.
    ReadAccount(&'a AccountId),
    /// List all accounts.
    ListAccounts,
    /// End the calling session.
    SignOut,
    /// Issue a token for an account.
    CreateToken(&'a AccountId),
    /// Read an account's tokens.
    ReadTokens(&'a AccountId),
    /// Revoke one of an account's tokens.
    RevokeToken(&'a AccountId),
    /// Introspect a credential.
    VerifyToken,
    /// Rotate one of an account's tokens.
    RotateToken(&'a AccountId),
    /// Change the caller's own password.
    ChangePassword,
    /// End every session of an account.
    SignOutEverywhere(&'a AccountId),
    /// Disable or enable an account.
    SuspendAccount(&'a AccountId),
    /// Delete an account.
    DeleteAccount(&'a AccountId),
    /// Read audit events: of one account, or of all (`None`).
    ReadAudit(Option<&'a AccountId>),
}

/// Decides whether `caller` may perform `action`: `Ok(())` or the refusal.
pub fn authorize(caller: &Principal, action: Action<'_>) -> Result<(), DomainError> {
    match action {
        Action::CreateAccount => {
            require_scope(caller, scope::ACCOUNTS_WRITE)?;
            require_operator(caller)
        }
        Action::ReadAccount(target) => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            require_owner(caller, target)
        }
        Action::ListAccounts => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            require_operator(caller)
        }
        Action::SignOut | Action::ChangePassword => require_session(caller),
        Action::CreateToken(target) | Action::RevokeToken(target) | Action::RotateToken(target) => {
            require_scope(caller, scope::TOKENS_WRITE)?;
            require_owner(caller, target)
        }
        Action::ReadTokens(target) => {
            require_scope(caller, scope::TOKENS_READ)?;
            require_owner(caller, target)
        }
        Action::VerifyToken => require_scope(caller, scope::TOKENS_VERIFY),
        // Ending one's own sessions or deleting one's own account is signing
        // out: it takes a session. Doing it to another account is an
        // operator's administrative act.
        Action::SignOutEverywhere(target) | Action::DeleteAccount(target) => {
            if &caller.account.id == target {
                require_session(caller)
            } else {
                require_scope(caller, scope::ACCOUNTS_WRITE)?;
                require_operator(caller)
            }
        }
        Action::SuspendAccount(_) => {
            require_scope(caller, scope::ACCOUNTS_WRITE)?;
            require_operator(caller)
        }
        Action::ReadAudit(target) => {
            require_scope(caller, scope::ACCOUNTS_READ)?;
            match target {
                Some(target) => require_owner(caller, target),
                None => require_operator(caller),
            }
        }
    }
}

/// Who asks `VerifyToken`.
#[derive(Debug, Clone, Copy)]
pub enum Verifier<'a> {
    /// A caller authenticated by its credential, which must carry the
    /// `tokens:verify` scope.
    Caller(&'a Principal),
    /// A service the transport has authenticated (a TLS client certificate
    /// the configuration names as a verifier): it presented no credential,
    /// so no scope applies. Only the wire layer, which checked the
    /// certificate, may vouch for one.
    TrustedService,
}

/// Decides whether `verifier` may ask `VerifyToken`.
pub fn authorize_verifier(verifier: Verifier<'_>) -> Result<(), DomainError> {
    match verifier {
        Verifier::Caller(caller) => authorize(caller, Action::VerifyToken),
        Verifier::TrustedService => Ok(()),
    }
}

/// Whether `caller` may grant a new token `scopes` and `expire_time`: a
/// scoped token cannot widen its scopes, and no token can outlive the
/// credential that created it.
pub fn check_grant(
    caller: &Principal,
    scopes: &Scopes,
    expire_time: Option<Timestamp>,
) -> Result<(), DomainError> {
    if !scopes.is_subset_of(&caller.scopes) {
        return Err(DomainError::Escalation(
            "the new token's scopes must be a subset of the calling token's scopes",
        ));
    }
    if caller.credential == CredentialKind::PersonalAccessToken
        && let Some(limit) = caller.expire_time
        && expire_time.is_none_or(|e| e > limit)
    {
        return Err(DomainError::Escalation(
            "the new token cannot expire later than the calling token",
        ));
    }
    Ok(())
}

fn require_scope(caller: &Principal, scope: &'static str) -> Result<(), DomainError> {
    if caller.scopes.allows(scope) {
        Ok(())
    } else {
        Err(DomainError::ScopeMissing(scope))
    }
}

fn require_session(caller: &Principal) -> Result<(), DomainError> {
    match caller.credential {
        CredentialKind::Session => Ok(()),
        CredentialKind::PersonalAccessToken => Err(DomainError::SessionRequired),
    }
}

fn require_operator(caller: &Principal) -> Result<(), DomainError> {
    if caller.is_operator() {
        Ok(())
    } else {
        Err(DomainError::NotAllowed("only operators may do this"))
    }
}

fn require_owner(caller: &Principal, target: &AccountId) -> Result<(), DomainError> {
    if caller.owns_or_operates(target) {
        Ok(())
    } else {
        Err(DomainError::NotAllowed(
            "only the account itself or an operator may do this",
        ))
    }
}
