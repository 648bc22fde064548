//! Resources: the things a personal access token may be used on, such as
//! one project ("one-time access to your project"). A token with no
//! resources may be used on every resource of its account, as a token with
//! no scopes has its account's full access; a token with resources may be
//! used only on what they name.
//!
//! Resources are named by the services that own them. This service treats
//! the names as opaque strings with one grammar (AIP-122 style, like
//! `projects/3f9c2a` or `orgs/acme/repos/7781`), and checks them for
//! `VerifyToken`'s `required_resources`. Callers should name resources by a
//! stable id, never by a name that can be deleted and given to someone
//! else (a project called `billing` that is deleted and re-created by
//! another team would otherwise inherit every token limited to it).
//!
//! # Grammar
//! A name is 1 to [`Resource::MAX_LEN`] characters: segments separated by
//! `/`, each segment 1 to [`Resource::MAX_SEGMENT_LEN`] characters of
//! `A-Z a-z 0-9 - _ . ~` (URL-safe without escaping), and neither `.` nor
//! `..`. Names are compared exactly, case included.
//!
//! A token may also carry a pattern: a name whose last segment is `*`,
//! such as `projects/3f9c2a/*`. It allows every name strictly below its
//! prefix (`projects/3f9c2a/datasets/9` and `projects/3f9c2a/x`), not the
//! prefix itself and nothing beside it (`projects/3f9c2ab/x` is not below
//! `projects/3f9c2a/`). A pattern only ever narrows: `*` alone, and a `*`
//! anywhere but last, are refused. `required_resources` take names only.
//!
//! | token's resources     | required                    | allowed |
//! |-----------------------|-----------------------------|---------|
//! | (none)                | anything                    | yes     |
//! | `projects/a`          | `projects/a`                | yes     |
//! | `projects/a`          | `projects/a/datasets/1`     | no      |
//! | `projects/a/*`        | `projects/a/datasets/1`     | yes     |
//! | `projects/a/*`        | `projects/a`                | no      |
//! | `projects/a/*`        | `projects/ab/x`             | no      |
//! | `projects/a`, `orgs/b`| `projects/a` and `orgs/b`   | yes     |

use std::fmt;

use super::{DomainError, error::Violations};

/// The segment that makes a pattern of a name.
const WILDCARD: &str = "*";

/// One entry of a token's resources: a name, or a pattern allowing every
/// name below a prefix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resource(String);

impl Resource {
    /// The longest name (or pattern) accepted.
    pub const MAX_LEN: usize = 256;
    /// The longest segment accepted.
    pub const MAX_SEGMENT_LEN: usize = 63;

    /// Parses a resource name or pattern, as a token may carry.
    pub fn parse(field: &str, raw: &str) -> Result<Self, DomainError> {
        Self::parse_inner(field, raw, true)
    }

    /// Parses a resource name, as a caller requires it: patterns refused.
    pub fn parse_name(field: &str, raw: &str) -> Result<Self, DomainError> {
        Self::parse_inner(field, raw, false)
    }

    fn parse_inner(field: &str, raw: &str, pattern_ok: bool) -> Result<Self, DomainError> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(DomainError::invalid(
                field,
                format!("must be 1 to {} characters", Self::MAX_LEN),
            ));
        }
        let segments: Vec<&str> = raw.split('/').collect();
        let last = segments.len() - 1;
        for (i, segment) in segments.iter().enumerate() {
            if *segment == WILDCARD {
                if !pattern_ok {
                    return Err(DomainError::invalid(
                        field,
                        "must be a resource name, not a pattern: a caller names the one resource it serves",
                    ));
                }
                if i != last {
                    return Err(DomainError::invalid(
                        field,
                        "'*' may only be the last segment, as in 'projects/3f9c2a/*'",
                    ));
                }
                if i == 0 {
                    return Err(DomainError::invalid(
                        field,
                        "'*' alone would allow every resource; leave the resources empty for that",
                    ));
                }
                continue;
            }
            if !segment_ok(segment) {
                return Err(DomainError::invalid(
                    field,
                    format!(
                        "must be segments of 1 to {} characters of A-Z, a-z, 0-9, '-', '_', '.', '~' \
                         separated by '/' (not '.' or '..'), such as 'projects/3f9c2a'",
                        Self::MAX_SEGMENT_LEN
                    ),
                ));
            }
        }
        Ok(Self(raw.to_owned()))
    }

    /// The name or pattern, as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix every allowed name starts with, ending in `/`, if this is
    /// a pattern.
    fn prefix(&self) -> Option<&str> {
        self.0.strip_suffix(WILDCARD).filter(|p| p.ends_with('/'))
    }

    /// Whether this entry allows the resource `name` (a name, not a
    /// pattern).
    pub fn matches(&self, name: &str) -> bool {
        match self.prefix() {
            None => self.0 == name,
            Some(prefix) => name.len() > prefix.len() && name.starts_with(prefix),
        }
    }

    /// Whether every name `other` allows, this entry allows too.
    pub fn covers(&self, other: &Resource) -> bool {
        match (self.prefix(), other.prefix()) {
            (None, None) => self.0 == other.0,
            // A name allows itself only; a pattern allows names without end.
            (None, Some(_)) => false,
            (Some(_), None) => self.matches(&other.0),
            (Some(mine), Some(theirs)) => theirs.starts_with(mine),
        }
    }
}

