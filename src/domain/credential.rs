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
        let mut text = String::with_capacity(CREDENTIAL_LEN);
        text.push_str(kind.prefix());
        let mut bytes = [0u8; 64];
        while text.len() < PREFIX_LEN + RANDOM_LEN {
            OsRng.fill_bytes(&mut bytes);
            // Rejection sampling keeps every character equally likely:
            // 248 = 4 * 62, so bytes at or above it are discarded.
            for &b in bytes.iter().filter(|&&b| b < 248) {
                if text.len() == PREFIX_LEN + RANDOM_LEN {
                    break;
                }
                text.push(BASE62[usize::from(b % 62)] as char);
            }
        }
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
