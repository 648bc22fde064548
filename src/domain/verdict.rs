//! Verdicts on credentials: whether one is active, and if not, why. The
//! cache stores them, the hot path returns them, and the wire layer maps
//! them to `VerifyToken`'s answer.

use std::sync::Arc;

use crate::domain::policy::Principal;

/// Why a credential is not active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InactiveReason {
    /// Not a credential this service issues.
    Malformed,
    /// Well-formed but unknown.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked or signed out.
    Revoked,
    /// Its account is disabled.
    AccountDisabled,
    /// Lacks a required scope.
    InsufficientScope,
    /// A limited-use token with no uses left.
    Exhausted,
    /// Not allowed on a required resource.
    ResourceNotAllowed,
}

impl InactiveReason {
    /// Every reason, in [`Self::index`] order.
    pub const ALL: [Self; 8] = [
        Self::Malformed,
        Self::Unknown,
        Self::Expired,
        Self::Revoked,
        Self::AccountDisabled,
        Self::InsufficientScope,
        Self::Exhausted,
        Self::ResourceNotAllowed,
    ];

    /// The reason's position in [`Self::ALL`] (a new reason must be added
    /// to both; a unit test checks they agree).
    pub(crate) fn index(self) -> usize {
        match self {
            Self::Malformed => 0,
            Self::Unknown => 1,
            Self::Expired => 2,
            Self::Revoked => 3,
            Self::AccountDisabled => 4,
            Self::InsufficientScope => 5,
            Self::Exhausted => 6,
            Self::ResourceNotAllowed => 7,
        }
    }

    /// The reason as a metric label (`snake_case`, a closed set).
    pub fn label(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::Unknown => "unknown",
            Self::Expired => "expired",
            Self::Revoked => "revoked",
            Self::AccountDisabled => "account_disabled",
            Self::InsufficientScope => "insufficient_scope",
            Self::Exhausted => "exhausted",
            Self::ResourceNotAllowed => "resource_not_allowed",
        }
    }

    /// A short phrase for error messages.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Malformed => "malformed credential",
            Self::Unknown => "unknown credential",
            Self::Expired => "expired credential",
            Self::Revoked => "revoked credential",
            Self::AccountDisabled => "the credential's account is disabled",
            Self::InsufficientScope => "the credential lacks a required scope",
            Self::Exhausted => "the credential has no uses left",
            Self::ResourceNotAllowed => "the credential is not allowed on a required resource",
        }
    }
}

/// The verdict on a credential.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Valid: who it speaks for.
    Active(Arc<Principal>),
    /// Not valid, and why.
    Inactive(InactiveReason),
}

/// `VerifyToken`'s answer: the verdict, and for a valid credential refused
/// for what a request required of it, what was missing.
#[derive(Debug, Clone)]
pub enum Verification {
    /// Valid and carrying every required scope: who it speaks for.
    Active(Arc<Principal>),
    /// Not valid, and why (never [`InactiveReason::InsufficientScope`] or
    /// [`InactiveReason::ResourceNotAllowed`]: see [`Self::MissingScopes`]
    /// and [`Self::MissingResources`]).
    Inactive(InactiveReason),
    /// Valid, but without these of the required scopes (sorted, without
    /// duplicates; never empty): the reason
    /// [`InactiveReason::InsufficientScope`]. Only names the request gave,
    /// never the credential's own scopes.
    MissingScopes(Vec<String>),
    /// Valid and carrying every required scope, but not allowed on these of
    /// the required resources (sorted, without duplicates; never empty):
    /// the reason [`InactiveReason::ResourceNotAllowed`]. Only names the
    /// request gave, never the credential's own resources.
    MissingResources(Vec<String>),
}

impl Verification {
    /// The reason the credential is refused; `None` when it is active.
    pub fn reason(&self) -> Option<InactiveReason> {
        match self {
            Self::Active(_) => None,
            Self::Inactive(reason) => Some(*reason),
            Self::MissingScopes(_) => Some(InactiveReason::InsufficientScope),
            Self::MissingResources(_) => Some(InactiveReason::ResourceNotAllowed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::InactiveReason;

    #[test]
    fn every_inactive_reason_has_its_own_counter_and_label() {
        for (i, reason) in InactiveReason::ALL.iter().enumerate() {
            assert_eq!(reason.index(), i, "{reason:?}");
        }
        let mut labels: Vec<_> = InactiveReason::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), InactiveReason::ALL.len());
        assert!(!labels.contains(&"active"));
    }
}
