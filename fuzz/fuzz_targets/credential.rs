//! The credential parser (`domain::credential::parse`) on arbitrary text.
//!
//! Properties: it never panics; it accepts exactly what an independent
//! oracle (bitwise CRC-32, own base62) accepts; an accepted token's kind is
//! its prefix and its digest is SHA-256 of the whole text; parsing is
//! deterministic; and every single-character substitution and adjacent
//! transposition of an accepted token is rejected.

#![no_main]

use identity::domain::credential::{CREDENTIAL_LEN, CredentialKind, Malformed, parse};
use identity_fuzz::{is_credential, text};
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};

fuzz_target!(|data: &[u8]| {
    let raw = text(data);
    let parsed = parse(&raw);
    assert_eq!(parsed, parse(&raw), "parse is not deterministic");
    assert_eq!(
        parsed.is_ok(),
        is_credential(&raw),
        "disagrees with the oracle"
    );
    let Ok(credential) = parsed else {
        return;
    };

    assert_eq!(raw.len(), CREDENTIAL_LEN);
    let prefix = match credential.kind {
        CredentialKind::Session => "idses_",
        CredentialKind::PersonalAccessToken => "idpat_",
    };
    assert!(raw.starts_with(prefix), "kind does not match the prefix");
    assert_eq!(credential.kind.prefix(), prefix);
    let digest: [u8; 32] = Sha256::digest(raw.as_bytes()).into();
    assert_eq!(
        credential.digest.as_bytes(),
        &digest,
        "digest is not SHA-256 of the text"
    );

    // Typos are refused by the checksum alone. The swap across the random
    // part and the checksum (37, 38) is the one CRC-32 does not rule out
    // outright (chance below 1e-10), so it is left to the oracle check above.
    let bytes = raw.as_bytes();
    for at in 0..CREDENTIAL_LEN {
        let mut typo = bytes.to_vec();
        typo[at] = if typo[at] == b'z' { b'0' } else { typo[at] + 1 };
        let typo = String::from_utf8(typo).expect("ascii");
        assert_eq!(
            parse(&typo),
            Err(Malformed),
            "accepted a substitution at {at}"
        );
        if at + 1 < CREDENTIAL_LEN && at != 37 && bytes[at] != bytes[at + 1] {
            let mut swapped = bytes.to_vec();
            swapped.swap(at, at + 1);
            let swapped = String::from_utf8(swapped).expect("ascii");
            assert_eq!(
                parse(&swapped),
                Err(Malformed),
                "accepted a transposition at {at}"
            );
        }
    }
});
