//! The request conversion layer: arbitrary bytes decoded (with prost, as
//! tonic does) as each request message, then parsed by the very function its
//! handler calls (`api::parse`, one parser per request message).
//!
//! Input: one byte choosing the message, then its encoding. Properties:
//! nothing panics; conversion is deterministic; a rejected request is
//! `InvalidArgument` whose violations name fields of that message (repeated
//! ones with an index in range) and, for a field that carries a password
//! or a token, say only fixed sentences, never the secret; an accepted request keeps what it was sent (names as sent, ids in
//! canonical form and idempotent, timestamps to the microsecond, scopes
//! normalised, enum filters one for one); and the `Debug` of a
//! secret-bearing message does not depend on its secrets.

#![no_main]

use std::fmt::Debug;

use identity::{
    api::{parse, pb},
    domain::{
        DomainError,
        account::{AccountId, AccountKind, Role},
        credential::{self, MAX_LEAKED_SECRETS},
        page::{MAX_PAGE_SIZE, PageRequest},
        password::PasswordPolicy,
        scope::Scopes,
        service::AccountLookup,
        time::Timestamp,
        token::TokenId,
    },
};
use identity_fuzz::{names_a_field, violations};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use sha2::{Digest as _, Sha256};

/// The caller of `ChangePassword`: long enough that the password policy's
/// "not the username" rule can be met by a password of the default length.
const CALLER: &str = "operator-on-call";

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let policy = PasswordPolicy::default();
    match selector % 20 {
        0 => create_account(bytes, &policy),
        1 => get_account(bytes),
        2 => list_accounts(bytes),
        3 => sign_in(bytes, &policy),
        4 => {
            // No fields: anything that decodes is accepted.
            let _ = pb::SignOutRequest::decode(bytes);
        }
        5 => change_password(bytes, &policy),
        6 => by_account_id(bytes, parse::sign_out_everywhere, |r| &r.account_id),
        7 => by_account_id(bytes, parse::disable_account, |r| &r.account_id),
        8 => by_account_id(bytes, parse::enable_account, |r| &r.account_id),
        9 => by_account_id(bytes, parse::delete_account, |r| &r.account_id),
        10 => create_token(bytes),
        11 => by_token_id(bytes, parse::get_token, |r| &r.token_id),
        12 => list_tokens(bytes),
        13 => by_token_id(bytes, parse::revoke_token, |r| &r.token_id),
        14 => verify_token(bytes),
        15 => by_token_id(bytes, parse::rotate_token, |r| &r.token_id),
        16 => revoke_leaked_token(bytes),
        17 => list_audit_events(bytes),
        18 => renew_token(bytes),
        _ => {
            // No fields: anything that decodes is accepted.
            let _ = pb::GetCallerRequest::decode(bytes);
        }
    }
});

/// Converts twice (the conversion must be a function of the request) and
/// returns the first result.
fn twice<T: Debug>(convert: impl Fn() -> Result<T, DomainError>) -> Result<T, DomainError> {
    let first = convert();
    assert_eq!(
        format!("{first:?}"),
        format!("{:?}", convert()),
        "conversion is not deterministic"
    );
    first
}

/// Checks a rejection: typed, and naming only fields of the message. A
/// violation of a field that carries a secret (`secret_fields`) must say one
/// of the fixed sentences below, so it cannot repeat the secret. (Searching
/// the text for the secret instead does not work: the fuzzer learns the
/// messages from that very search and sends them back as passwords.)
fn rejected(err: DomainError, names: &[&str], repeated: &[(&str, usize)], secret_fields: &[&str]) {
    rejected_fields(err, names, repeated, secret_fields);
}

/// [`rejected`], returning the fields named.
fn rejected_fields(
    err: DomainError,
    names: &[&str],
    repeated: &[(&str, usize)],
    secret_fields: &[&str],
) -> Vec<String> {
    let policy = PasswordPolicy::default();
    let sentences = [
        format!("must be at least {} characters", policy.min_chars),
        format!("must be at most {} characters", policy.max_chars),
        "is one of the most common passwords; choose another".to_owned(),
        "must not be the username".to_owned(),
        "is required".to_owned(),
        "must be empty for robot accounts, which never sign in".to_owned(),
        format!("must hold 1 to {MAX_LEAKED_SECRETS} credentials"),
    ];
    let found = violations(err);
    for v in &found {
        assert!(
            names_a_field(&v.field, names, repeated),
            "violation of {:?}, not a field of the request",
            v.field
        );
        if secret_fields.contains(&v.field.as_str()) {
            assert!(
                sentences.contains(&v.description),
                "{}: not one of the fixed sentences",
                v.field
            );
        }
    }
    found.into_iter().map(|v| v.field).collect()
}

