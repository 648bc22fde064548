//! The password policy (`domain::password::Password::new_checked` for new
//! passwords, `Password::offered` at sign-in); never argon2.
//!
//! Input: one byte choosing the policy's minimum (8 to 256, as the setting
//! allows), then `username\npassword` (no newline: no username). Properties:
//! nothing panics; the verdict and its reason follow the documented policy
//! in its order (length in Unicode characters of the NFKC form, then the
//! common-password list, then the username), checked against an independent
//! oracle; a
//! rejection is one `InvalidArgument` violation of the field, whose
//! description is one of the policy's fixed sentences, so it can never
//! repeat the password; an accepted password's `Debug` is redacted.

#![no_main]

use identity::domain::password::{Password, PasswordPolicy};
use identity_fuzz::{is_common_password, text, violations};
use libfuzzer_sys::fuzz_target;
use unicode_normalization::UnicodeNormalization as _;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let policy = PasswordPolicy {
        min_chars: 8 + usize::from(first) % 249,
        max_chars: 256,
    };
    let rest = text(rest);
    let (username, password) = rest.split_once('\n').unwrap_or(("", &rest));
    // The service measures and compares the NFKC form; input of more than
    // four times the maximum is refused before it is normalised.
    let raw_chars = password.chars().count();
    let oversized = raw_chars > policy.max_chars * 4;
    let normalized: String = password.nfkc().collect();
    let chars = normalized.chars().count();

    let too_long = format!("must be at most {} characters", policy.max_chars);
    let expected = if oversized {
        Some(too_long.clone())
    } else if chars < policy.min_chars {
        Some(format!("must be at least {} characters", policy.min_chars))
    } else if chars > policy.max_chars {
        Some(too_long.clone())
    } else if is_common_password(&normalized) {
        Some("is one of the most common passwords; choose another".to_owned())
    } else if !username.is_empty() && normalized.eq_ignore_ascii_case(username) {
        Some("must not be the username".to_owned())
    } else {
        None
    };
    check(
        Password::new_checked("new_password", password.to_owned(), &policy, username),
        "new_password",
        expected,
    );

    let expected = if password.is_empty() {
        Some("is required".to_owned())
    } else if oversized || chars > policy.max_chars {
        Some(too_long)
    } else {
        None
    };
    check(
        Password::offered("password", password.to_owned(), &policy),
        "password",
        expected,
    );
});

fn check(
    result: Result<Password, identity::domain::DomainError>,
    field: &str,
    expected: Option<String>,
) {
    match (result, expected) {
        (Ok(password), None) => assert_eq!(format!("{password:?}"), "Password([redacted])"),
        (Ok(_), Some(why)) => panic!("{field}: accepted, but it {why}"),
        (Err(err), expected) => {
            let found = violations(err);
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].field, field);
            assert_eq!(Some(&found[0].description), expected.as_ref(), "{field}");
        }
    }
}
