//! Personal access tokens and sessions as stored: metadata and a digest,
//! never the secret.

use super::{
    DomainError,
    account::{AccountId, is_invisible, parse_uuid},
    credential::Digest,
    resource::Resources,
    scope::Scopes,
    time::Timestamp,
};

/// A token's or a session's identifier: a UUID (version 7).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(String);

impl TokenId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Parses a client-supplied id, reporting problems against `field`.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        parse_uuid(field, raw).map(Self)
    }

    /// Wraps an id read back from the store.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A token's name: which integration holds it. 1 to 100 characters, no
/// control or invisible characters (see [`is_invisible`]), no leading or
/// trailing white space.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenName(String);

impl TokenName {
    /// The longest name accepted, in characters.
    pub const MAX_CHARS: usize = 100;

    /// Parses a client-supplied name.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() {
            return Err(DomainError::invalid(field, "is required"));
        }
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(DomainError::invalid(
                field,
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if raw.chars().any(|c| c.is_control() || is_invisible(c)) {
            return Err(DomainError::invalid(
                field,
                "must not contain control or invisible characters",
            ));
        }
        if raw.trim() != raw {
            return Err(DomainError::invalid(
                field,
                "must not start or end with white space",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Wraps a name read back from the store.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A token's state at a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// Usable.
    Active,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
    /// Every allowed use has been spent.
    Exhausted,
}

/// A personal access token's metadata.
#[derive(Debug, Clone)]
pub struct Token {
    /// Its identifier.
    pub id: TokenId,
    /// The account it acts for.
    pub account_id: AccountId,
    /// Which integration holds it.
    pub name: TokenName,
    /// What it is limited to; empty for full access.
    pub scopes: Scopes,
    /// The resources it may be used on; empty for every resource of its
    /// account.
    pub resources: Resources,
    /// When it was created.
    pub create_time: Timestamp,
    /// When it stops working, if ever.
    pub expire_time: Option<Timestamp>,
    /// When it was explicitly revoked (`RevokeToken`, a leak report, reuse
    /// detection, a cascade from its parent family or its account's
    /// deletion), if it was. A revocation is effective from the moment it is
    /// recorded, whatever this time says and whatever any clock reads: it
    /// is never compared with the present.
    pub revoke_time: Option<Timestamp>,
    /// When a rotation's grace period ends, for a token rotated out: it
    /// keeps working until then (unless revoked). Unlike `revoke_time`,
    /// a deadline, compared with the clock.
    pub retire_time: Option<Timestamp>,
    /// Its use limit, if it has one.
    pub max_uses: Option<i64>,
    /// Uses left, if it has a limit.
    pub uses_remaining: Option<i64>,
    /// When it was last used successfully, if ever (recorded at most once a
    /// minute).
    pub last_used_time: Option<Timestamp>,
    /// The client address of that use; empty if unknown.
    pub last_used_address: String,
    /// The first token of its rotation family (its own id if never rotated).
    pub family_id: TokenId,
    /// The token that replaced it by rotation, if any.
    pub replaced_by: Option<TokenId>,
    /// The rotation family of the personal access token that created it,
    /// if one did: it is that family's child, and revoking the family's
    /// live token (or the whole family) revokes it too. A successor keeps
    /// its predecessor's parent. `None` for tokens created with a session or
    /// by `bootstrap-operator`, which are no credential's children.
    pub parent_family_id: Option<TokenId>,
}

impl Token {
    /// The token's state at `now`. Revocation (explicit, or the end of a
    /// rotation's grace period) wins over expiry, expiry over exhaustion.
    pub fn state(&self, now: Timestamp) -> TokenState {
        let retired = self.retire_time.is_some_and(|r| r <= now);
        match state_at(now, self.expire_time, self.revoke_time.is_some() || retired) {
            TokenState::Active if self.uses_remaining == Some(0) => TokenState::Exhausted,
            other => other,
        }
    }
}

/// A token to be stored: its metadata and the digest of its secret.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The metadata.
    pub token: Token,
    /// SHA-256 of the secret.
    pub digest: Digest,
    /// The credential creating it, if a caller's: re-checked in the
    /// creating transaction (see [`Creator`]).
    pub creator: Option<Creator>,
}

/// The credential a token is created or rotated with. The store checks,
/// in the transaction that inserts the token and under a lock that the
/// calls ending the credential wait for, that it is still live: a sign-out,
/// revocation, password change or disable acknowledged before the
/// creation commits refuses it ([`crate::domain::store::StorageError::CreatorEnded`]),
/// so no new secret outlives the credential that asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creator {
    /// A sign-in session, and its account's credentials generation when
    /// the session was authenticated.
    Session {
        /// The session.
        id: TokenId,
        /// The generation it was authenticated at.
        credentials_generation: i64,
    },
    /// A personal access token.
    Token {
        /// The token.
        id: TokenId,
    },
}

impl Creator {
    /// The credential `caller` authenticated with.
    pub fn of(caller: &crate::domain::policy::Principal) -> Self {
        let id = caller.credential_id.clone();
        match caller.credential {
            crate::domain::credential::CredentialKind::Session => Self::Session {
                id,
                credentials_generation: caller.account.credentials_generation,
            },
            crate::domain::credential::CredentialKind::PersonalAccessToken => Self::Token { id },
        }
    }
}

/// A sign-in session's metadata.
#[derive(Debug, Clone)]
pub struct Session {
    /// Its identifier.
    pub id: TokenId,
    /// The account that signed in.
    pub account_id: AccountId,
    /// When it started.
    pub create_time: Timestamp,
    /// When it ends by itself.
    pub expire_time: Timestamp,
    /// When it was signed out, if it was: effective from the moment it is
    /// recorded, whatever this time says.
    pub revoke_time: Option<Timestamp>,
}

impl Session {
    /// The session's state at `now`.
    pub fn state(&self, now: Timestamp) -> TokenState {
        state_at(now, Some(self.expire_time), self.revoke_time.is_some())
    }
}

/// A credential's state at `now`: `revoked` is never a question of time (a
/// revocation recorded by a replica whose clock runs ahead holds at once
/// everywhere), expiry is.
fn state_at(now: Timestamp, expire: Option<Timestamp>, revoked: bool) -> TokenState {
    if revoked {
        TokenState::Revoked
    } else if expire.is_some_and(|e| e <= now) {
        TokenState::Expired
    } else {
        TokenState::Active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_names_are_printable_and_trimmed() {
        assert!(TokenName::parse("name", "ci-deploy").is_ok());
        assert!(TokenName::parse("name", "Déploiement nocturne").is_ok());
        for bad in [
            "",
            " lead",
            "trail ",
            "tab\there",
            "ci\u{200d}deploy",
            "\u{202e}yolped-ic",
            "ci\u{2066}",
            &"n".repeat(101),
        ] {
            assert!(TokenName::parse("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn revocation_wins_over_expiry() {
        let t = Timestamp::from_micros;
        assert_eq!(state_at(t(10), Some(t(5)), true), TokenState::Revoked);
        assert_eq!(state_at(t(10), Some(t(10)), false), TokenState::Expired);
        assert_eq!(state_at(t(10), Some(t(11)), false), TokenState::Active);
        assert_eq!(state_at(t(10), None, false), TokenState::Active);
        assert_eq!(state_at(t(10), None, true), TokenState::Revoked);
    }

    #[test]
    fn a_revocation_holds_whatever_time_it_names_and_a_grace_period_ends() {
        let t = Timestamp::from_micros;
        let token = |revoke: Option<i64>, retire: Option<i64>| Token {
            id: TokenId::from_stored("t".into()),
            account_id: AccountId::from_stored("a".into()),
            name: TokenName::from_stored("n".into()),
            scopes: Scopes::full(),
            resources: Resources::all(),
            create_time: t(0),
            expire_time: None,
            revoke_time: revoke.map(t),
            retire_time: retire.map(t),
            max_uses: None,
            uses_remaining: None,
            last_used_time: None,
            last_used_address: String::new(),
            family_id: TokenId::from_stored("t".into()),
            replaced_by: None,
            parent_family_id: None,
        };
        // Recorded by a replica whose clock runs ahead of ours.
        assert_eq!(token(Some(20), None).state(t(10)), TokenState::Revoked);
        assert_eq!(
            token(None, Some(20)).state(t(10)),
            TokenState::Active,
            "in grace"
        );
        assert_eq!(
            token(None, Some(10)).state(t(10)),
            TokenState::Revoked,
            "grace over"
        );
        assert_eq!(token(Some(20), Some(30)).state(t(10)), TokenState::Revoked);
    }
}