/// `Debug` of a secret-bearing message must not depend on its secrets.
fn redacted<M: Debug>(message: &M, without_secrets: &M) {
    assert_eq!(
        format!("{message:?}"),
        format!("{without_secrets:?}"),
        "Debug shows a secret"
    );
}

/// A client timestamp, accepted to the microsecond inside protobuf's range,
/// 0001-01-01T00:00:00Z ..= 9999-12-31T23:59:59.999999999Z, refused
/// otherwise.
fn check_timestamp(sent: Option<&prost_types::Timestamp>, got: Option<Timestamp>) {
    match (sent, got) {
        (None, None) => {}
        (Some(ts), Some(got)) => {
            assert!(timestamp_in_range(ts), "accepted {ts:?}");
            assert_eq!(
                got.to_seconds_nanos(),
                (ts.seconds, ts.nanos / 1_000 * 1_000)
            );
            let (s, n) = got.to_seconds_nanos();
            assert_eq!(Timestamp::from_seconds_nanos(s, n), Some(got));
        }
        (sent, got) => panic!("sent {sent:?}, got {got:?}"),
    }
}

fn timestamp_in_range(ts: &prost_types::Timestamp) -> bool {
    const MIN: i64 = -62_135_596_800;
    const MAX: i64 = 253_402_300_799;
    (0..1_000_000_000).contains(&ts.nanos) && (MIN..=MAX).contains(&ts.seconds)
}

/// A timestamp field is reported exactly when it was sent out of range.
fn timestamp_reported(fields: &[String], name: &str, sent: Option<&prost_types::Timestamp>) {
    let out_of_range = sent.is_some_and(|ts| !timestamp_in_range(ts));
    assert_eq!(
        fields.iter().any(|f| f == name),
        out_of_range,
        "{name}: {sent:?}"
    );
}

fn page(page: &PageRequest, sent_size: i32, sent_token: &str) {
    assert!((1..=MAX_PAGE_SIZE).contains(&page.size));
    if sent_size > 0 {
        assert_eq!(page.size, (sent_size as u32).min(MAX_PAGE_SIZE));
    }
    assert_eq!(page.after.is_none(), sent_token.is_empty());
    if let Some(after) = &page.after {
        AccountId::parse("after", after).expect("a page token names an id");
    }
}

/// An accepted id is the UUID sent, in canonical form (lowercase,
/// hyphenated), which parses back to itself, as does its uppercase spelling.
fn canonical_account_id(id: &AccountId, sent: &str) {
    let text = id.as_str();
    assert_eq!(text.len(), 36);
    assert!(text.bytes().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => b == b'-',
        _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
    }));
    let hex = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    assert!(hex(sent).ends_with(&hex(text)), "{sent:?} is not {text}");
    let again = AccountId::parse("account_id", text).expect("canonical id parses");
    assert_eq!(&again, id, "canonical form is not idempotent");
    let upper = AccountId::parse("account_id", &text.to_ascii_uppercase()).expect("any case");
    assert_eq!(&upper, id);
}

