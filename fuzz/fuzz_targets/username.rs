//! The username validator (`domain::account::Username::parse`).
//!
//! Properties: it never panics; it accepts exactly the documented grammar
//! (checked against an independent byte-wise oracle); an accepted username
//! is kept as sent, its uniqueness key is its ASCII lowercase, and both the
//! key and the stored form parse back to the same key (normalisation is
//! idempotent); a rejected one is one `InvalidArgument` violation of the
//! field it was parsed as.

#![no_main]

use identity::domain::account::Username;
use identity_fuzz::{is_username, text, violations};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let raw = text(data);
    match Username::parse("username", &raw) {
        Ok(username) => {
            assert!(is_username(&raw), "accepted {raw:?}");
            assert_eq!(username.as_str(), raw);
            let key = username.key();
            assert_eq!(key, raw.to_ascii_lowercase());
            let again = Username::parse("username", &key).expect("the key is a username");
            assert_eq!(again.key(), key, "the key is not idempotent");
            let stored = Username::from_stored(username.as_str().to_owned());
            assert_eq!(stored, username);
            assert_eq!(
                Username::parse("username", stored.as_str()).ok(),
                Some(username)
            );
        }
        Err(err) => {
            assert!(!is_username(&raw), "rejected {raw:?}");
            let found = violations(err);
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].field, "username");
        }
    }
});
