//! The audit log's vocabulary: what happened, who did it, to whom, from
//! where, and whether it worked. Events are built here and written by the
//! store in the same transaction as the change they record. They hold ids,
//! usernames and addresses, never a secret.

use super::{account::AccountId, policy::Principal, time::Timestamp, token::TokenId};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    /// An account was created.
    AccountCreated,
    /// An account was disabled.
    AccountDisabled,
    /// An account was enabled.
    AccountEnabled,
    /// An account was deleted.
    AccountDeleted,
    /// A sign-in succeeded or failed.
    SignIn,
    /// A session was signed out.
    SignedOut,
    /// Every session of an account was ended.
    SignedOutEverywhere,
    /// A password was changed, or a change was refused.
    PasswordChanged,
    /// A token was created.
    TokenCreated,
    /// A token was rotated.
    TokenRotated,
    /// A token was revoked.
    TokenRevoked,
    /// A live credential was reported leaked and revoked.
    TokenLeaked,
    /// A rotated token was presented again and its family revoked.
    TokenReuseDetected,
    /// Sign-ins for a username or from an address began to be refused
    /// without a password check (backoff or lock); recorded once per block.
    SignInThrottled,
    /// A token was given a new lifetime.
    TokenRenewed,
}

impl EventType {
    /// Every type, in the order of the proto enum.
    pub const ALL: [EventType; 15] = [
        Self::AccountCreated,
        Self::AccountDisabled,
        Self::AccountEnabled,
        Self::AccountDeleted,
        Self::SignIn,
        Self::SignedOut,
        Self::SignedOutEverywhere,
        Self::PasswordChanged,
        Self::TokenCreated,
        Self::TokenRotated,
        Self::TokenRevoked,
        Self::TokenLeaked,
        Self::TokenReuseDetected,
        Self::SignInThrottled,
        Self::TokenRenewed,
    ];

    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccountCreated => "account.created",
            Self::AccountDisabled => "account.disabled",
            Self::AccountEnabled => "account.enabled",
            Self::AccountDeleted => "account.deleted",
            Self::SignIn => "session.sign_in",
            Self::SignedOut => "session.signed_out",
            Self::SignedOutEverywhere => "session.signed_out_everywhere",
            Self::PasswordChanged => "account.password_changed",
            Self::TokenCreated => "token.created",
            Self::TokenRotated => "token.rotated",
            Self::TokenRevoked => "token.revoked",
            Self::TokenLeaked => "token.leaked",
            Self::TokenReuseDetected => "token.reuse_detected",
            Self::SignInThrottled => "session.sign_in_throttled",
            Self::TokenRenewed => "token.renewed",
        }
    }

    /// Parses the stored spelling.
    pub fn from_stored(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == raw)
    }
}

/// Whether the action took effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It did.
    Success,
    /// It was attempted and refused.
    Failure,
}

impl Outcome {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failure => "failure",
        }
    }

    /// Parses the stored spelling.
    pub fn from_stored(raw: &str) -> Option<Self> {
        match raw {
            "success" => Some(Self::Success),
            "failure" => Some(Self::Failure),
            _ => None,
        }
    }
}

/// Where a request came from, as the wire layer saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origin {
    /// The peer's network address; empty when unknown.
    pub address: String,
}

impl Origin {
    /// An origin with a known address.
    pub fn new(address: impl Into<String>) -> Self {
        Self {
            address: address.into(),
        }
    }
}

/// One security event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// A time-ordered UUID.
    pub id: String,
    /// When it happened.
    pub time: Timestamp,
    /// What happened.
    pub kind: EventType,
    /// Whether it worked.
    pub outcome: Outcome,
    /// The account that acted, if authenticated.
    pub actor_account: Option<AccountId>,
    /// The credential the actor used, if authenticated.
    pub actor_credential: Option<TokenId>,
    /// The account acted upon, if known.
    pub subject_account: Option<AccountId>,
    /// The credential acted upon, if any.
    pub subject_credential: Option<TokenId>,
    /// The subject account's username at the time; empty if unknown.
    pub subject_username: String,
    /// The request's source address; empty if unknown.
    pub source_address: String,
}