fn create_account(bytes: &[u8], policy: &PasswordPolicy) {
    let Ok(req) = pb::CreateAccountRequest::decode(bytes) else {
        return;
    };
    redacted(
        &req,
        &pb::CreateAccountRequest {
            password: String::new(),
            ..req.clone()
        },
    );
    match twice(|| parse::create_account(req.clone(), policy)) {
        Ok(new) => {
            assert_eq!(new.username.as_str(), req.username);
            assert_eq!(new.email.as_str(), req.email);
            let kind = match pb::AccountKind::try_from(req.kind) {
                Ok(pb::AccountKind::Person) => AccountKind::Person,
                Ok(pb::AccountKind::Robot) => AccountKind::Robot,
                other => panic!("accepted account kind {other:?}"),
            };
            assert_eq!(new.kind, kind);
            let role = match pb::AccountRole::try_from(req.role) {
                Ok(pb::AccountRole::Operator) => Role::Operator,
                Ok(pb::AccountRole::User | pb::AccountRole::Unspecified) => Role::User,
                Err(_) => panic!("accepted role {}", req.role),
            };
            assert_eq!(new.role, role);
            // Persons have a password; robots never do, and must not send one.
            assert_eq!(new.password.is_some(), kind == AccountKind::Person);
            if kind == AccountKind::Robot {
                assert!(req.password.is_empty());
            }
        }
        Err(err) => rejected(
            err,
            &["username", "password", "email", "kind", "role"],
            &[],
            &["password"],
        ),
    }
}

fn get_account(bytes: &[u8]) {
    use pb::get_account_request::Lookup;
    let Ok(req) = pb::GetAccountRequest::decode(bytes) else {
        return;
    };
    match twice(|| parse::get_account(req.clone())) {
        Ok(AccountLookup::Id(id)) => {
            let Some(Lookup::AccountId(sent)) = &req.lookup else {
                panic!("an id lookup from {:?}", req.lookup)
            };
            canonical_account_id(&id, sent);
        }
        Ok(AccountLookup::Username(name)) => {
            assert_eq!(req.lookup, Some(Lookup::Username(name.as_str().to_owned())));
        }
        Err(err) => rejected(err, &["lookup", "account_id", "username"], &[], &[]),
    }
}

fn list_accounts(bytes: &[u8]) {
    let Ok(req) = pb::ListAccountsRequest::decode(bytes) else {
        return;
    };
    match twice(|| parse::list_accounts(&req)) {
        Ok(p) => page(&p, req.page_size, &req.page_token),
        Err(err) => rejected(err, &["page_size", "page_token"], &[], &[]),
    }
}

fn sign_in(bytes: &[u8], policy: &PasswordPolicy) {
    let Ok(req) = pb::SignInRequest::decode(bytes) else {
        return;
    };
    redacted(
        &req,
        &pb::SignInRequest {
            password: String::new(),
            ..req.clone()
        },
    );
    match twice(|| parse::sign_in(req.clone(), policy)) {
        Ok((username, password)) => {
            assert_eq!(username.as_str(), req.username);
            assert_eq!(format!("{password:?}"), "Password([redacted])");
        }
        Err(err) => rejected(err, &["username", "password"], &[], &["password"]),
    }
}

fn change_password(bytes: &[u8], policy: &PasswordPolicy) {
    let Ok(req) = pb::ChangePasswordRequest::decode(bytes) else {
        return;
    };
    redacted(&req, &pb::ChangePasswordRequest::default());
    match twice(|| parse::change_password(req.clone(), policy, CALLER)) {
        Ok(_) => assert!(!req.new_password.eq_ignore_ascii_case(CALLER)),
        Err(err) => rejected(
            err,
            &["current_password", "new_password"],
            &[],
            &["current_password", "new_password"],
        ),
    }
}

/// A request whose one field is an account id, parsed by `parse` (the
/// handler's parser); `field` reads what was sent.
fn by_account_id<M: Message + Default>(
    bytes: &[u8],
    parse: fn(&M) -> Result<AccountId, DomainError>,
    field: impl Fn(&M) -> &String,
) {
    let Ok(req) = M::decode(bytes) else {
        return;
    };
    let sent = field(&req);
    match twice(|| parse(&req)) {
        Ok(id) => canonical_account_id(&id, sent),
        Err(err) => rejected(err, &["account_id"], &[], &[]),
    }
}

/// A request whose one field is a token id, parsed by `parse` (the
/// handler's parser); `field` reads what was sent.
fn by_token_id<M: Message + Default>(
    bytes: &[u8],
    parse: fn(&M) -> Result<TokenId, DomainError>,
    field: impl Fn(&M) -> &String,
) {
    let Ok(req) = M::decode(bytes) else {
        return;
    };
    let sent = field(&req);
    match twice(|| parse(&req)) {
        Ok(id) => {
            assert!(!sent.is_empty());
            assert_eq!(id.as_str().len(), 36);
            let again = TokenId::parse("token_id", id.as_str()).expect("canonical id parses");
            assert_eq!(again, id);
        }
        Err(err) => rejected(err, &["token_id"], &[], &[]),
    }
}

