//! Credentials on the wire: session tokens and personal access tokens.
//!
//! Format (after GitHub's tokens): a readable prefix that names the kind
//! (`idses_` for sessions, `idpat_` for personal access tokens), 32 base62
//! characters from the OS CSPRNG (190 bits), and 6 base62 characters of a
//! CRC32 over the prefix and the random part. The checksum lets a mistyped or
//! truncated token be refused without touching the database, and lets secret
//! scanners recognise real tokens. The server stores only a SHA-256 digest:
//! with this much entropy a slow hash adds nothing, and lookups stay a single
//! indexed equality.

use std::fmt;

use rand::{RngCore as _, rngs::OsRng};
use sha2::{Digest as _, Sha256};

/// Which kind of credential a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredentialKind {
    /// A session from sign-in.
    Session,
    /// A personal access token.
    PersonalAccessToken,
}

impl CredentialKind {
    /// The prefix that starts every credential of this kind.
    pub const fn prefix(self) -> &'static str {
        match self {
            Self::Session => "idses_",
            Self::PersonalAccessToken => "idpat_",
        }
    }
}

const PREFIX_LEN: usize = 6;
const RANDOM_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// The exact length of every credential.
pub const CREDENTIAL_LEN: usize = PREFIX_LEN + RANDOM_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A credential's full text. Shown to its owner once, never logged: its
/// `Debug` prints only the kind.
pub struct Secret {
    text: String,
    kind: CredentialKind,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({:?}, [redacted])", self.kind)
    }
}

impl Secret {
    /// A new random credential of `kind`.
    pub fn generate(kind: CredentialKind) -> Self {
        let mut random = String::with_capacity(RANDOM_LEN);
        let mut bytes = [0u8; 64];
        while random.len() < RANDOM_LEN {
            OsRng.fill_bytes(&mut bytes);
            // Rejection sampling keeps every character equally likely:
            // 248 = 4 * 62, so bytes at or above it are discarded.
            for &b in bytes.iter().filter(|&&b| b < 248) {
                if random.len() == RANDOM_LEN {
                    break;
                }
                random.push(BASE62[usize::from(b % 62)] as char);
            }
        }
        Self::assemble(kind, &random)
    }

    /// The credential of `kind` whose random part is `random` (32 base62
    /// characters): the prefix, `random`, then the checksum over both. Kept
    /// apart from the randomness so tests can build tokens from chosen parts.
    fn assemble(kind: CredentialKind, random: &str) -> Self {
        debug_assert!(random.len() == RANDOM_LEN && random.bytes().all(|b| BASE62.contains(&b)));
        let mut text = String::with_capacity(CREDENTIAL_LEN);
        text.push_str(kind.prefix());
        text.push_str(random);
        let checksum = crc32fast::hash(text.as_bytes());
        push_base62_fixed(&mut text, checksum);
        Self { text, kind }
    }

    /// The text to hand to the credential's owner.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// The digest the store keeps.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.text)
    }

    /// The credential's kind.
    pub fn kind(&self) -> CredentialKind {
        self.kind
    }
}

/// A credential that passed the format checks: its kind and digest. The
/// text itself is not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCredential {
    /// Session or personal access token.
    pub kind: CredentialKind,
    /// SHA-256 of the full text.
    pub digest: Digest,
}

/// The most secrets one leak report may carry.
pub const MAX_LEAKED_SECRETS: usize = 1000;

/// What a leak report (`RevokeLeakedToken`) names: 1 to
/// [`MAX_LEAKED_SECRETS`] secrets, of which only those that are credentials
/// are kept (each once). The others are ignored, so the answer says nothing
/// about them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakedCredentials {
    credentials: Vec<ParsedCredential>,
    reported: usize,
}

impl LeakedCredentials {
    /// Parses the secrets of a report, sent in the field `field`.
    pub fn parse<S: AsRef<str>>(field: &str, secrets: &[S]) -> Result<Self, super::DomainError> {
        if secrets.is_empty() || secrets.len() > MAX_LEAKED_SECRETS {
            return Err(super::DomainError::invalid(
                field,
                format!("must hold 1 to {MAX_LEAKED_SECRETS} credentials"),
            ));
        }
        let mut credentials: Vec<ParsedCredential> = Vec::new();
        for parsed in secrets.iter().filter_map(|s| parse(s.as_ref()).ok()) {
            if !credentials.contains(&parsed) {
                credentials.push(parsed);
            }
        }
        Ok(Self {
            credentials,
            reported: secrets.len(),
        })
    }

