//! The scope validators (`domain::scope::Scope::parse`, `Scopes::parse`).
//!
//! The input is one scope name per line. Properties: nothing panics; each
//! name is accepted exactly when an independent byte-wise oracle of the
//! grammar accepts it; a list is accepted exactly when it has at most 32
//! names and all are valid, and otherwise every bad entry (and only those)
//! is reported as `scopes[i]`; an accepted list is normalised (sorted,
//! without duplicates, the same set of names) and normalising again, or
//! through the stored form, changes nothing; `allows` and `is_subset_of`
//! agree with the names.

#![no_main]

use std::collections::BTreeSet;

use identity::domain::scope::{Scope, Scopes};
use identity_fuzz::{is_scope, text, violations};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = text(data);
    let entries: Vec<&str> = if raw.is_empty() {
        Vec::new()
    } else {
        raw.split('\n').collect()
    };

    for entry in &entries {
        match Scope::parse("scope", entry) {
            Ok(scope) => {
                assert!(is_scope(entry), "accepted {entry:?}");
                assert_eq!(scope.as_str(), *entry);
                assert_eq!(scope.to_string(), *entry);
            }
            Err(err) => {
                assert!(!is_scope(entry), "rejected {entry:?}");
                let found = violations(err);
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].field, "scope");
            }
        }
    }

    let bad: Vec<String> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !is_scope(e))
        .map(|(i, _)| format!("scopes[{i}]"))
        .collect();
    match Scopes::parse("scopes", &entries) {
        Ok(scopes) => {
            assert!(entries.len() <= Scopes::MAX_COUNT && bad.is_empty());
            let names: Vec<&str> = scopes.names().collect();
            assert!(
                names.windows(2).all(|w| w[0] < w[1]),
                "not sorted and unique"
            );
            let wanted: BTreeSet<&str> = entries.iter().copied().collect();
            assert_eq!(names.iter().copied().collect::<BTreeSet<_>>(), wanted);
            assert_eq!(scopes.is_full(), entries.is_empty());

            assert_eq!(
                Scopes::parse("scopes", &names).expect("normal form"),
                scopes
            );
            assert_eq!(Scopes::from_stored(&scopes.to_stored()), scopes);

            let full = Scopes::full();
            assert!(scopes.is_subset_of(&scopes) && scopes.is_subset_of(&full));
            assert_eq!(full.is_subset_of(&scopes), scopes.is_full());
            for name in &names {
                assert!(scopes.allows(name) && full.allows(name));
                let one = Scopes::parse("scopes", &[*name]).expect("valid");
                assert!(one.is_subset_of(&scopes));
            }
            // Something no listed scope names is allowed only by full access.
            assert_eq!(
                scopes.allows("unlisted:scope:x"),
                scopes.is_full() || wanted.contains("unlisted:scope:x")
            );
        }
        Err(err) => {
            let found = violations(err);
            if entries.len() > Scopes::MAX_COUNT {
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].field, "scopes");
            } else {
                let fields: Vec<&str> = found.iter().map(|v| v.field.as_str()).collect();
                assert!(!bad.is_empty());
                assert_eq!(fields, bad, "reported fields are not the bad entries");
            }
        }
    }
});