fn scopes_normalised(scopes: &Scopes, sent: &[String]) {
    let names: Vec<&str> = scopes.names().collect();
    assert!(names.windows(2).all(|w| w[0] < w[1]));
    assert!(names.iter().all(|n| sent.iter().any(|s| s == n)));
    assert!(sent.iter().all(|s| names.contains(&s.as_str())));
    assert_eq!(Scopes::parse("scopes", &names).ok().as_ref(), Some(scopes));
}

fn create_token(bytes: &[u8]) {
    let Ok(req) = pb::CreateTokenRequest::decode(bytes) else {
        return;
    };
    let now = Timestamp::from_micros(1_800_000_000_000_000);
    // The end of a lifetime sent as `ttl`, by an independent reckoning in
    // i128: `None` when the duration is not positive or ends after 9999.
    let ttl_end = req.ttl.as_ref().map(|d| {
        let valid = d.seconds >= 0 && (0..1_000_000_000).contains(&d.nanos);
        let micros = i128::from(d.seconds) * 1_000_000 + i128::from(d.nanos / 1_000);
        let end = i128::from(now.as_micros()) + micros;
        (valid && micros > 0 && end <= i128::from(Timestamp::MAX.as_micros()))
            .then(|| Timestamp::from_micros(end as i64))
    });
    match twice(|| parse::create_token(req.clone(), now)) {
        Ok(token) => {
            canonical_account_id(&token.account_id, &req.account_id);
            assert_eq!(token.name.as_str(), req.name);
            scopes_normalised(&token.scopes, &req.scopes);
            assert!(token.resources.names().all(|r| req.resources.iter().any(|s| s == r)));
            assert!(req.resources.iter().all(|s| token.resources.names().any(|r| r == s)));
            match ttl_end {
                None => check_timestamp(req.expire_time.as_ref(), token.expire_time),
                Some(end) => {
                    assert!(
                        req.expire_time.is_none(),
                        "expire_time and ttl both accepted"
                    );
                    assert_eq!(token.expire_time, Some(end.expect("accepted ttl")));
                }
            }
            assert_eq!(token.never_expires, req.never_expires);
            assert_eq!(token.max_uses, req.max_uses);
        }
        Err(err) => {
            let fields = rejected_fields(
                err,
                &["account_id", "name", "scopes", "resources", "expire_time", "ttl"],
                &[("scopes", req.scopes.len()), ("resources", req.resources.len())],
                &[],
            );
            timestamp_reported(&fields, "expire_time", req.expire_time.as_ref());
            let ttl_bad = match ttl_end {
                None => false,
                Some(None) => true,
                Some(Some(_)) => req.expire_time.is_some(),
            };
            assert_eq!(
                fields.iter().any(|f| f == "ttl"),
                ttl_bad,
                "ttl: {:?}",
                req.ttl
            );
        }
    }
}

fn list_tokens(bytes: &[u8]) {
    let Ok(req) = pb::ListTokensRequest::decode(bytes) else {
        return;
    };
    let now = Timestamp::from_micros(1_800_000_000_000_000);
    match twice(|| parse::list_tokens(&req, now)) {
        Ok((account, filter, p)) => {
            match &account {
                None => assert!(req.account_id.is_empty()),
                Some(id) => canonical_account_id(id, &req.account_id),
            }
            assert_eq!(filter.now, now);
            assert_eq!(filter.states.len(), req.states.len());
            check_timestamp(req.expire_before.as_ref(), filter.expire_before);
            check_timestamp(req.last_used_before.as_ref(), filter.last_used_before);
            page(&p, req.page_size, &req.page_token);
        }
        Err(err) => {
            let fields = rejected_fields(
                err,
                &[
                    "account_id",
                    "expire_before",
                    "last_used_before",
                    "page_size",
                    "page_token",
                ],
                &[("states", req.states.len())],
                &[],
            );
            // The page is parsed only once the rest is valid.
            if !fields.iter().any(|f| f.starts_with("page_")) {
                timestamp_reported(&fields, "expire_before", req.expire_before.as_ref());
                timestamp_reported(&fields, "last_used_before", req.last_used_before.as_ref());
            }
        }
    }
}

