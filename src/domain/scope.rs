//! Scopes: what a personal access token is limited to. A token with no scopes
//! has its account's full access; a token with scopes may do only what they
//! name. This service checks its own built-in scopes; other services define
//! theirs and check them through `VerifyToken`'s `required_scopes`.

use std::fmt;

use super::{DomainError, error::Violations};

/// Read accounts.
pub const ACCOUNTS_READ: &str = "accounts:read";
/// Create and change accounts.
pub const ACCOUNTS_WRITE: &str = "accounts:write";
/// Read token metadata.
pub const TOKENS_READ: &str = "tokens:read";
/// Create and revoke tokens.
pub const TOKENS_WRITE: &str = "tokens:write";
/// Call `VerifyToken`.
pub const TOKENS_VERIFY: &str = "tokens:verify";

/// Every built-in scope, in order.
pub const BUILT_IN: [&str; 5] = [
    ACCOUNTS_READ,
    ACCOUNTS_WRITE,
    TOKENS_READ,
    TOKENS_VERIFY,
    TOKENS_WRITE,
];

/// The namespaces of the built-in scopes: no other scope may live in them.
const RESERVED_NAMESPACES: [&str; 2] = ["accounts", "tokens"];

/// Why a well-formed name is still refused: it sits in a built-in
/// namespace without being a built-in scope, or it is one edit (an
/// insertion, a deletion, a substitution or two neighbours swapped) away
/// from a built-in scope. Either is almost always a typo that would
/// otherwise be granted, or required, silently and never match.
fn lookalike(raw: &str) -> Option<String> {
    if BUILT_IN.contains(&raw) {
        return None;
    }
    if let Some(near) = BUILT_IN.iter().find(|b| one_edit_apart(raw, b)) {
        return Some(format!("is not a built-in scope; did you mean '{near}'?"));
    }
    let namespace = raw.split(':').next().unwrap_or(raw);
    if RESERVED_NAMESPACES.contains(&namespace) {
        return Some(format!(
            "the '{namespace}:' namespace is reserved for the built-in scopes ({})",
            BUILT_IN.join(", ")
        ));
    }
    None
}

/// Whether `a` and `b` differ by exactly one edit (Damerau: an insertion,
/// a deletion, a substitution or a transposition of neighbours).
fn one_edit_apart(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a == b || a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (a, b) = (&a[prefix..], &b[prefix..]);
    match a.len().cmp(&b.len()) {
        std::cmp::Ordering::Less => a == &b[1..],
        std::cmp::Ordering::Greater => &a[1..] == b,
        std::cmp::Ordering::Equal => {
            a[1..] == b[1..] || (a.len() >= 2 && a[0] == b[1] && a[1] == b[0] && a[2..] == b[2..])
        }
    }
}

/// A scope name: 1 to 64 characters of `a-z`, `0-9`, `_`, `-`, `.`, in parts
/// separated by `:`, each part starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope(String);

impl Scope {
    /// The longest scope name accepted.
    pub const MAX_LEN: usize = 64;

