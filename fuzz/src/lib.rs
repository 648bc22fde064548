//! What the fuzz targets share: reading typed errors, and oracles written
//! independently of the service's code (byte-wise state machines, a bitwise
//! CRC-32) that the targets compare it against.

use identity::domain::{DomainError, FieldViolation};

/// The fuzzer's bytes as text: the service only ever sees valid UTF-8
/// (protobuf `string`s and metadata values are checked before it), so
/// invalid sequences become U+FFFD rather than being thrown away.
pub fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// The field violations of a rejected input. Bad input must be
/// `InvalidArgument` with at least one violation, each naming a field and
/// saying what is wrong; any other variant (above all `Internal`) would turn
/// a client's mistake into a server error.
pub fn violations(err: DomainError) -> Vec<FieldViolation> {
    match err {
        DomainError::InvalidArgument(found) => {
            assert!(!found.is_empty(), "InvalidArgument without violations");
            for v in &found {
                assert!(!v.field.is_empty(), "violation without a field: {v:?}");
                assert!(!v.description.is_empty(), "violation without a description");
            }
            found
        }
        other => panic!("bad input gave {other:?}, not InvalidArgument"),
    }
}

/// Whether `field` is one of `names`, a repeated field `name` as a whole, or
/// `name[i]` for a repeated field `name` of `len` entries with `i < len`.
pub fn names_a_field(field: &str, names: &[&str], repeated: &[(&str, usize)]) -> bool {
    names.contains(&field)
        // A repeated field as a whole (too many entries).
        || repeated.iter().any(|&(name, _)| field == name)
        || repeated.iter().any(|&(name, len)| {
            field
                .strip_prefix(name)
                .and_then(|rest| rest.strip_prefix('['))
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|index| index.parse::<usize>().ok())
                .is_some_and(|i| i < len && field == format!("{name}[{i}]"))
        })
}

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it), bit by bit.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// `value` as six base62 digits (`0-9A-Za-z`), most significant first.
pub fn base62_six(value: u32) -> String {
    const DIGITS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    let mut rest = u64::from(value);
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(rest % 62) as usize];
        rest /= 62;
    }
    String::from_utf8(out.to_vec()).expect("ascii")
}

/// Whether `raw` is a credential this service could have issued: a known
/// prefix, 32 + 6 ASCII letters or digits, and the checksum of the first 38
/// characters as the last 6.
pub fn is_credential(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    bytes.len() == 44
        && (raw.starts_with("idpat_") || raw.starts_with("idses_"))
        && bytes[6..].iter().all(u8::is_ascii_alphanumeric)
        && raw[38..] == base62_six(crc32(&bytes[..38]))
}

/// The username grammar: 1 to 39 bytes of `A-Za-z0-9._-`, the first a
/// letter or a digit.
pub fn is_username(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    (1..=39).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// An acceptable scope name: the grammar, and not a lookalike of a built-in
/// scope (in a built-in namespace without being built in, or at
/// optimal-string-alignment distance 1 from one).
pub fn is_scope(raw: &str) -> bool {
    const BUILT_IN: [&str; 5] = [
        "accounts:read",
        "accounts:write",
        "tokens:read",
        "tokens:verify",
        "tokens:write",
    ];
    if !is_scope_grammar(raw) {
        return false;
    }
    if BUILT_IN.contains(&raw) {
        return true;
    }
    let namespace = raw.split(':').next().unwrap_or_default();
    namespace != "accounts"
        && namespace != "tokens"
        && BUILT_IN.iter().all(|b| edit_distance(raw, b) != 1)
}

/// The optimal string alignment distance (insertions, deletions,
/// substitutions and transpositions of neighbours), by the textbook table.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for j in 0..=b.len() {
        d[0][j] = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// The scope grammar: 1 to 64 bytes; parts separated by `:`, each non-empty,
/// starting with `a-z0-9` and going on with `a-z0-9_.-`.
fn is_scope_grammar(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    if !(1..=64).contains(&bytes.len()) {
        return false;
    }
    let mut at_part_start = true;
    for &b in bytes {
        let lower_or_digit = b.is_ascii_lowercase() || b.is_ascii_digit();
        if b == b':' {
            if at_part_start {
                return false;
            }
            at_part_start = true;
        } else if at_part_start {
            if !lower_or_digit {
                return false;
            }
            at_part_start = false;
        } else if !(lower_or_digit || b == b'_' || b == b'-' || b == b'.') {
            return false;
        }
    }
    !at_part_start
}

/// Whether `password`, lowercased and NFKC-normalised, is on the service's
/// list of common passwords (read here from the same file, whose lines
/// starting with '#' are comments).
pub fn is_common_password(password: &str) -> bool {
    use unicode_normalization::UnicodeNormalization as _;
    const LIST: &str = include_str!("../../src/domain/common_passwords.txt");
    let key: String = password.to_lowercase().nfkc().collect();
    LIST.lines()
        .any(|line| !line.is_empty() && !line.starts_with('#') && line == key)
}