fn verify_token(bytes: &[u8]) {
    let Ok(req) = pb::VerifyTokenRequest::decode(bytes) else {
        return;
    };
    redacted(
        &req,
        &pb::VerifyTokenRequest {
            token: String::new(),
            ..req.clone()
        },
    );
    match twice(|| parse::verify_token(&req)) {
        Ok(query) => {
            scopes_normalised(&query.scopes, &req.required_scopes);
            assert!(!query.resources.names().any(|r| r.ends_with('*')));
            assert_eq!(query.client.address, req.client_address);
            assert_eq!(query.credential, credential::parse(&req.token));
            if let Ok(parsed) = query.credential {
                assert!(req.token.starts_with(parsed.kind.prefix()));
            }
        }
        Err(err) => rejected(
            err,
            &["required_scopes", "required_resources", "client_address"],
            &[
                ("required_scopes", req.required_scopes.len()),
                ("required_resources", req.required_resources.len()),
            ],
            &[],
        ),
    }
}

fn revoke_leaked_token(bytes: &[u8]) {
    let Ok(req) = pb::RevokeLeakedTokenRequest::decode(bytes) else {
        return;
    };
    redacted(
        &req,
        &pb::RevokeLeakedTokenRequest {
            secrets: vec![String::new(); req.secrets.len()],
        },
    );
    match twice(|| parse::revoke_leaked_token(&req)) {
        Ok(leaked) => {
            assert!(!req.secrets.is_empty());
            assert_eq!(leaked.reported(), req.secrets.len());
            let parsed = leaked.credentials();
            assert!(parsed.len() <= req.secrets.len());
            assert!(
                parsed
                    .iter()
                    .enumerate()
                    .all(|(i, p)| !parsed[..i].contains(p)),
                "a credential kept twice"
            );
            for p in parsed {
                assert!(req.secrets.iter().any(|s| {
                    let digest: [u8; 32] = Sha256::digest(s.as_bytes()).into();
                    &digest == p.digest.as_bytes()
                }));
            }
        }
        Err(err) => {
            rejected(err, &["secrets"], &[], &["secrets"]);
        }
    }
}

fn list_audit_events(bytes: &[u8]) {
    let Ok(req) = pb::ListAuditEventsRequest::decode(bytes) else {
        return;
    };
    match twice(|| parse::list_audit_events(&req)) {
        Ok((filter, p)) => {
            match &filter.account {
                None => assert!(req.account_id.is_empty()),
                Some(id) => canonical_account_id(id, &req.account_id),
            }
            // AUDIT_EVENT_TYPE_UNSPECIFIED (0) is ignored, as documented.
            assert_eq!(
                filter.types.len(),
                req.types.iter().filter(|&&t| t != 0).count()
            );
            check_timestamp(req.start_time.as_ref(), filter.start_time);
            check_timestamp(req.end_time.as_ref(), filter.end_time);
            if let (Some(start), Some(end)) = (filter.start_time, filter.end_time) {
                assert!(start <= end);
            }
            assert_eq!(p.after.is_none(), req.page_token.is_empty());
        }
        Err(err) => rejected(
            err,
            &[
                "account_id",
                "start_time",
                "end_time",
                "page_size",
                "page_token",
            ],
            &[("types", req.types.len())],
            &[],
        ),
    }
}

fn renew_token(bytes: &[u8]) {
    let Ok(req) = pb::RenewTokenRequest::decode(bytes) else {
        return;
    };
    match twice(|| parse::renew_token(&req)) {
        Ok((id, expire_time, never_expires)) => {
            let again = TokenId::parse("token_id", id.as_str()).expect("canonical id parses");
            assert_eq!(again, id);
            check_timestamp(req.expire_time.as_ref(), expire_time);
            assert_eq!(never_expires, req.never_expires);
        }
        Err(err) => {
            let fields = rejected_fields(err, &["token_id", "expire_time"], &[], &[]);
            timestamp_reported(&fields, "expire_time", req.expire_time.as_ref());
        }
    }
}
