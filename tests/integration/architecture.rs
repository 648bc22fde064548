//! The layers' dependencies point inward, as ARCHITECTURE.md says, and stay
//! so: the domain imports no outer layer of the crate and none of the
//! crates that belong to one (tonic, prost, sqlx, ...); the wire layer
//! reaches the database only through the domain; storage knows nothing of
//! the wire. Read from the source itself, every `use` and every inline
//! `crate::…` or `tonic::…` path, comments aside.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

/// A layer's folder under `src/`, the crate's modules it must not name, and
/// the external crates it must not use.
struct Rule {
    layer: &'static str,
    modules: &'static [&'static str],
    crates: &'static [&'static [&'static str]],
}

const WIRE_CRATES: &[&str] = &[
    "tonic",
    "tonic_health",
    "tonic_reflection",
    "tonic_types",
    "tonic_prost",
    "prost",
    "prost_types",
    "axum",
    "hyper",
    "hyper_util",
    "h2",
    "http",
    "http_body",
    "tower",
];

const RULES: &[Rule] = &[
    Rule {
        layer: "domain",
        modules: &["api", "app", "config", "observability", "storage", "web"],
        crates: &[WIRE_CRATES, &["sqlx", "clap"]],
    },
    Rule {
        layer: "api",
        modules: &["app", "config", "storage", "web"],
        crates: &[&["sqlx", "clap"]],
    },
    // The web page is another client of the domain, like the gRPC layer:
    // never the database, and not the gRPC machinery either.
    Rule {
        layer: "web",
        modules: &["app", "config", "storage"],
        crates: &[
            &["sqlx", "clap"],
            &[
                "tonic",
                "tonic_health",
                "tonic_reflection",
                "tonic_types",
                "prost",
            ],
        ],
    },
    Rule {
        layer: "storage",
        modules: &["api", "app", "config", "observability", "web"],
        crates: &[WIRE_CRATES],
    },
];

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("read a source folder") {
            let path = entry.expect("a folder entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `source` without its comments (line comments, doc comments included).
fn without_comments(source: &str) -> String {
    source
        .lines()
        .map(|line| match line.find("//") {
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first path segments a `use` tree names: `a::b` gives `a`, and
/// `{a::b, c}` gives `a` and `c`.
fn roots(tree: &str) -> Vec<String> {
    let tree = tree.trim();
    let Some(inner) = tree.strip_prefix('{') else {
        return vec![tree.chars().take_while(|c| is_ident(*c)).collect()];
    };
    let mut found = Vec::new();
    let (mut depth, mut item) = (0usize, String::new());
    for c in inner.chars() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                found.extend(roots(&item));
                item.clear();
                continue;
            }
            _ => {}
        }
        item.push(c);
    }
    found.extend(roots(&item));
    found.retain(|root| !root.is_empty());
    found
}

/// What `code` (comments removed) imports: the crate's own top-level
/// modules it names, and the external crates it uses.
fn imports(code: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut modules, mut crates) = (BTreeSet::new(), BTreeSet::new());
    // `use` statements, grouped or not.
    let mut rest = code;
    while let Some(at) = rest.find("use ") {
        let before = rest[..at].chars().next_back();
        let statement = &rest[at + 4..];
        rest = statement;
        if before.is_some_and(is_ident) {
            continue;
        }
        let Some(end) = statement.find(';') else {
            break;
        };
        let statement = statement[..end].trim();
        if let Some(tree) = statement.strip_prefix("crate::") {
            modules.extend(roots(tree));
        } else {
            crates.extend(roots(statement));
        }
    }
    // Inline paths: `crate::x::…`, `name::…`.
    let chars: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_ident(chars[i]) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':')) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let name: String = chars[start..i].iter().collect();
            if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
                if name == "crate" {
                    let tail: String = chars[i + 2..].iter().take(200).collect();
                    modules.extend(roots(&tail));
                } else {
                    crates.insert(name);
                }
            }
        } else {
            i += 1;
        }
    }
    (modules, crates)
}

#[test]
fn each_layer_imports_only_what_points_inward() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut broken = Vec::new();
    for rule in RULES {
        let files = sources(&src.join(rule.layer));
        assert!(!files.is_empty(), "no sources under src/{}", rule.layer);
        for file in files {
            let code = without_comments(&std::fs::read_to_string(&file).expect("read a source"));
            let (modules, crates) = imports(&code);
            let name = file
                .strip_prefix(&src)
                .unwrap_or(&file)
                .display()
                .to_string();
            for module in modules
                .iter()
                .filter(|m| rule.modules.contains(&m.as_str()))
            {
                broken.push(format!("{name} imports crate::{module}"));
            }
            for used in crates
                .iter()
                .filter(|c| rule.crates.iter().any(|list| list.contains(&c.as_str())))
            {
                broken.push(format!("{name} uses {used}"));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports against the layering (ARCHITECTURE.md):\n{}",
        broken.join("\n")
    );
}

/// A request is parsed once, by its function in `api/parse.rs`, which the
/// fuzz targets call too: a handler in `api/services/` that parsed a field
/// itself (a validated type's `parse`, a `Violations` of its own) would be
/// parsing that the fuzz targets never reach.
#[test]
fn handlers_parse_requests_only_through_api_parse() {
    let services = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api/services");
    let files = sources(&services);
    assert!(!files.is_empty(), "no sources under src/api/services");
    let mut broken = Vec::new();
    for file in files {
        let code = without_comments(&std::fs::read_to_string(&file).expect("read a source"));
        for needle in ["::parse(", "Violations"] {
            if code.contains(needle) {
                broken.push(format!("{} uses {needle}", file.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "handlers parsing outside api::parse:\n{}",
        broken.join("\n")
    );
}

/// The reader sees what the rule must catch, however it is written (so the
/// test above cannot pass by seeing nothing).
#[test]
fn the_import_reader_sees_every_form() {
    let code = without_comments(
        "use crate::{\n    domain::{a, b},\n    storage::TokenFilter,\n};\n\
         pub use crate::api::x;\n\
         use tonic::Status;\n\
         fn f() -> Result<(), sqlx::Error> { crate::config::load(); Ok(()) }\n\
         // use crate::app; (a comment)\n\
         /// [`prost::Message`] in a doc comment\n\
         let reuse = 1; let misuse::x = 2;\n",
    );
    let (modules, crates) = imports(&code);
    let modules: Vec<_> = modules.iter().map(String::as_str).collect();
    assert_eq!(modules, ["api", "config", "domain", "storage"]);
    assert!(
        crates.contains("tonic") && crates.contains("sqlx"),
        "{crates:?}"
    );
    assert!(
        !crates.contains("prost"),
        "comments are not code: {crates:?}"
    );
}

/// The domain reads the current time only through its `Clock` port
/// (`domain/time.rs`), so that every expiry, window and audit time is
/// judged by the clock the service was built with (the one tests move).
#[test]
fn the_domain_reads_the_time_only_through_its_clock() {
    let domain = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/domain");
    let mut offenders = Vec::new();
    for path in sources(&domain) {
        if path.ends_with("time.rs") {
            continue;
        }
        let code = without_comments(&std::fs::read_to_string(&path).expect("read a source"));
        for read in ["Timestamp::now", "SystemTime::now"] {
            if code.contains(read) {
                offenders.push(format!("{}: {read}", path.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "the domain reads the time past its clock: {offenders:#?}"
    );
}