    /// Parses a client-supplied scope name.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(DomainError::invalid(
                field,
                format!("must be 1 to {} characters", Self::MAX_LEN),
            ));
        }
        let part_ok = |part: &str| {
            part.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && part.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-' | '.')
                })
        };
        if !raw.split(':').all(part_ok) {
            return Err(DomainError::invalid(
                field,
                "must be lowercase parts of a-z, 0-9, '_', '-', '.' separated by ':', such as 'project:publish'",
            ));
        }
        if let Some(why) = lookalike(raw) {
            return Err(DomainError::invalid(field, why));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The scope's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A set of scopes, sorted and without duplicates. Empty means full access.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// The most scopes one token may carry.
    pub const MAX_COUNT: usize = 32;

    /// Full access: no limits beyond the account's own.
    pub fn full() -> Self {
        Self::default()
    }

    /// Parses the scopes of a request field such as `scopes`, reporting each
    /// bad entry as `field[i]`.
    pub fn parse<S: AsRef<str>>(field: &str, raw: &[S]) -> Result<Self, DomainError> {
        if raw.len() > Self::MAX_COUNT {
            return Err(DomainError::invalid(
                field,
                format!("at most {} scopes are allowed", Self::MAX_COUNT),
            ));
        }
        let mut violations = Violations::new();
        let mut scopes: Vec<Scope> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                violations.check(Scope::parse(&format!("{field}[{i}]"), s.as_ref()))
            })
            .collect();
        violations.finish()?;
        scopes.sort();
        scopes.dedup();
        Ok(Self(scopes))
    }

    /// Rebuilds a set from the store's space-separated form. Every entry is
    /// kept as stored, even one today's rules would refuse (a name granted
    /// before a lookalike rule existed): dropping it could leave the set
    /// empty, and an empty set means full access. A kept name only ever
    /// permits itself.
    pub fn from_stored(raw: &str) -> Self {
        let mut scopes: Vec<Scope> = raw
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(|s| Scope(s.to_owned()))
            .collect();
        scopes.sort();
        scopes.dedup();
        Self(scopes)
    }

    /// The store's form: names separated by single spaces.
    pub fn to_stored(&self) -> String {
        self.names().collect::<Vec<_>>().join(" ")
    }

    /// Whether this is full access.
    pub fn is_full(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether these scopes permit `scope`.
    pub fn allows(&self, scope: &str) -> bool {
        self.is_full() || self.0.iter().any(|s| s.as_str() == scope)
    }

    /// Whether everything `self` permits, `other` permits too.
    pub fn is_subset_of(&self, other: &Scopes) -> bool {
        other.is_full() || (!self.is_full() && self.0.iter().all(|s| other.0.contains(s)))
    }

    /// The scope names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Scope::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scope_names_follow_the_grammar() {
        for ok in ["tokens:read", "project:publish", "a", "x.y:z-1_2", "9lives"] {
            assert!(Scope::parse("s", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Tokens:read",
            "tokens:",
            ":read",
            "a b",
            "a::b",
            "é",
            "_x",
            &"a".repeat(65),
        ] {
            assert!(Scope::parse("s", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_like_built_in_ones_are_refused_with_the_one_they_resemble() {
        for built_in in BUILT_IN {
            assert!(Scope::parse("s", built_in).is_ok(), "{built_in}");
        }
        for (typo, meant) in [
            ("token:verify", "tokens:verify"),
            ("tokens:veriffy", "tokens:verify"),
            ("tokens:verfiy", "tokens:verify"),
            ("tokens:writ", "tokens:write"),
            ("tokens:reed", "tokens:read"),
            ("account:read", "accounts:read"),
            ("accounts:wrtie", "accounts:write"),
            ("tokens:verify2", "tokens:verify"),
        ] {
            let err = Scope::parse("s", typo).expect_err(typo).to_string();
            assert!(
                err.contains(&format!("did you mean '{meant}'")),
                "{typo}: {err}"
            );
        }
        for reserved in [
            "tokens:delete",
            "accounts",
            "tokens:read:own",
            "accounts:admin",
        ] {
            let err = Scope::parse("s", reserved).expect_err(reserved).to_string();
            assert!(err.contains("namespace is reserved"), "{reserved}: {err}");
        }
        for fine in [
            "project:publish",
            "token",
            "tokenizer:run",
            "account-service:read",
        ] {
            assert!(Scope::parse("s", fine).is_ok(), "{fine}");
        }
    }

    #[test]
    fn one_edit_means_exactly_one() {
        assert!(one_edit_apart("abc", "abd"));
        assert!(one_edit_apart("abc", "ab"));
        assert!(one_edit_apart("abc", "abcd"));
        assert!(one_edit_apart("abc", "bac"));
        assert!(one_edit_apart("abc", "acb"));
        assert!(!one_edit_apart("abc", "abc"));
        assert!(!one_edit_apart("abc", "cba"));
        assert!(!one_edit_apart("abc", "a"));
        assert!(!one_edit_apart("abcd", "abdc1"));
    }

    #[test]
    fn stored_scopes_are_never_dropped_into_full_access() {
        let kept = Scopes::from_stored("token:verify");
        assert!(!kept.is_full());
        assert!(!kept.allows(TOKENS_VERIFY));
        assert!(kept.allows("token:verify"));
    }

    #[test]
    fn bad_entries_are_reported_by_index() {
        let err = Scopes::parse("scopes", &["ok", "NOT OK", "fine", "!"]).expect_err("invalid");
        let DomainError::InvalidArgument(v) = err else {
            panic!("wrong error")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["scopes[1]", "scopes[3]"]);
    }

    #[test]
    fn empty_means_full_access_and_subsets_never_widen() {
        let full = Scopes::full();
        let read = Scopes::parse("s", &["tokens:read"]).expect("valid");
        let both =
            Scopes::parse("s", &["tokens:write", "tokens:read", "tokens:read"]).expect("valid");
        assert!(full.allows("anything:at-all"));
        assert!(read.allows("tokens:read") && !read.allows("tokens:write"));
        assert!(read.is_subset_of(&both));
        assert!(!both.is_subset_of(&read));
        assert!(read.is_subset_of(&full));
        assert!(!full.is_subset_of(&read));
        assert_eq!(Scopes::from_stored(&both.to_stored()), both);
    }
}