    /// The distinct credentials among the secrets, in the order sent.
    pub fn credentials(&self) -> &[ParsedCredential] {
        &self.credentials
    }

    /// How many secrets the report carried, credentials or not.
    pub fn reported(&self) -> usize {
        self.reported
    }
}

/// Why a string is not a credential. Deliberately coarse: the caller learns
/// only that it is malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

/// Checks a credential's prefix, length, alphabet and checksum, and digests
/// it. Costs no I/O; rejects anything that is not a token this service
/// issued (up to the 1-in-2^32 chance of a random checksum match).
pub fn parse(raw: &str) -> Result<ParsedCredential, Malformed> {
    if raw.len() != CREDENTIAL_LEN {
        return Err(Malformed);
    }
    let kind = if raw.starts_with(CredentialKind::Session.prefix()) {
        CredentialKind::Session
    } else if raw.starts_with(CredentialKind::PersonalAccessToken.prefix()) {
        CredentialKind::PersonalAccessToken
    } else {
        return Err(Malformed);
    };
    let body = &raw.as_bytes()[PREFIX_LEN..];
    if !body.iter().all(u8::is_ascii_alphanumeric) {
        return Err(Malformed);
    }
    let (signed, checksum) = raw.split_at(PREFIX_LEN + RANDOM_LEN);
    let mut expected = String::with_capacity(CHECKSUM_LEN);
    push_base62_fixed(&mut expected, crc32fast::hash(signed.as_bytes()));
    if expected != checksum {
        return Err(Malformed);
    }
    Ok(ParsedCredential {
        kind,
        digest: Digest::of(raw),
    })
}

/// A SHA-256 digest of a credential: what the store keeps and looks up. Not
/// reversible, but still kept out of logs: its `Debug` is redacted.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Digest([u8; 32]);

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Digest([redacted])")
    }
}

impl Digest {
    fn of(text: &str) -> Self {
        Self(Sha256::digest(text.as_bytes()).into())
    }

