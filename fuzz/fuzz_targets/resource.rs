//! The resource grammar and its matching rule (`domain::resource`).
//!
//! The input is one entry per line; a line `=` splits it into two sets, a
//! token's and another's (a creator's). Properties: nothing panics; an
//! entry is accepted as a name or a pattern exactly when an independent
//! byte-wise oracle of the grammar accepts it, and as a required name only
//! when it is no pattern; a list is accepted exactly when it has at most 16
//! entries of at most 256 bytes in all and all are valid, and otherwise
//! the list as a whole, or every bad entry (and only those), is reported
//! as `resources` or `resources[i]`; an accepted list is normalised
//! (sorted, without duplicates) and survives the stored form; `allows`
//! agrees with an independent matcher on every entry and on names made
//! from them; `allows_all` is `allows` of each; and `is_subset_of` is sound
//! (whatever the subset allows of the probe names, the superset allows),
//! reflexive, and has every resource as its top.

#![no_main]

use identity::domain::resource::{Resource, Resources};
use identity_fuzz::{text, violations};
use libfuzzer_sys::fuzz_target;

/// The grammar, restated byte by byte: segments of 1 to 63 of
/// `A-Z a-z 0-9 - _ . ~` separated by `/`, not `.` or `..`, at most 256
/// bytes; with `pattern_ok`, the last segment (not the only one) may be
/// `*`.
fn is_resource(raw: &str, pattern_ok: bool) -> bool {
    if raw.is_empty() || raw.len() > 256 {
        return false;
    }
    let segments: Vec<&str> = raw.split('/').collect();
    let last = segments.len() - 1;
    segments.iter().enumerate().all(|(i, s)| {
        if *s == "*" {
            return pattern_ok && i == last && i > 0;
        }
        !s.is_empty()
            && s.len() <= 63
            && *s != "."
            && *s != ".."
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
    })
}

/// Whether the entry `entry` allows the name `name`, restated.
fn entry_allows(entry: &str, name: &str) -> bool {
    match entry.strip_suffix("/*") {
        None => entry == name,
        Some(parent) => {
            name.len() > parent.len() + 1
                && name.starts_with(parent)
                && name.as_bytes()[parent.len()] == b'/'
        }
    }
}

/// Names to probe `set` with: each name entry, and for each pattern a name
/// just below it, one two levels below and its parent.
fn probes(set: &Resources) -> Vec<String> {
    let mut names = Vec::new();
    for entry in set.names() {
        match entry.strip_suffix("/*") {
            None => names.push(entry.to_owned()),
            Some(parent) => {
                names.push(format!("{parent}/x"));
                names.push(format!("{parent}/x/y"));
                names.push(parent.to_owned());
            }
        }
    }
    names
}

/// Parses `entries` as a token's resources and checks the list properties.
fn parse_list(entries: &[&str]) -> Option<Resources> {
    let bad: Vec<String> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !is_resource(e, true))
        .map(|(i, _)| format!("resources[{i}]"))
        .collect();
    let too_big = entries.len() > Resources::MAX_COUNT
        || entries.iter().map(|e| e.len()).sum::<usize>() > Resources::MAX_TOTAL_LEN;
    match Resources::parse("resources", entries) {
        Ok(set) => {
            assert!(!too_big && bad.is_empty());
            let names: Vec<&str> = set.names().collect();
            assert!(names.windows(2).all(|w| w[0] < w[1]), "not sorted and unique");
            assert!(names.iter().all(|n| entries.contains(n)));
            assert!(entries.iter().all(|e| names.contains(e)));
            assert_eq!(set.is_all(), entries.is_empty());
            assert_eq!(Resources::parse("resources", &names).expect("normal form"), set);
            assert_eq!(Resources::from_stored(&set.to_stored()), set);
            Some(set)
        }
        Err(err) => {
            let found = violations(err);
            if too_big {
                assert_eq!(found.len(), 1);
                assert_eq!(found[0].field, "resources");
            } else {
                let fields: Vec<&str> = found.iter().map(|v| v.field.as_str()).collect();
                assert!(!bad.is_empty());
                assert_eq!(fields, bad, "reported fields are not the bad entries");
            }
            None
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let raw = text(data);
    let lines: Vec<&str> = if raw.is_empty() {
        Vec::new()
    } else {
        raw.split('\n').collect()
    };
    let split = lines.iter().position(|l| *l == "=").unwrap_or(lines.len());
    let (first, second) = (&lines[..split], &lines[(split + 1).min(lines.len())..]);

    for entry in &lines {
        let as_entry = Resource::parse("resource", entry);
        assert_eq!(as_entry.is_ok(), is_resource(entry, true), "{entry:?}");
        if let Ok(resource) = &as_entry {
            assert_eq!(resource.as_str(), *entry);
            assert_eq!(resource.to_string(), *entry);
            assert!(resource.covers(resource));
        }
        let as_name = Resource::parse_name("resource", entry);
        assert_eq!(as_name.is_ok(), is_resource(entry, false), "{entry:?}");
        if let Err(err) = as_name {
            let found = violations(err);
            assert_eq!(found.len(), 1);
            assert_eq!(found[0].field, "resource");
        }
    }

    let (Some(mine), theirs) = (parse_list(first), parse_list(second)) else {
        return;
    };
    let all = Resources::all();
    assert!(mine.is_subset_of(&mine) && mine.is_subset_of(&all));
    assert_eq!(all.is_subset_of(&mine), mine.is_all());

    // Every probe name: allowed exactly as the restated matcher says.
    let mut names = probes(&mine);
    if let Some(theirs) = &theirs {
        names.extend(probes(theirs));
    }
    names.retain(|n| is_resource(n, false));
    for name in &names {
        let expected = mine.is_all() || mine.names().any(|e| entry_allows(e, name));
        assert_eq!(mine.allows(name), expected, "{name:?} by {mine:?}");
        assert!(all.allows(name));
    }
    // Within both of the set's limits (count and characters in all), the
    // probes parse as a requirement.
    if names.len() <= Resources::MAX_COUNT
        && names.iter().map(String::len).sum::<usize>() <= Resources::MAX_TOTAL_LEN
    {
        let required = Resources::parse_required("required_resources", &names).expect("names");
        assert_eq!(
            mine.allows_all(&required),
            required.names().all(|n| mine.allows(n))
        );
    }

    // The subset rule is sound: what the subset allows, so does the
    // superset.
    if let Some(theirs) = theirs {
        if mine.is_subset_of(&theirs) {
            for name in &names {
                assert!(
                    !mine.allows(name) || theirs.allows(name),
                    "{mine:?} within {theirs:?} but {name:?}"
                );
            }
            // Every resource is within every resource only.
            assert!(!mine.is_all() || theirs.is_all());
        }
        // A set whose every entry the other covers is within it.
        let covered = !mine.is_all()
            && mine.names().all(|m| {
                let m = Resource::parse("m", m).expect("valid");
                theirs.names().any(|t| Resource::parse("t", t).expect("valid").covers(&m))
            });
        assert_eq!(mine.is_subset_of(&theirs), theirs.is_all() || covered);
    }
});
