//! Passwords: Unicode normalisation and the list of common passwords, as a
//! client meets them through `CreateAccount` and `SignIn`.

use tonic::Code;

use crate::both_backends;
use crate::support::{TestApp, assert_status, bearer, pb, sign_in};

/// "Crème brûlée, à la carte" with precomposed accents (NFC).
const COMPOSED: &str = "Cr\u{e8}me br\u{fb}l\u{e9}e, \u{e0} la carte";
/// The same text with each accent a combining mark (NFD), as some
/// keyboards and input methods send it.
const DECOMPOSED: &str = "Cre\u{300}me bru\u{302}le\u{301}e, a\u{300} la carte";

async fn create_person(
    app: &TestApp,
    username: &str,
    password: &str,
) -> Result<pb::Account, tonic::Status> {
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                password: password.into(),
                email: format!("{username}@example.com"),
                kind: pb::AccountKind::Person as i32,
                role: 0,
            },
            &app.operator_token,
        ))
        .await
        .map(|r| r.into_inner().account.expect("account"))
}

async fn a_password_set_in_one_normal_form_signs_in_in_the_other(app: TestApp) {
    assert_ne!(COMPOSED, DECOMPOSED, "the two forms differ as sent");
    create_person(&app, "nfd", DECOMPOSED)
        .await
        .expect("create with NFD");
    create_person(&app, "nfc", COMPOSED)
        .await
        .expect("create with NFC");
    sign_in(&app, "nfd", COMPOSED)
        .await
        .expect("set in NFD, typed in NFC");
    sign_in(&app, "nfc", DECOMPOSED)
        .await
        .expect("set in NFC, typed in NFD");
    sign_in(&app, "nfd", DECOMPOSED)
        .await
        .expect("the same form still works");
    sign_in(&app, "nfc", COMPOSED)
        .await
        .expect("the same form still works");
    let wrong = format!("{DECOMPOSED}!");
    assert_status(
        sign_in(&app, "nfd", &wrong).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
}
both_backends!(a_password_set_in_one_normal_form_signs_in_in_the_other);

async fn passwords_from_the_common_list_are_refused_whatever_their_case(app: TestApp) {
    use tonic_types::StatusExt as _;
    // Entries of the list that the default policy (15 or more
    // characters) would otherwise allow, typed in mixed case.
    for (i, password) in [
        "ManchesterUnited",
        "1qaz2wsx3edc4rfv",
        "Q1W2E3R4T5Y6U7I8",
        "123456789qwerty",
        "iloveyouforever",
    ]
    .into_iter()
    .enumerate()
    {
        let status = assert_status(
            create_person(&app, &format!("common{i}"), password).await,
            Code::InvalidArgument,
            "ERROR_REASON_INVALID_ARGUMENT",
        );
        let details = status.get_error_details();
        let violation = &details.bad_request().expect("BadRequest").field_violations[0];
        assert_eq!(violation.field, "password");
        assert!(
            violation.description.contains("most common"),
            "{password}: {}",
            violation.description
        );
    }
}
both_backends!(passwords_from_the_common_list_are_refused_whatever_their_case);

/// Replaces the password hash of `username_key` outside the service.
async fn set_stored_hash(app: &TestApp, username_key: &str, hash: &str) {
    use sqlx::Connection as _;
    let statement = format!(
        "UPDATE accounts SET password_hash = '{hash}' WHERE username_key = '{username_key}'"
    );
    let url = &app.db.url;
    let updated = if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query(&statement)
            .execute(&mut conn)
            .await
            .expect("update")
            .rows_affected()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query(&statement)
            .execute(&mut conn)
            .await
            .expect("update")
            .rows_affected()
    };
    assert_eq!(updated, 1);
}

async fn a_password_hashed_before_normalisation_still_signs_in_as_it_was_typed(app: TestApp) {
    use argon2::{
        Algorithm, Argon2, Params, PasswordHasher as _, Version, password_hash::SaltString,
    };
    create_person(&app, "legacy", COMPOSED)
        .await
        .expect("create");
    // What an earlier release stored: the decomposed form hashed as sent,
    // with no normalisation marker.
    let params = Params::new(19_456, 2, 1, None).expect("params");
    let salt = SaltString::encode_b64(b"sixteen byte salt").expect("salt");
    let legacy = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(DECOMPOSED.as_bytes(), &salt)
        .expect("hash")
        .to_string();
    assert!(!legacy.contains("data="), "{legacy}");
    set_stored_hash(&app, "legacy", &legacy).await;
    sign_in(&app, "legacy", DECOMPOSED)
        .await
        .expect("typed as it was when set");
    assert_status(
        sign_in(&app, "legacy", &format!("{DECOMPOSED}!")).await,
        Code::Unauthenticated,
        "ERROR_REASON_SIGN_IN_FAILED",
    );
}
both_backends!(a_password_hashed_before_normalisation_still_signs_in_as_it_was_typed);
