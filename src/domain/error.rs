//! The domain's one error type. Every variant is something a caller can act
//! on, except `Internal`, whose cause is logged and never shown to a client.
//! Messages never contain a secret.

use crate::domain::store::StorageError;

/// Why a use case failed.
#[derive(Debug, thiserror::Error)]
pub enum DomainError {
    /// One or more request fields are invalid.
    #[error("invalid argument: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),
    /// The call carried no `authorization: Bearer` credential.
    #[error("missing credential: send `authorization: Bearer <token>`")]
    CredentialMissing,
    /// The credential is malformed, unknown, expired or revoked, or its
    /// account is disabled.
    #[error("invalid credential: {0}")]
    CredentialInvalid(&'static str),
    /// Sign-in with an unknown username or a wrong password (deliberately
    /// indistinguishable).
    #[error("unknown username or wrong password")]
    SignInFailed,
    /// The caller's account may not perform this action.
    #[error("not allowed: {0}")]
    NotAllowed(&'static str),
    /// The caller's token lacks the scope the action needs.
    #[error("the credential lacks the `{0}` scope")]
    ScopeMissing(&'static str),
    /// Personal access tokens may not sign in or out.
    #[error("personal access tokens cannot sign in or out; use a session")]
    SessionRequired,
    /// A scoped token asked for more than it has.
    #[error("a token cannot grant more than it has: {0}")]
    Escalation(&'static str),
    /// No such account (or none visible to the caller).
    #[error("account not found")]
    AccountNotFound,
    /// No such token (or none visible to the caller).
    #[error("token not found")]
    TokenNotFound,
    /// The username is taken, compared case-insensitively.
    #[error("username is already taken")]
    UsernameTaken,
    /// The account already has a live token with this name.
    #[error("the account already has a live token with this name")]
    TokenNameTaken,
    /// Too many requests from this source; retry after the given delay.
    #[error("too many requests; retry in {} s", .0.as_secs().max(1))]
    RateLimited(std::time::Duration),
    /// Too many failed sign-ins for the username or from the client
    /// address; retry after the given delay. Said alike whether or not the
    /// username exists.
    #[error("too many failed sign-ins; retry in {} s", .0.as_secs().max(1))]
    SignInThrottled(std::time::Duration),
    /// Too many consecutive failed sign-ins for the username: password
    /// sign-in is off until an operator enables the account. Said alike
    /// whether or not the username exists.
    #[error(
        "too many failed sign-ins: password sign-in is locked until an operator enables the account"
    )]
    SignInLocked,
    /// The account already has the most live tokens allowed
    /// (`IDENTITY_MAX_TOKENS_PER_ACCOUNT`, the number given).
    #[error(
        "the account already has {0} live tokens, the most allowed: revoke tokens it no longer uses (or let them expire), then create again"
    )]
    TokenLimitReached(u32),
    /// Too many tokens were created for the account on this replica in the
    /// last minute (`IDENTITY_TOKEN_CREATIONS_PER_MINUTE`); retry after the
    /// given delay.
    #[error(
        "too many tokens created for this account in the last minute; retry in {} s",
        .0.as_secs().max(1)
    )]
    TokenCreationRateLimited(std::time::Duration),
    /// An already-rotated token was presented to rotate again: its family is
    /// now revoked.
    #[error(
        "this token was already rotated; presenting it again revoked every token of its family"
    )]
    CredentialReused,
    /// The token was already rotated.
    #[error("the token was already rotated; rotate its successor")]
    TokenAlreadyRotated,
    /// The token cannot be rotated or renewed in its state.
    #[error("the token is {0}: only an active token can be rotated or renewed")]
    TokenInactive(&'static str),
    /// An operator tried to disable or delete their own account.
    #[error("operators cannot disable or delete their own account")]
    SelfLockout,
    /// The token's lifetime breaks the server's policy.
    #[error("token lifetime: {}: {}", .0.field, .0.description)]
    TokenLifetime(FieldViolation),
    /// This replica's password hashing queue is full: retry after the
    /// given delay, or on another replica.
    #[error(
        "too many password checks are waiting on this server; retry in {} s or try another replica",
        .0.as_secs().max(1)
    )]
    HashingBusy(std::time::Duration),
    /// The database cannot be reached right now.
    #[error("the store is unavailable")]
    Unavailable(#[source] StorageError),
    /// Anything unexpected. The source is for the log only.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// One invalid request field, in the shape of `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The field's path in the request, such as `scopes[2]`.
    pub field: String,
    /// What is wrong with it, in a sentence that never repeats a secret.
    pub description: String,
}

impl FieldViolation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

impl DomainError {
    /// An `InvalidArgument` error for a single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }
}

impl From<StorageError> for DomainError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::Unavailable(_) => Self::Unavailable(err),
            StorageError::Conflict(crate::domain::store::Conflict::Username) => Self::UsernameTaken,
            StorageError::Conflict(crate::domain::store::Conflict::TokenName) => {
                Self::TokenNameTaken
            }
            StorageError::AccountGone => Self::AccountNotFound,
            StorageError::TooManyTokens(max) => Self::TokenLimitReached(max),
            StorageError::ParentRevoked | StorageError::CreatorEnded => {
                Self::CredentialInvalid(super::service::InactiveReason::Revoked.describe())
            }
            other => Self::Internal(Box::new(other)),
        }
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Collects field violations while a request is parsed, so that a client
/// learns about every bad field at once.
#[derive(Debug, Default)]
pub struct Violations(Vec<FieldViolation>);

impl Violations {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `result`'s value, or records its violations and returns `None`.
    pub fn check<T>(&mut self, result: Result<T, DomainError>) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(DomainError::InvalidArgument(mut found)) => {
                self.0.append(&mut found);
                None
            }
            Err(other) => {
                // Parsers only return InvalidArgument; anything else is a bug
                // worth surfacing rather than hiding as a field error.
                self.0.push(FieldViolation::new("", other.to_string()));
                None
            }
        }
    }

    /// Records a violation directly.
    pub fn push(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(FieldViolation::new(field, description));
    }

    /// `value` if nothing was recorded, the collected error otherwise.
    /// `value` is built from the `check`ed results, so it is `Some` exactly
    /// when no violation was recorded.
    pub fn complete<T>(self, value: Option<T>) -> Result<T, DomainError> {
        self.finish()?;
        value.ok_or_else(|| {
            DomainError::Internal("a parser returned neither a value nor a violation".into())
        })
    }

    /// `Ok(())` if nothing was recorded, the collected error otherwise.
    pub fn finish(self) -> Result<(), DomainError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DomainError::InvalidArgument(self.0))
        }
    }
}