impl AuditEvent {
    /// A successful event of `kind` by `actor` (anonymous when `None`) from
    /// `origin` at `time`, with no subject yet.
    pub fn new(
        kind: EventType,
        origin: &Origin,
        actor: Option<&Principal>,
        time: Timestamp,
    ) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            time,
            kind,
            outcome: Outcome::Success,
            actor_account: actor.map(|p| p.account.id.clone()),
            actor_credential: actor.map(|p| p.credential_id.clone()),
            subject_account: None,
            subject_credential: None,
            subject_username: String::new(),
            source_address: origin.address.clone(),
        }
    }

    /// Names the subject account.
    #[must_use]
    pub fn account(mut self, id: &AccountId, username: &str) -> Self {
        self.subject_account = Some(id.clone());
        self.subject_username = username.to_owned();
        self
    }

    /// Names the subject credential.
    #[must_use]
    pub fn credential(mut self, id: &TokenId) -> Self {
        self.subject_credential = Some(id.clone());
        self
    }

    /// Marks the event as a refused attempt.
    #[must_use]
    pub fn failed(mut self) -> Self {
        self.outcome = Outcome::Failure;
        self
    }

    /// A copy with a fresh id, for one of several subjects of one action.
    #[must_use]
    pub fn another(&self) -> Self {
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            ..self.clone()
        }
    }
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only events whose actor or subject is this account.
    pub account: Option<AccountId>,
    /// Only events of these types; empty for all.
    pub types: Vec<EventType>,
    /// Only events at or after this instant (inclusive).
    pub start_time: Option<Timestamp>,
    /// Only events before this instant (exclusive).
    pub end_time: Option<Timestamp>,
}

impl AuditFilter {
    /// Sets the time range `[start, end)`, refusing an end before its start
    /// (an end equal to the start is an empty range, not an error) with a
    /// violation on each field, naming the other.
    pub fn with_time_range(
        mut self,
        (start_field, start): (&str, Option<Timestamp>),
        (end_field, end): (&str, Option<Timestamp>),
    ) -> Result<Self, super::DomainError> {
        if let (Some(start), Some(end)) = (start, end)
            && end < start
        {
            return Err(super::DomainError::InvalidArgument(vec![
                super::FieldViolation::new(start_field, format!("must not be after {end_field}")),
                super::FieldViolation::new(end_field, format!("must not be before {start_field}")),
            ]));
        }
        self.start_time = start;
        self.end_time = end;
        Ok(self)
    }

    /// The types as the store matches them: `,a,b,` or empty for all.
    pub fn types_pattern(&self) -> String {
        if self.types.is_empty() {
            String::new()
        } else {
            let names: Vec<_> = self.types.iter().map(|t| t.as_str()).collect();
            format!(",{},", names.join(","))
        }
    }
}

/// Checks a client address reported by a calling service: empty, or one IP
/// address with or without a port. Returns it as given.
///
/// A list (an `X-Forwarded-For` header passed on as it came) is refused
/// with a message of its own, not guessed at: its left-most entries are
/// whatever the client wrote, and which of its hops the calling service's
/// own proxies added only that service knows.
pub fn parse_client_address(field: &str, raw: &str) -> Result<String, super::DomainError> {
    use std::net::{IpAddr, SocketAddr};
    if raw.is_empty() || raw.parse::<IpAddr>().is_ok() || raw.parse::<SocketAddr>().is_ok() {
        Ok(raw.to_owned())
    } else if raw.contains(',') {
        Err(super::DomainError::invalid(
            field,
            "takes one IP address, not a list: pass the address your service trusts (its \
             TCP peer, or the right-most X-Forwarded-For entry that none of your own proxies \
             added), not the header",
        ))
    } else {
        Err(super::DomainError::invalid(
            field,
            "must be one IP address, optionally with a port",
        ))
    }
}
