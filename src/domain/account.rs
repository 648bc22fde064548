//! Accounts: who they are (a person or a robot), what they may do (user or
//! operator), and the validated values that describe them.

use std::fmt;

use super::{DomainError, password::PasswordHash, time::Timestamp};

/// An account's identifier: a UUID (version 7, so ids sort by creation time),
/// in its canonical lowercase hyphenated form.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountId(String);

impl AccountId {
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

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a UUID in any form `uuid` accepts and returns its canonical text.
pub(crate) fn parse_uuid(field: &str, raw: &str) -> Result<String, DomainError> {
    if raw.is_empty() {
        return Err(DomainError::invalid(field, "is required"));
    }
    uuid::Uuid::try_parse(raw)
        .map(|id| id.to_string())
        .map_err(|_| DomainError::invalid(field, "must be a UUID"))
}

/// A username: 1 to 39 ASCII letters, digits, `.`, `_` or `-`, starting with
/// a letter or digit; uniqueness is case-insensitive.
///
/// The rule that makes two visually identical usernames impossible: only
/// this ASCII set is accepted, so there is nothing to normalise. Fullwidth
/// forms, Cyrillic or Greek lookalikes, accented letters in either Unicode
/// normalisation form (NFC `é` or NFD `e` + U+0301), the Kelvin sign, zero-
/// width joiners, right-to-left overrides and every other non-ASCII
/// character are refused rather than folded, and ASCII case is folded for
/// uniqueness, so `Alice` and `alice` are one account. Distinct ASCII
/// characters that some fonts draw alike (`l`, `I` and `1`; `O` and `0`;
/// `rn` and `m`) remain distinct names, as on most platforms.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Username(String);

impl Username {
    /// The longest username accepted.
    pub const MAX_LEN: usize = 39;

    /// Parses a client-supplied username.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() {
            return Err(DomainError::invalid(field, "is required"));
        }
        if raw.len() > Self::MAX_LEN {
            return Err(DomainError::invalid(
                field,
                format!("must be at most {} characters", Self::MAX_LEN),
            ));
        }
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !raw.chars().all(valid_char) {
            return Err(DomainError::invalid(
                field,
                "may contain only ASCII letters, digits, '.', '_' and '-'",
            ));
        }
        if !raw.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(DomainError::invalid(
                field,
                "must start with a letter or a digit",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// Wraps a username read back from the store.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The username as created.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The form compared for uniqueness: ASCII lowercase.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }
}

/// Whether `c` is invisible or changes the direction of the text around it:
/// zero-width characters and joiners, bidirectional controls (U+202A..U+202E,
/// U+2066..U+2069), the byte-order mark, tag characters and other
/// default-ignorable code points (variation selectors are allowed, for
/// emoji). Free text shown to people (token names, emails) refuses them, so
/// that two strings that print the same cannot differ by one.
pub(crate) fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'..='\u{1160}'
            | '\u{17B4}'..='\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF0}'..='\u{FFFB}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E0FFF}'
    )
}

/// An optional contact address. Checked loosely (one `@`, something on both
/// sides, no spaces, control or invisible characters, at most 254
/// characters): the only real check of an address is mail that arrives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Email(String);

impl Email {
    /// Parses a client-supplied address; empty means none.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() {
            return Ok(Self::default());
        }
        if raw.chars().count() > 254 {
            return Err(DomainError::invalid(
                field,
                "must be at most 254 characters",
            ));
        }
        if raw
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || is_invisible(c))
        {
            return Err(DomainError::invalid(
                field,
                "must not contain spaces, control or invisible characters",
            ));
        }
        match raw.split_once('@') {
            Some((local, domain))
                if !local.is_empty() && !domain.is_empty() && !domain.contains('@') =>
            {
                Ok(Self(raw.to_owned()))
            }
            _ => Err(DomainError::invalid(
                field,
                "must look like name@example.com",
            )),
        }
    }

    /// Wraps an address read back from the store.
    pub fn from_stored(raw: String) -> Self {
        Self(raw)
    }

    /// The address, or "" for none.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How an account authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AccountKind {
    /// Has a password and signs in; may also hold tokens.
    Person,
    /// No password, never signs in; acts only through tokens.
    Robot,
}

impl AccountKind {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Person => "person",
            Self::Robot => "robot",
        }
    }

    /// Parses the stored spelling.
    pub fn from_stored(raw: &str) -> Option<Self> {
        match raw {
            "person" => Some(Self::Person),
            "robot" => Some(Self::Robot),
            _ => None,
        }
    }
}

/// What an account may do beyond its own resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Acts on its own account only.
    User,
    /// Acts on every account.
    Operator,
}

impl Role {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::User => "user",
            Self::Operator => "operator",
        }
    }

    /// Parses the stored spelling.
    pub fn from_stored(raw: &str) -> Option<Self> {
        match raw {
            "user" => Some(Self::User),
            "operator" => Some(Self::Operator),
            _ => None,
        }
    }
}

/// An account as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its identifier.
    pub id: AccountId,
    /// Its username, as created.
    pub username: Username,
    /// Its contact address, possibly empty.
    pub email: Email,
    /// Person or robot.
    pub kind: AccountKind,
    /// User or operator.
    pub role: Role,
    /// The argon2id hash of its password; `None` for robots.
    pub password_hash: Option<PasswordHash>,
    /// When it was created.
    pub create_time: Timestamp,
    /// When it was disabled, if it is.
    pub disable_time: Option<Timestamp>,
    /// The generation of its credentials: moved on by everything that ends
    /// all of its sessions (a password change, sign-out everywhere,
    /// disabling). A sign-in creates its session only if the generation it
    /// read before checking the password is still current.
    pub credentials_generation: i64,
}

impl Account {
    /// Whether the account is disabled (every credential of it then fails).
    pub fn is_disabled(&self) -> bool {
        self.disable_time.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_accept_the_documented_alphabet_only() {
        for ok in ["a", "Alice", "ci-bot.2", "x_y", &"a".repeat(39)] {
            assert!(Username::parse("username", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-lead",
            ".lead",
            "white space",
            "ünï",
            "аlice",
            "a@b",
            &"a".repeat(40),
        ] {
            assert!(Username::parse("username", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn username_key_folds_case() {
        let name = Username::parse("username", "AlIcE").expect("valid");
        assert_eq!(name.key(), "alice");
        assert_eq!(name.as_str(), "AlIcE");
    }

    #[test]
    fn emails_are_checked_loosely() {
        assert!(Email::parse("email", "").is_ok());
        assert!(Email::parse("email", "a@b").is_ok());
        for bad in [
            "nobody",
            "@b",
            "a@",
            "a@b@c",
            "a b@c",
            "a@b\n",
            "a\u{200b}@b",
            "a@\u{202e}b",
        ] {
            assert!(Email::parse("email", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_must_be_uuids() {
        assert!(AccountId::parse("account_id", "not-a-uuid").is_err());
        assert!(AccountId::parse("account_id", "").is_err());
        let id = AccountId::generate();
        assert_eq!(
            AccountId::parse("account_id", id.as_str()).expect("valid"),
            id
        );
    }
}