    /// Wraps a digest read back from the store; `None` if it is not 32 bytes.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(Self)
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Appends `value` as exactly six base62 digits, most significant first.
fn push_base62_fixed(out: &mut String, value: u32) {
    let mut digits = [b'0'; CHECKSUM_LEN];
    let mut rest = u64::from(value);
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(rest % 62) as usize];
        rest /= 62;
    }
    out.extend(digits.iter().map(|&d| d as char));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leak_report_keeps_each_credential_once_and_ignores_the_rest() {
        let pat = Secret::generate(CredentialKind::PersonalAccessToken);
        let session = Secret::generate(CredentialKind::Session);
        let sent = [
            pat.expose(),
            "not a credential",
            session.expose(),
            pat.expose(),
        ];
        let leaked = LeakedCredentials::parse("secrets", &sent).expect("a valid report");
        assert_eq!(leaked.reported(), 4);
        let kept: Vec<_> = leaked
            .credentials()
            .iter()
            .map(|c| (c.kind, c.digest))
            .collect();
        assert_eq!(
            kept,
            [
                (CredentialKind::PersonalAccessToken, pat.digest()),
                (CredentialKind::Session, session.digest()),
            ]
        );
        let nothing = LeakedCredentials::parse("secrets", &["x"]).expect("valid, if useless");
        assert!(nothing.credentials().is_empty());
    }

    #[test]
    fn a_leak_report_holds_one_to_the_most_secrets() {
        let empty: [&str; 0] = [];
        let too_many = vec!["x"; MAX_LEAKED_SECRETS + 1];
        for secrets in [&empty[..], &too_many[..]] {
            let Err(super::super::DomainError::InvalidArgument(violations)) =
                LeakedCredentials::parse("secrets", secrets)
            else {
                panic!("{} secrets accepted", secrets.len());
            };
            assert_eq!(violations[0].field, "secrets");
            assert_eq!(
                violations[0].description,
                format!("must hold 1 to {MAX_LEAKED_SECRETS} credentials")
            );
        }
        let most = vec!["x"; MAX_LEAKED_SECRETS];
        assert!(LeakedCredentials::parse("secrets", &most).is_ok());
    }

    #[test]
    fn generated_credentials_parse_back_with_their_kind_and_digest() {
        for kind in [CredentialKind::Session, CredentialKind::PersonalAccessToken] {
            let secret = Secret::generate(kind);
            assert_eq!(secret.expose().len(), CREDENTIAL_LEN);
            assert!(secret.expose().starts_with(kind.prefix()));
            let parsed = parse(secret.expose()).expect("well-formed");
            assert_eq!(parsed.kind, kind);
            assert_eq!(parsed.digest, secret.digest());
        }
    }

    #[test]
    fn every_single_character_change_is_rejected_or_changes_the_digest() {
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let text = secret.expose();
        for i in 0..text.len() {
            let mut bytes = text.as_bytes().to_vec();
            bytes[i] = if bytes[i] == b'a' { b'b' } else { b'a' };
            let mutated = String::from_utf8(bytes).expect("ascii");
            assert!(parse(&mutated).is_err(), "accepted a typo at {i}");
        }
    }

    #[test]
    fn wrong_shapes_are_malformed() {
        let good = Secret::generate(CredentialKind::Session);
        let text = good.expose();
        assert!(parse("").is_err());
        assert!(parse(&text[..CREDENTIAL_LEN - 1]).is_err());
        assert!(parse(&format!("{text}x")).is_err());
        assert!(parse(&text.replacen("idses_", "idxxx_", 1)).is_err());
        assert!(parse(&format!("Bearer {text}")).is_err());
        let non_ascii = format!("{}é{}", &text[..10], &text[12..]);
        assert!(parse(&non_ascii).is_err());
    }

    #[test]
    fn debug_output_never_contains_the_secret() {
        let secret = Secret::generate(CredentialKind::PersonalAccessToken);
        let shown = format!("{secret:?} {:?}", secret.digest());
        assert!(!shown.contains(&secret.expose()[PREFIX_LEN..]));
    }

    /// Tokens computed outside this code (Python's `zlib.crc32` and
    /// `hashlib.sha256`), pinned: the checksum and the digest of a token
    /// must never change, or every stored token stops matching.
    #[test]
    fn known_tokens_keep_their_checksum_and_digest() {
        for (kind, text, digest) in [
            (
                CredentialKind::PersonalAccessToken,
                "idpat_0123456789ABCDEFGHIJKLMNOPQRSTUV4BIM2a",
                "5e479567a0c46ee76ae6b2f5ed2374d2b56dc7e269297d699c1cd6df8571b474",
            ),
            (
                CredentialKind::Session,
                "idses_0123456789ABCDEFGHIJKLMNOPQRSTUV4XCbxu",
                "e62c168f82278835633226eaeb44271fa53a9f08855c5fc2340e469433de56cd",
            ),
        ] {
            let built = Secret::assemble(kind, "0123456789ABCDEFGHIJKLMNOPQRSTUV");
            assert_eq!(built.expose(), text);
            let parsed = parse(text).expect("well-formed");
            assert_eq!(parsed.kind, kind);
            assert_eq!(hex(parsed.digest.as_bytes()), digest);
            assert_eq!(built.digest(), parsed.digest);
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn checksum_is_six_base62_digits() {
        let mut out = String::new();
        push_base62_fixed(&mut out, u32::MAX);
        assert_eq!(out.len(), 6);
        let mut zero = String::new();
        push_base62_fixed(&mut zero, 0);
        assert_eq!(zero, "000000");
    }
}

/// Properties of the token format over generated inputs (proptest).
#[cfg(test)]
mod properties {
    use proptest::prelude::*;
    use sha2::{Digest as _, Sha256};

    use super::*;

    /// Inverse of `push_base62_fixed`, for the tests only: the service never
    /// needs to read a checksum back, only to compare it.
    fn decode_base62(digits: &str) -> Option<u64> {
        digits.bytes().try_fold(0u64, |acc, d| {
            let digit = BASE62.iter().position(|&b| b == d)?;
            Some(acc * 62 + digit as u64)
        })
    }

    fn kind() -> impl Strategy<Value = CredentialKind> {
        prop_oneof![
            Just(CredentialKind::Session),
            Just(CredentialKind::PersonalAccessToken)
        ]
    }

    /// A token as `Secret::generate` makes them, from a chosen random part.
    fn token() -> impl Strategy<Value = Secret> {
        (kind(), "[0-9A-Za-z]{32}").prop_map(|(kind, random)| Secret::assemble(kind, &random))
    }

    proptest! {
        #[test]
        fn issued_tokens_parse_back_to_their_kind_and_digest(secret in token()) {
            let text = secret.expose();
            prop_assert_eq!(text.len(), CREDENTIAL_LEN);
            prop_assert!(text.starts_with(secret.kind().prefix()));
            let parsed = parse(text).expect("an issued token parses");
            prop_assert_eq!(parsed.kind, secret.kind());
            prop_assert_eq!(parsed.digest, secret.digest());
            // The digest is SHA-256 of the whole text, nothing else: stored
            // digests stay comparable across versions.
            let expected: [u8; 32] = Sha256::digest(text.as_bytes()).into();
            prop_assert_eq!(parsed.digest.as_bytes(), &expected);
            prop_assert_eq!(Digest::from_stored(&expected), Some(parsed.digest));
        }

        #[test]
        fn the_checksum_encoding_round_trips_and_keeps_order(a in any::<u32>(), b in any::<u32>()) {
            let (mut ea, mut eb) = (String::new(), String::new());
            push_base62_fixed(&mut ea, a);
            push_base62_fixed(&mut eb, b);
            prop_assert_eq!(ea.len(), CHECKSUM_LEN);
            prop_assert_eq!(decode_base62(&ea), Some(u64::from(a)));
            // Fixed width, most significant digit first, over an alphabet in
            // ASCII order: the text sorts like the number, so distinct
            // checksums never share an encoding.
            prop_assert_eq!(ea.cmp(&eb), a.cmp(&b));
        }

        #[test]
        fn any_single_character_substitution_is_rejected(
            secret in token(),
            at in 0..CREDENTIAL_LEN,
            replacement in any::<char>(),
        ) {
            let text = secret.expose();
            let original = char::from(text.as_bytes()[at]);
            prop_assume!(replacement != original);
            let mut typo = String::with_capacity(CREDENTIAL_LEN + 4);
            typo.push_str(&text[..at]);
            typo.push(replacement);
            typo.push_str(&text[at + 1..]);
            prop_assert_eq!(parse(&typo), Err(Malformed));
        }

        /// Swapping two adjacent characters: in the random part CRC-32
        /// catches it (a burst of at most 16 bits); in the prefix or the
        /// checksum the text no longer matches. Only a swap across the
        /// random part and the checksum could in principle survive, with a
        /// probability below 1e-10.
        #[test]
        fn any_transposition_of_adjacent_characters_is_rejected(
            secret in token(),
            at in 0..CREDENTIAL_LEN - 1,
        ) {
            let mut bytes = secret.expose().as_bytes().to_vec();
            prop_assume!(bytes[at] != bytes[at + 1]);
            bytes.swap(at, at + 1);
            let swapped = String::from_utf8(bytes).expect("ascii");
            prop_assert_eq!(parse(&swapped), Err(Malformed));
        }

        #[test]
        fn random_strings_are_rejected(raw in any::<String>()) {
            prop_assert_eq!(parse(&raw), Err(Malformed));
        }

        /// A string of the right shape is accepted only with its own
        /// checksum.
        #[test]
        fn well_shaped_strings_need_their_own_checksum(
            kind in kind(),
            random in "[0-9A-Za-z]{32}",
            checksum in "[0-9A-Za-z]{6}",
        ) {
            let candidate = format!("{}{random}{checksum}", kind.prefix());
            let genuine = Secret::assemble(kind, &random);
            prop_assume!(candidate != genuine.expose());
            prop_assert_eq!(parse(&candidate), Err(Malformed));
        }

        #[test]
        fn distinct_tokens_have_distinct_digests(a in token(), b in token()) {
            prop_assume!(a.expose() != b.expose());
            prop_assert_ne!(a.digest(), b.digest());
        }
    }
}