/// Whether `segment` is a literal segment of the grammar.
fn segment_ok(segment: &str) -> bool {
    !segment.is_empty()
        && segment.len() <= Resource::MAX_SEGMENT_LEN
        && segment != "."
        && segment != ".."
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The resources of a token, sorted and without duplicates. Empty means
/// every resource of the account.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resources(Vec<Resource>);

impl Resources {
    /// The most resources one token may carry.
    pub const MAX_COUNT: usize = 16;
    /// The most characters one set's entries may hold together (one entry
    /// of [`Resource::MAX_LEN`], or several shorter ones): a page of a
    /// thousand tokens, each with as many resources as it may carry, must
    /// still fit one response with room to spare
    /// (`api::codec::MAX_RESPONSE_BYTES`).
    pub const MAX_TOTAL_LEN: usize = 256;

    /// Every resource of the account.
    pub fn all() -> Self {
        Self::default()
    }

    /// Parses a token's resources from a request field such as
    /// `resources`, reporting each bad entry as `field[i]`.
    pub fn parse<S: AsRef<str>>(field: &str, raw: &[S]) -> Result<Self, DomainError> {
        Self::parse_with(field, raw, Resource::parse)
    }

    /// Parses the resources a caller requires (names only), such as
    /// `required_resources`.
    pub fn parse_required<S: AsRef<str>>(field: &str, raw: &[S]) -> Result<Self, DomainError> {
        Self::parse_with(field, raw, Resource::parse_name)
    }

    fn parse_with<S: AsRef<str>>(
        field: &str,
        raw: &[S],
        one: fn(&str, &str) -> Result<Resource, DomainError>,
    ) -> Result<Self, DomainError> {
        if raw.len() > Self::MAX_COUNT {
            return Err(DomainError::invalid(
                field,
                format!("at most {} resources are allowed", Self::MAX_COUNT),
            ));
        }
        if raw.iter().map(|r| r.as_ref().len()).sum::<usize>() > Self::MAX_TOTAL_LEN {
            return Err(DomainError::invalid(
                field,
                format!(
                    "the resources may hold at most {} characters in all",
                    Self::MAX_TOTAL_LEN
                ),
            ));
        }
        let mut violations = Violations::new();
        let mut resources: Vec<Resource> = raw
            .iter()
            .enumerate()
            .filter_map(|(i, r)| violations.check(one(&format!("{field}[{i}]"), r.as_ref())))
            .collect();
        violations.finish()?;
        resources.sort();
        resources.dedup();
        Ok(Self(resources))
    }

    /// Rebuilds a set from the store's space-separated form, every entry
    /// kept as stored (dropping one could leave the set empty, which means
    /// every resource).
    pub fn from_stored(raw: &str) -> Self {
        let mut resources: Vec<Resource> = raw
            .split(' ')
            .filter(|r| !r.is_empty())
            .map(|r| Resource(r.to_owned()))
            .collect();
        resources.sort();
        resources.dedup();
        Self(resources)
    }

    /// The store's form: entries separated by single spaces (the grammar
    /// has no spaces).
    pub fn to_stored(&self) -> String {
        self.names().collect::<Vec<_>>().join(" ")
    }

    /// Whether this is every resource of the account.
    pub fn is_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether these resources allow the resource `name`.
    pub fn allows(&self, name: &str) -> bool {
        self.is_all() || self.0.iter().any(|r| r.matches(name))
    }

    /// Whether these resources allow every name in `required`.
    pub fn allows_all(&self, required: &Resources) -> bool {
        required.names().all(|name| self.allows(name))
    }

    /// Whether everything `self` allows, `other` allows too.
    pub fn is_subset_of(&self, other: &Resources) -> bool {
        other.is_all()
            || (!self.is_all() && self.0.iter().all(|r| other.0.iter().any(|o| o.covers(r))))
    }

    /// The entries, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(Resource::as_str)
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no entries (every resource).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn set(raw: &[&str]) -> Resources {
        Resources::parse("r", raw).expect("valid")
    }

    #[test]
    fn names_follow_the_grammar() {
        for ok in [
            "projects/3f9c2a",
            "a",
            "orgs/acme/repos/7781",
            "x.y/Z~1_2-3",
            "projects/..a",
            &"a".repeat(63),
        ] {
            assert!(Resource::parse_name("r", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/",
            "projects/",
            "/projects",
            "projects//a",
            "projects/a b",
            "projects/é",
            "projects/.",
            "projects/../x",
            "projects/a%2F",
            "projects/a?x",
            &"a".repeat(64),
            &format!("a/{}", "b/".repeat(130)),
        ] {
            assert!(Resource::parse("r", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pattern_only_narrows() {
        assert!(Resource::parse("r", "projects/a/*").is_ok());
        for (bad, why) in [
            ("*", "every resource"),
            ("projects/*/datasets", "only be the last"),
            ("*/a", "only be the last"),
            ("projects/a*", "segments of"),
            ("projects/**", "segments of"),
        ] {
            let err = Resource::parse("r", bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
        let err = Resource::parse_name("required_resources[0]", "projects/a/*")
            .expect_err("a pattern")
            .to_string();
        assert!(err.contains("not a pattern"), "{err}");
    }

    #[test]
    fn the_documented_examples_hold() {
        let cases: [(&[&str], &[&str], bool); 7] = [
            (&[], &["anything/at/all"], true),
            (&["projects/a"], &["projects/a"], true),
            (&["projects/a"], &["projects/a/datasets/1"], false),
            (&["projects/a/*"], &["projects/a/datasets/1"], true),
            (&["projects/a/*"], &["projects/a"], false),
            (&["projects/a/*"], &["projects/ab/x"], false),
            (&["projects/a", "orgs/b"], &["projects/a", "orgs/b"], true),
        ];
        for (token, required, allowed) in cases {
            let required = Resources::parse_required("q", required).expect("names");
            assert_eq!(
                set(token).allows_all(&required),
                allowed,
                "{token:?} {required:?}"
            );
        }
    }

    #[test]
    fn subsets_never_widen() {
        let all = Resources::all();
        let a = set(&["projects/a"]);
        let under_a = set(&["projects/a/*"]);
        let deeper = set(&["projects/a/datasets/*", "projects/a/x"]);
        assert!(a.is_subset_of(&all) && !all.is_subset_of(&a));
        assert!(deeper.is_subset_of(&under_a));
        assert!(!under_a.is_subset_of(&deeper));
        assert!(
            !a.is_subset_of(&under_a),
            "a pattern allows below, not itself"
        );
        assert!(!under_a.is_subset_of(&a), "a name allows only itself");
        assert!(set(&["projects/a", "projects/a/*"]).is_subset_of(&set(&[
            "projects/a/*",
            "projects/a",
            "orgs/b"
        ])));
        assert_eq!(Resources::from_stored(&deeper.to_stored()), deeper);
    }

    #[test]
    fn too_many_and_bad_entries_are_reported() {
        let many: Vec<String> = (0..33).map(|i| format!("p/{i}")).collect();
        assert!(Resources::parse("resources", &many).is_err());
        let seg = "a".repeat(60);
        let long: Vec<String> = (0..3).map(|i| format!("{i}/{seg}/{seg}")).collect();
        assert!(Resources::parse("resources", &long[..2]).is_ok());
        let err = Resources::parse("resources", &long).expect_err("too long in all");
        assert!(err.to_string().contains("in all"), "{err}");
        let err = Resources::parse("resources", &["ok", "NOT OK", "fine", "*"]).expect_err("bad");
        let DomainError::InvalidArgument(v) = err else {
            panic!("wrong error")
        };
        let fields: Vec<_> = v.iter().map(|v| v.field.as_str()).collect();
        assert_eq!(fields, ["resources[1]", "resources[3]"]);
    }

    /// Names over a tiny alphabet, so that prefixes collide often.
    fn name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "ab"]), 1..4)
            .prop_map(|s| s.join("/"))
    }

    fn entry() -> impl Strategy<Value = String> {
        (name(), any::<bool>()).prop_map(|(n, p)| if p { format!("{n}/*") } else { n })
    }

    fn entries() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(entry(), 0..4)
    }

    proptest! {
        /// The escalation rule: a subset allows nothing its parent does
        /// not, and a set that is not a subset allows some name its parent
        /// does not (so the rule is exact, not merely safe).
        #[test]
        fn is_subset_of_is_exactly_allows_implication(child in entries(), parent in entries()) {
            let (child, parent) = (set(&child.iter().map(String::as_str).collect::<Vec<_>>()),
                                   set(&parent.iter().map(String::as_str).collect::<Vec<_>>()));
            // Every name that could tell them apart: the entries themselves,
            // one and two segments below each, and a name outside them all.
            let mut probes = vec!["zz".to_owned()];
            for r in child.names().chain(parent.names()) {
                let base = r.trim_end_matches("/*");
                probes.extend([base.to_owned(), format!("{base}/zz"), format!("{base}/zz/zz")]);
            }
            let widens = probes.iter().any(|p| child.allows(p) && !parent.allows(p));
            prop_assert_eq!(child.is_subset_of(&parent), !widens,
                "child {:?} parent {:?}", child, parent);
        }

        #[test]
        fn parsing_never_panics_and_round_trips(raw in "[a-z/*.~ -]{0,20}") {
            if let Ok(r) = Resource::parse("r", &raw) {
                prop_assert_eq!(r.as_str(), raw.as_str());
                prop_assert!(!raw.contains(' '));
            }
        }
    }
}
