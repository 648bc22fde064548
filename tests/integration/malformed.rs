//! Malformed requests through the real server: bytes that are not a valid
//! message, messages over the size limit, empty and huge fields, SQL
//! metacharacters, Unicode lookalike usernames, out-of-range timestamps,
//! unknown enum values, bad page sizes and tokens, and too many scopes or
//! secrets. Each must be refused with a clear status (INVALID_ARGUMENT with
//! the offending fields in a BadRequest, or RESOURCE_EXHAUSTED for a message
//! over the limit), never INTERNAL, and must leave everything stored as it
//! was: every case compares the accounts, tokens and audit log listed through
//! the API before and after.

use std::{
    future::Future,
    time::{SystemTime, UNIX_EPOCH},
};

use prost::{
    Message as _,
    bytes::{Buf as _, BufMut as _},
};
use tonic::{
    Code, Request, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};
use tonic_types::StatusExt as _;

use crate::on_both_backends;
use crate::support::{Backend, PASSWORD, TestApp, bearer, pb, reason};

// ---------------------------------------------------------------------------
// What is stored, as the API lists it.

/// Everything a malformed request could have changed.
#[derive(Debug, PartialEq)]
struct Snapshot {
    accounts: Vec<pb::Account>,
    tokens: Vec<pb::Token>,
    events: Vec<pb::AuditEvent>,
}

/// Lists every account, every account's tokens and the whole audit log, as
/// the operator. The last use of a token is left out: authenticating a call
/// legitimately records it (the operator's own token, on every call here).
async fn snapshot(app: &TestApp) -> Snapshot {
    let accounts = app
        .accounts()
        .list_accounts(bearer(
            pb::ListAccountsRequest {
                page_size: 1000,
                page_token: String::new(),
            },
            &app.operator_token,
        ))
        .await
        .expect("list accounts")
        .into_inner()
        .accounts;
    let mut tokens = Vec::new();
    for account in &accounts {
        let listed = app
            .tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: account.account_id.clone(),
                    page_size: 1000,
                    ..Default::default()
                },
                &app.operator_token,
            ))
            .await
            .expect("list tokens")
            .into_inner()
            .tokens;
        tokens.extend(listed.into_iter().map(|mut t| {
            t.last_used_time = None;
            t.last_used_address.clear();
            t
        }));
    }
    let events = pb::audit_service_client::AuditServiceClient::new(app.channel.clone())
        .list_audit_events(bearer(
            pb::ListAuditEventsRequest {
                page_size: 1000,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("list audit events")
        .into_inner()
        .events;
    Snapshot {
        accounts,
        tokens,
        events,
    }
}

/// Runs `call` (a future not yet started) and asserts that it changed
/// nothing stored.
async fn unchanged<T>(app: &TestApp, label: &str, call: impl Future<Output = T>) -> T {
    let before = snapshot(app).await;
    let out = call.await;
    assert_eq!(
        snapshot(app).await,
        before,
        "{label}: the request changed stored data"
    );
    out
}

/// Asserts that `result` is INVALID_ARGUMENT with `expected_reason`, that its
/// BadRequest names each of `fields`, and that its message does not echo a
/// huge input.
#[track_caller]
fn assert_refused<T: std::fmt::Debug>(
    label: &str,
    result: Result<T, Status>,
    expected_reason: &str,
    fields: &[&str],
) -> Status {
    let status = match result {
        Ok(value) => panic!("{label}: should have failed, got {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::InvalidArgument,
        "{label}: unexpected status {status:?}"
    );
    assert_eq!(
        reason(&status),
        expected_reason,
        "{label}: unexpected reason in {status:?}"
    );
    let named = violated_fields(&status);
    for field in fields {
        assert!(
            named.iter().any(|f| f == field),
            "{label}: BadRequest should name {field:?}, names {named:?} ({status:?})"
        );
    }
    assert!(
        status.message().len() < 2_000,
        "{label}: the message must not echo the input ({} bytes)",
        status.message().len()
    );
    status
}

/// [`assert_refused`] with the plain INVALID_ARGUMENT reason.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    label: &str,
    result: Result<T, Status>,
    fields: &[&str],
) -> Status {
    assert_refused(label, result, "ERROR_REASON_INVALID_ARGUMENT", fields)
}

/// The fields a status's BadRequest detail names.
fn violated_fields(status: &Status) -> Vec<String> {
    status
        .get_error_details()
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default()
}

fn now_seconds() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs(),
    )
    .expect("fits")
}

// ---------------------------------------------------------------------------
// Raw protobuf on the wire: a client that sends bytes as they are.

/// A codec that sends and receives raw bytes, to put on the wire what no
/// generated client would.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// Sends `body` as the request message of `method` (such as
/// `/identity.v1.AccountsService/CreateAccount`), with `token` as bearer if
/// given, and returns the raw response message.
async fn raw_call(
    app: &TestApp,
    method: &'static str,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(app.channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let request = match token {
        Some(token) => bearer(body, token),
        None => Request::new(body),
    };
    grpc.unary(
        request,
        http::uri::PathAndQuery::from_static(method),
        RawCodec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// A protobuf varint.
fn varint(mut value: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

/// A length-delimited field (a string, bytes or a message): key, length,
/// bytes.
fn delimited(field: u64, bytes: &[u8]) -> Vec<u8> {
    let mut out = varint(field << 3 | 2);
    out.extend(varint(bytes.len() as u64));
    out.extend_from_slice(bytes);
    out
}

/// A varint field.
fn varint_field(field: u64, value: u64) -> Vec<u8> {
    let mut out = varint(field << 3);
    out.extend(varint(value));
    out
}

const CREATE_ACCOUNT: &str = "/identity.v1.AccountsService/CreateAccount";
const SIGN_IN: &str = "/identity.v1.AccountsService/SignIn";
const CREATE_TOKEN: &str = "/identity.v1.TokensService/CreateToken";
const VERIFY_TOKEN: &str = "/identity.v1.TokensService/VerifyToken";
const REVOKE_LEAKED: &str = "/identity.v1.TokensService/RevokeLeakedToken";
const LIST_AUDIT_EVENTS: &str = "/identity.v1.AuditService/ListAuditEvents";

/// Byte sequences that are not UTF-8: a stray continuation byte, bytes that
/// never occur, an overlong `/`, a UTF-16 surrogate, a truncated sequence.
const NOT_UTF8: &[&[u8]] = &[
    b"ali\x80ce",
    b"\xff\xfe",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"caf\xc3",
];

// ---------------------------------------------------------------------------
// Bytes that are not a valid message.

on_both_backends! {
    async fn undecodable_requests_are_invalid_argument_and_change_nothing(app: TestApp) {
        let robot = app.robot("ci-bot").await;
        let ops = Some(app.operator_token.as_str());
        let robot_kind = varint_field(4, pb::AccountKind::Robot as u64);
        for bad in NOT_UTF8 {
            let label = format!("{bad:x?}");
            // CreateAccountRequest.username, then .email.
            let body = [delimited(1, bad), robot_kind.clone()].concat();
            let result = unchanged(&app, &label, raw_call(&app, CREATE_ACCOUNT, body, ops)).await;
            assert_invalid(&format!("username {label}"), result, &["username"]);
            let body = [
                delimited(1, b"robot2"),
                delimited(3, bad),
                robot_kind.clone(),
            ]
            .concat();
            let result = unchanged(&app, &label, raw_call(&app, CREATE_ACCOUNT, body, ops)).await;
            assert_invalid(&format!("email {label}"), result, &["email"]);
            // CreateTokenRequest.name, then one of its scopes.
            let account = delimited(1, robot.account_id.as_bytes());
            let body = [account.clone(), delimited(2, bad)].concat();
            let result = unchanged(&app, &label, raw_call(&app, CREATE_TOKEN, body, ops)).await;
            assert_invalid(&format!("name {label}"), result, &["name"]);
            let body = [
                account,
                delimited(2, b"ci"),
                delimited(3, b"tokens:read"),
                delimited(3, bad),
            ]
            .concat();
            let result = unchanged(&app, &label, raw_call(&app, CREATE_TOKEN, body, ops)).await;
            assert_invalid(&format!("scopes {label}"), result, &["scopes"]);
            // SignIn needs no credential: its username, then its password.
            let body = [delimited(1, bad), delimited(2, PASSWORD.as_bytes())].concat();
            let result = unchanged(&app, &label, raw_call(&app, SIGN_IN, body, None)).await;
            assert_invalid(&format!("sign-in username {label}"), result, &["username"]);
            let body = [delimited(1, b"ci-bot"), delimited(2, bad)].concat();
            let result = unchanged(&app, &label, raw_call(&app, SIGN_IN, body, None)).await;
            assert_invalid(&format!("sign-in password {label}"), result, &["password"]);
            // The credential VerifyToken checks.
            let body = delimited(1, bad);
            let result = unchanged(&app, &label, raw_call(&app, VERIFY_TOKEN, body, ops)).await;
            assert_invalid(&format!("verify {label}"), result, &["token"]);
            // A page token.
            let body = delimited(4, bad);
            let result = unchanged(&app, &label, raw_call(&app, LIST_AUDIT_EVENTS, body, ops)).await;
            assert_invalid(&format!("page_token {label}"), result, &["page_token"]);
        }
        // A leak report (anonymous) with one undecodable secret.
        let body = [delimited(1, b"idpat_whatever"), delimited(1, NOT_UTF8[0])].concat();
        let result = unchanged(&app, "leak", raw_call(&app, REVOKE_LEAKED, body, None)).await;
        assert_invalid("leak report", result, &["secrets"]);

        // Broken framing inside the message, and a broken nested message.
        let structural: &[(&str, Vec<u8>, &[&str])] = &[
            ("truncated varint", vec![0x20, 0xff], &["kind"]),
            ("length past the end", vec![0x0a, 0x10, b'a'], &["username"]),
            (
                "string sent as a varint",
                [varint_field(1, 7), robot_kind.clone()].concat(),
                &["username"],
            ),
            ("enum sent as a string", delimited(4, b"ROBOT"), &["kind"]),
            ("field number 0", vec![0x00, 0x01], &[]),
            ("wire type 7", vec![0x0f], &[]),
            ("end group without start", vec![0x0c], &[]),
            ("a lone key", vec![0x0a], &[]),
        ];
        for (label, body, fields) in structural {
            let result = unchanged(
                &app,
                label,
                raw_call(&app, CREATE_ACCOUNT, body.clone(), ops),
            )
            .await;
            assert_invalid(label, result, fields);
        }
        let expire_time = delimited(4, &[0x08, 0xff]);
        let body = [
            delimited(1, robot.account_id.as_bytes()),
            delimited(2, b"ci"),
            expire_time,
        ]
        .concat();
        let result = unchanged(&app, "nested", raw_call(&app, CREATE_TOKEN, body, ops)).await;
        assert_invalid(
            "truncated Timestamp inside CreateTokenRequest",
            result,
            &["expire_time.seconds"],
        );

        // The server is unharmed: a well-formed request still works.
        let ok = pb::CreateAccountRequest {
            username: "robot2".into(),
            kind: pb::AccountKind::Robot as i32,
            ..Default::default()
        };
        raw_call(&app, CREATE_ACCOUNT, ok.encode_to_vec(), ops)
            .await
            .expect("a valid message is accepted");
    }
}

// ---------------------------------------------------------------------------
// Broken gRPC framing, below any client library.

/// A request body of fixed bytes.
struct FixedBody(Option<prost::bytes::Bytes>);

impl http_body::Body for FixedBody {
    type Data = prost::bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(self.0.take().map(|data| Ok(http_body::Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_none()
    }
}

/// POSTs `body` as it is (gRPC framing included) to `method`, as the
/// operator, and returns the call's status (`Code::Ok` on success), from
/// the headers of a trailers-only answer or from the trailers.
async fn raw_http(app: &TestApp, method: &str, body: Vec<u8>) -> Status {
    use http_body::Body as _;
    use tower::ServiceExt as _;
    let data = (!body.is_empty()).then(|| prost::bytes::Bytes::from(body));
    let request = http::Request::post(format!("http://{}{method}", app.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("authorization", format!("Bearer {}", app.operator_token))
        .body(tonic::body::Body::new(FixedBody(data)))
        .expect("a request");
    let response = app
        .channel
        .clone()
        .oneshot(request)
        .await
        .expect("an HTTP/2 response");
    if let Some(status) = Status::from_header_map(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(frame) =
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut body).poll_frame(cx)).await
    {
        if let Ok(trailers) = frame.expect("a frame").into_trailers() {
            return Status::from_header_map(&trailers).expect("grpc-status");
        }
    }
    panic!("no grpc-status in the response");
}

/// `message` with a gRPC prefix: compression `flag` and big-endian length.
fn framed(flag: u8, len: u32, message: &[u8]) -> Vec<u8> {
    let mut out = vec![flag];
    out.extend(len.to_be_bytes());
    out.extend_from_slice(message);
    out
}

on_both_backends! {
    async fn broken_grpc_framing_is_invalid_argument(app: TestApp) {
        let robot = pb::CreateAccountRequest {
            username: "framed".into(),
            kind: pb::AccountKind::Robot as i32,
            ..Default::default()
        }
        .encode_to_vec();
        let len = u32::try_from(robot.len()).expect("small");
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("no message at all", vec![]),
            ("half a prefix", vec![0, 0, 0]),
            ("a prefix alone", framed(0, len, &[])),
            ("a message cut short", framed(0, len, &robot[..robot.len() - 1])),
            ("compression flag 2", framed(2, len, &robot)),
            ("compression flag 255", framed(255, len, &robot)),
        ];
        for (label, body) in cases {
            let status = unchanged(&app, label, raw_http(&app, CREATE_ACCOUNT, body)).await;
            assert_eq!(status.code(), Code::InvalidArgument, "{label}: {status:?}");
            assert_eq!(reason(&status), "ERROR_REASON_INVALID_ARGUMENT", "{label}");
        }
        // Over the limit, by the prefix alone.
        let status = unchanged(&app, "prefix over the limit", raw_http(&app, CREATE_ACCOUNT, framed(0, u32::MAX, &robot))).await;
        assert_too_large("prefix over the limit", Err::<(), _>(status), identity::config::Config::DEFAULT_MAX_MESSAGE_BYTES);
        // The same bytes, framed properly, are served.
        let status = raw_http(&app, CREATE_ACCOUNT, framed(0, len, &robot)).await;
        assert_eq!(status.code(), Code::Ok, "{status:?}");
    }
}

// ---------------------------------------------------------------------------
// Message size.

/// A CreateAccountRequest for a robot whose encoded length is exactly
/// `len`, padded with its email field.
fn create_account_of_len(len: usize) -> Vec<u8> {
    let head = [
        delimited(1, b"big"),
        varint_field(4, pb::AccountKind::Robot as u64),
    ]
    .concat();
    // Key (1 byte) + length varint + email bytes == len - head.len().
    let rest = len - head.len();
    let email_len = (1..rest)
        .rev()
        .find(|n| 1 + varint(*n as u64).len() + n == rest)
        .expect("a padding length that fits");
    let mut email = vec![b'a'; email_len];
    email[0] = b'x';
    email[email_len - 12..].copy_from_slice(b"@example.com");
    let body = [head, delimited(3, &email)].concat();
    assert_eq!(body.len(), len);
    body
}

#[track_caller]
fn assert_too_large<T: std::fmt::Debug>(label: &str, result: Result<T, Status>, limit: usize) {
    let status = match result {
        Ok(value) => panic!("{label}: should have failed, got {value:?}"),
        Err(status) => status,
    };
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{label}: unexpected status {status:?}"
    );
    assert_eq!(reason(&status), "ERROR_REASON_MESSAGE_TOO_LARGE", "{label}");
    let info = status
        .get_error_details()
        .error_info()
        .cloned()
        .expect("ErrorInfo");
    assert_eq!(
        info.metadata.get("max_bytes"),
        Some(&limit.to_string()),
        "{label}"
    );
}

on_both_backends! {
    async fn oversize_requests_are_resource_exhausted_and_the_largest_legitimate_one_passes(app: TestApp) {
        let limit = identity::config::Config::DEFAULT_MAX_MESSAGE_BYTES;
        let ops = Some(app.operator_token.as_str());

        // One byte over the limit is refused before it is decoded...
        let body = create_account_of_len(limit + 1);
        let result = unchanged(&app, "limit + 1", raw_call(&app, CREATE_ACCOUNT, body, ops)).await;
        assert_too_large("limit + 1", result, limit);
        // ...and so is far more, on a method that needs no credential.
        let body = delimited(1, &vec![b'a'; 8 << 20]);
        let result = unchanged(&app, "8 MiB", raw_call(&app, REVOKE_LEAKED, body, None)).await;
        assert_too_large("8 MiB", result, limit);
        let result = unchanged(
            &app,
            "8 MiB",
            raw_call(&app, SIGN_IN, delimited(2, &vec![b'p'; 8 << 20]), None),
        )
        .await;
        assert_too_large("8 MiB sign-in", result, limit);
        // Exactly the limit is decoded, and then judged on its merits (the
        // email is far too long).
        let body = create_account_of_len(limit);
        let result = unchanged(&app, "limit", raw_call(&app, CREATE_ACCOUNT, body, ops)).await;
        assert_invalid("exactly the limit", result, &["email"]);

        // The largest legitimate request: a leak report of 1000 well-formed
        // credentials, one of them live. It is accepted and acted on.
        let robot = app.robot("leaky").await;
        let (_, live) = app
            .token(&app.operator_token, &robot.account_id, "leaked", &[])
            .await;
        let (other_token, other) = app
            .token(&app.operator_token, &robot.account_id, "other", &[])
            .await;
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: other_token.token_id,
                },
                &app.operator_token,
            ))
            .await
            .expect("revoke");
        let mut secrets = vec![other; 999];
        secrets.push(live.clone());
        let request = pb::RevokeLeakedTokenRequest { secrets };
        let encoded = request.encoded_len();
        assert!(encoded < limit, "{encoded} bytes must fit in {limit}");
        assert!(
            encoded > 45_000,
            "the largest legitimate request is about 46 KB, got {encoded}"
        );
        app.tokens()
            .revoke_leaked_token(request)
            .await
            .expect("1000 secrets are accepted");
        let verdict = app.verify(&live, &[]).await;
        assert_eq!(
            verdict.reason,
            pb::InactiveReason::Revoked as i32,
            "the live one was revoked"
        );
    }
}

/// The limit follows `IDENTITY_MAX_MESSAGE_BYTES` (here set through the
/// configuration); the size check runs before any storage is touched, so one
/// backend shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_message_limit_follows_the_setting() {
    let limit = 70_000;
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.max_message_bytes = limit;
    })
    .await;
    let ops = Some(app.operator_token.as_str());
    let result = raw_call(&app, CREATE_ACCOUNT, create_account_of_len(limit + 1), ops).await;
    assert_too_large("limit + 1", result, limit);
    let result = raw_call(&app, CREATE_ACCOUNT, create_account_of_len(limit), ops).await;
    assert_invalid("exactly the limit", result, &["email"]);
    // A request the default would accept is refused under this limit.
    let result = raw_call(&app, CREATE_ACCOUNT, create_account_of_len(100_000), ops).await;
    assert_too_large("100 kB", result, limit);
    app.robot("still-works").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Empty and huge fields.

on_both_backends! {
    async fn empty_and_huge_fields_are_invalid_argument(app: TestApp) {
        let (alice, session) = app.person("alice").await;
        let ops = &app.operator_token;
        let huge = "a".repeat(60_000);
        let robot = |username: &str, email: &str, password: &str| pb::CreateAccountRequest {
            username: username.into(),
            email: email.into(),
            password: password.into(),
            kind: pb::AccountKind::Robot as i32,
            role: 0,
        };
        let person = |username: &str, password: &str| pb::CreateAccountRequest {
            username: username.into(),
            password: password.into(),
            kind: pb::AccountKind::Person as i32,
            ..Default::default()
        };
        let long_email = format!("{}@example.com", "e".repeat(243));
        let create: Vec<(&str, pb::CreateAccountRequest, &[&str])> = vec![
            (
                "everything empty",
                pb::CreateAccountRequest::default(),
                &["username", "kind"],
            ),
            ("empty username", robot("", "", ""), &["username"]),
            (
                "40-character username",
                robot(&"a".repeat(40), "", ""),
                &["username"],
            ),
            ("huge username", robot(&huge, "", ""), &["username"]),
            (
                "255-character email",
                robot("bob", &long_email, ""),
                &["email"],
            ),
            (
                "huge email",
                robot("bob", &format!("{huge}@example.com"), ""),
                &["email"],
            ),
            (
                "robot with a password",
                robot("bob", "", PASSWORD),
                &["password"],
            ),
            (
                "person without a password",
                person("bob", ""),
                &["password"],
            ),
            (
                "257-character password",
                person("bob", &"p".repeat(257)),
                &["password"],
            ),
            ("huge password", person("bob", &huge), &["password"]),
        ];
        for (label, request, fields) in create {
            let result = unchanged(
                &app,
                label,
                app.accounts().create_account(bearer(request, ops)),
            )
            .await;
            assert_invalid(label, result, fields);
        }

        use pb::get_account_request::Lookup;
        let lookups: Vec<(&str, Option<Lookup>, &str)> = vec![
            ("no lookup", None, "lookup"),
            (
                "empty username",
                Some(Lookup::Username(String::new())),
                "username",
            ),
            (
                "huge username",
                Some(Lookup::Username(huge.clone())),
                "username",
            ),
            (
                "empty id",
                Some(Lookup::AccountId(String::new())),
                "account_id",
            ),
            (
                "huge id",
                Some(Lookup::AccountId(huge.clone())),
                "account_id",
            ),
        ];
        for (label, lookup, field) in lookups {
            let request = bearer(pb::GetAccountRequest { lookup }, ops);
            let result = unchanged(&app, label, app.accounts().get_account(request)).await;
            assert_invalid(label, result, &[field]);
        }

        let sign_ins = [
            (
                "empty",
                String::new(),
                String::new(),
                &["username", "password"][..],
            ),
            (
                "huge username",
                huge.clone(),
                PASSWORD.to_owned(),
                &["username"][..],
            ),
            (
                "huge password",
                "alice".to_owned(),
                huge.clone(),
                &["password"][..],
            ),
        ];
        for (label, username, password, fields) in sign_ins {
            let request = pb::SignInRequest { username, password };
            let result = unchanged(&app, label, app.accounts().sign_in(request)).await;
            assert_invalid(label, result, fields);
        }

        let changes = [
            (
                "empty",
                String::new(),
                String::new(),
                &["current_password", "new_password"][..],
            ),
            (
                "huge new",
                PASSWORD.to_owned(),
                huge.clone(),
                &["new_password"][..],
            ),
            (
                "huge current",
                huge.clone(),
                "another fine passphrase".to_owned(),
                &["current_password"][..],
            ),
        ];
        for (label, current_password, new_password, fields) in changes {
            let request = bearer(
                pb::ChangePasswordRequest {
                    current_password,
                    new_password,
                },
                &session,
            );
            let result = unchanged(&app, label, app.accounts().change_password(request)).await;
            assert_invalid(label, result, fields);
        }

        for id in [String::new(), huge.clone()] {
            let label = format!("account id of {} bytes", id.len());
            let result = unchanged(
                &app,
                &label,
                app.accounts().disable_account(bearer(
                    pb::DisableAccountRequest {
                        account_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.accounts().enable_account(bearer(
                    pb::EnableAccountRequest {
                        account_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.accounts().delete_account(bearer(
                    pb::DeleteAccountRequest {
                        account_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.accounts().sign_out_everywhere(bearer(
                    pb::SignOutEverywhereRequest {
                        account_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().get_token(bearer(
                    pb::GetTokenRequest {
                        token_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["token_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().revoke_token(bearer(
                    pb::RevokeTokenRequest {
                        token_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["token_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().rotate_token(bearer(
                    pb::RotateTokenRequest {
                        token_id: id.clone(),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["token_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().list_tokens(bearer(
                    pb::ListTokensRequest {
                        account_id: id.clone(),
                        ..Default::default()
                    },
                    ops,
                )),
            )
            .await;
            // Without an account, ListTokens is the operators' listing of
            // every account's tokens (fleet.rs).
            if id.is_empty() {
                result.expect("every account's tokens, for an operator");
            } else {
                assert_invalid(&label, result, &["account_id"]);
            }
        }
        let audit = pb::ListAuditEventsRequest {
            account_id: huge.clone(),
            ..Default::default()
        };
        let result = unchanged(
            &app,
            "audit",
            pb::audit_service_client::AuditServiceClient::new(app.channel.clone())
                .list_audit_events(bearer(audit, ops)),
        )
        .await;
        assert_invalid("huge audit account id", result, &["account_id"]);

        let token = |name: &str, scopes: Vec<String>| pb::CreateTokenRequest {
            account_id: alice.account_id.clone(),
            name: name.into(),
            scopes,
            ..Default::default()
        };
        let creates: Vec<(&str, pb::CreateTokenRequest, &[&str])> = vec![
            (
                "everything empty",
                pb::CreateTokenRequest::default(),
                &["account_id", "name"],
            ),
            ("empty name", token("", vec![]), &["name"]),
            (
                "101-character name",
                token(&"n".repeat(101), vec![]),
                &["name"],
            ),
            ("huge name", token(&huge, vec![]), &["name"]),
            (
                "empty scope",
                token("ci", vec![String::new()]),
                &["scopes[0]"],
            ),
            (
                "65-character scope",
                token("ci", vec!["ok".into(), "s".repeat(65)]),
                &["scopes[1]"],
            ),
            (
                "huge scope",
                token("ci", vec![huge.clone()]),
                &["scopes[0]"],
            ),
        ];
        for (label, request, fields) in creates {
            let result = unchanged(&app, label, app.tokens().create_token(bearer(request, ops))).await;
            assert_invalid(label, result, fields);
        }

        // VerifyToken: a credential that is empty or huge is an answer (not
        // well-formed), not an error; the caller's own fields are checked.
        // VerifyToken needs `tokens:verify` granted by name; made (and used
        // once) before the calls that must change nothing.
        let verifier = app.verifier_token().await;
        app.verify("x", &[]).await;
        for credential in [String::new(), huge.clone()] {
            let request = bearer(
                pb::VerifyTokenRequest {
                    token: credential,
                    ..Default::default()
                },
                &verifier,
            );
            let verdict = unchanged(&app, "verify", app.tokens().verify_token(request))
                .await
                .expect("an answer")
                .into_inner();
            assert!(!verdict.active);
            assert_eq!(verdict.reason, pb::InactiveReason::Malformed as i32);
        }
        let verifies: Vec<(&str, pb::VerifyTokenRequest, &str)> = vec![
            (
                "empty required scope",
                pb::VerifyTokenRequest {
                    token: "x".into(),
                    required_scopes: vec![String::new()],
                    ..Default::default()
                },
                "required_scopes[0]",
            ),
            (
                "huge required scope",
                pb::VerifyTokenRequest {
                    token: "x".into(),
                    required_scopes: vec![huge.clone()],
                    ..Default::default()
                },
                "required_scopes[0]",
            ),
            (
                "huge client address",
                pb::VerifyTokenRequest {
                    token: "x".into(),
                    client_address: huge.clone(),
                    ..Default::default()
                },
                "client_address",
            ),
        ];
        for (label, request, field) in verifies {
            let result = unchanged(&app, label, app.tokens().verify_token(bearer(request, &verifier))).await;
            assert_invalid(label, result, &[field]);
        }

        // A leak report of nothing is refused; of empty or huge strings,
        // accepted and ignored.
        let result = unchanged(
            &app,
            "no secrets",
            app.tokens()
                .revoke_leaked_token(pb::RevokeLeakedTokenRequest { secrets: vec![] }),
        )
        .await;
        assert_invalid("no secrets", result, &["secrets"]);
        let request = pb::RevokeLeakedTokenRequest {
            secrets: vec![String::new(), huge.clone()],
        };
        unchanged(
            &app,
            "junk secrets",
            app.tokens().revoke_leaked_token(request),
        )
        .await
        .expect("junk is ignored");
    }
}

// ---------------------------------------------------------------------------
// SQL metacharacters.

/// Strings that break queries built by pasting text together.
const SQL_NASTIES: &[&str] = &[
    "'",
    "''",
    "\"",
    "'; DROP TABLE accounts;--",
    "' OR '1'='1",
    "\" OR \"\"=\"",
    "1; DELETE FROM tokens",
    "%",
    "_",
    "100%_done",
    "\\",
    "\\'; --",
    "$1",
    "?",
    "*/ /*",
    "`",
    "x' UNION SELECT password_hash FROM accounts --",
];

on_both_backends! {
    async fn sql_metacharacters_are_plain_text_in_every_field(app: TestApp) {
        let (alice, _) = app.person("alice").await;
        let robot = app.robot("ci-bot").await;
        let ops = &app.operator_token;
        let verifier = app.verifier_token().await;
        app.verify("x", &[]).await;

        // Free text that is allowed (token names, emails, passwords) is
        // stored and returned byte for byte, and compared exactly.
        for (i, nasty) in SQL_NASTIES.iter().enumerate() {
            let name = format!("{nasty} #{i}");
            let (token, _) = app.token(ops, &robot.account_id, &name, &[]).await;
            assert_eq!(token.name, name);
            let fetched = app
                .tokens()
                .get_token(bearer(
                    pb::GetTokenRequest {
                        token_id: token.token_id,
                    },
                    ops,
                ))
                .await
                .expect("get")
                .into_inner()
                .token
                .expect("token");
            assert_eq!(fetched.name, name);
        }
        // `%` and `_` are not wildcards: these names are all distinct.
        for name in ["a%", "ab", "a_", "aX"] {
            app.token(ops, &alice.account_id, name, &[]).await;
        }
        let listed = app
            .tokens()
            .list_tokens(bearer(
                pb::ListTokensRequest {
                    account_id: robot.account_id.clone(),
                    page_size: 1000,
                    ..Default::default()
                },
                ops,
            ))
            .await
            .expect("list")
            .into_inner()
            .tokens;
        assert_eq!(listed.len(), SQL_NASTIES.len());

        let email = "o'brien+100%_;--\"@example.com";
        let created = app
            .accounts()
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: "obrien".into(),
                    email: email.into(),
                    kind: pb::AccountKind::Robot as i32,
                    ..Default::default()
                },
                ops,
            ))
            .await
            .expect("a quoted email is fine")
            .into_inner()
            .account
            .expect("account");
        assert_eq!(created.email, email);

        let password = "'; DROP TABLE accounts;-- 100%_ \\";
        app.accounts()
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: "mallory".into(),
                    password: password.into(),
                    kind: pb::AccountKind::Person as i32,
                    ..Default::default()
                },
                ops,
            ))
            .await
            .expect("any password characters are fine");
        app.accounts()
            .sign_in(pb::SignInRequest {
                username: "mallory".into(),
                password: password.into(),
            })
            .await
            .expect("and it signs in");
        let wrong = app
            .accounts()
            .sign_in(pb::SignInRequest {
                username: "mallory".into(),
                password: "'; DROP TABLE accounts;-- 100%__\\".into(),
            })
            .await;
        assert_eq!(
            wrong.expect_err("a wildcard is no match").code(),
            Code::Unauthenticated
        );

        // `_` is a legal username character, never a wildcard.
        let result = unchanged(
            &app,
            "a_ice",
            app.accounts().get_account(bearer(
                pb::GetAccountRequest {
                    lookup: Some(pb::get_account_request::Lookup::Username("a_ice".into())),
                },
                ops,
            )),
        )
        .await;
        assert_eq!(result.expect_err("no such account").code(), Code::NotFound);
        // (A failed sign-in is audited, so this one changes the log.)
        let result = app
            .accounts()
            .sign_in(pb::SignInRequest {
                username: "a_ice".into(),
                password: PASSWORD.into(),
            })
            .await;
        assert_eq!(
            result.expect_err("no such account").code(),
            Code::Unauthenticated
        );

        // Everywhere else they are refused, NUL bytes included, and nothing
        // changes.
        let mut nasties: Vec<String> = SQL_NASTIES.iter().map(|s| (*s).to_owned()).collect();
        nasties.extend([
            "alice\0".to_owned(),
            "\0".to_owned(),
            "a\0' OR 1=1 --".to_owned(),
        ]);
        for nasty in &nasties {
            let label = format!("{nasty:?}");
            // (`alice_` is a fine username.)
            if nasty != "_" {
                let with_name = format!("alice{nasty}");
                let result = unchanged(
                    &app,
                    &label,
                    app.accounts().create_account(bearer(
                        pb::CreateAccountRequest {
                            username: with_name.clone(),
                            kind: pb::AccountKind::Robot as i32,
                            ..Default::default()
                        },
                        ops,
                    )),
                )
                .await;
                assert_invalid(&label, result, &["username"]);
                let result = unchanged(
                    &app,
                    &label,
                    app.accounts().get_account(bearer(
                        pb::GetAccountRequest {
                            lookup: Some(pb::get_account_request::Lookup::Username(with_name.clone())),
                        },
                        ops,
                    )),
                )
                .await;
                assert_invalid(&label, result, &["username"]);
                let result = unchanged(
                    &app,
                    &label,
                    app.accounts().sign_in(pb::SignInRequest {
                        username: with_name.clone(),
                        password: PASSWORD.into(),
                    }),
                )
                .await;
                assert_invalid(&label, result, &["username"]);
            }
            let result = unchanged(
                &app,
                &label,
                app.accounts().get_account(bearer(
                    pb::GetAccountRequest {
                        lookup: Some(pb::get_account_request::Lookup::AccountId(format!(
                            "{}{nasty}",
                            alice.account_id
                        ))),
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().list_tokens(bearer(
                    pb::ListTokensRequest {
                        account_id: alice.account_id.clone(),
                        page_token: nasty.clone(),
                        ..Default::default()
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["page_token"]);
            let audit = pb::ListAuditEventsRequest {
                account_id: nasty.clone(),
                ..Default::default()
            };
            let result = unchanged(
                &app,
                &label,
                pb::audit_service_client::AuditServiceClient::new(app.channel.clone())
                    .list_audit_events(bearer(audit, ops)),
            )
            .await;
            assert_invalid(&label, result, &["account_id"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().create_token(bearer(
                    pb::CreateTokenRequest {
                        account_id: alice.account_id.clone(),
                        name: "scoped".into(),
                        scopes: vec![format!("project:{nasty}")],
                        ..Default::default()
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["scopes[0]"]);
            let verify = pb::VerifyTokenRequest {
                token: format!("idpat_{nasty}"),
                required_scopes: vec![nasty.clone()],
                required_resources: vec![],
                client_address: format!("127.0.0.1{nasty}"),
            };
            let result = unchanged(&app, &label, app.tokens().verify_token(bearer(verify, &verifier))).await;
            assert_invalid(&label, result, &["required_scopes[0]", "client_address"]);
            let verify = pb::VerifyTokenRequest {
                token: format!("idpat_{nasty}"),
                ..Default::default()
            };
            let verdict = unchanged(&app, &label, app.tokens().verify_token(bearer(verify, &verifier)))
                .await
                .expect("an answer")
                .into_inner();
            assert_eq!(
                verdict.reason,
                pb::InactiveReason::Malformed as i32,
                "{label}"
            );
        }
        // Only control characters are refused in token names and emails.
        for nul in ["ci\0", "\0", "ci\0'; --"] {
            let label = format!("{nul:?}");
            let result = unchanged(
                &app,
                &label,
                app.tokens().create_token(bearer(
                    pb::CreateTokenRequest {
                        account_id: alice.account_id.clone(),
                        name: nul.into(),
                        ..Default::default()
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["name"]);
            let result = unchanged(
                &app,
                &label,
                app.accounts().create_account(bearer(
                    pb::CreateAccountRequest {
                        username: "nul".into(),
                        email: format!("{nul}@example.com"),
                        kind: pb::AccountKind::Robot as i32,
                        ..Default::default()
                    },
                    ops,
                )),
            )
            .await;
            assert_invalid(&label, result, &["email"]);
        }
        // A leak report of nasty strings is accepted and revokes nothing.
        let request = pb::RevokeLeakedTokenRequest {
            secrets: nasties
                .iter()
                .flat_map(|n| [n.clone(), format!("idpat_{n}"), format!("idses_{n}")])
                .collect(),
        };
        unchanged(
            &app,
            "leak report",
            app.tokens().revoke_leaked_token(request),
        )
        .await
        .expect("accepted");
    }
}

// ---------------------------------------------------------------------------
// Unicode lookalikes in usernames.

/// Usernames that look like `alice` (or like nothing at all) but are not the
/// ASCII letters a-l-i-c-e.
const ALICE_LOOKALIKES: &[&str] = &[
    "ａｌｉｃｅ",            // fullwidth
    "ａlice",                // one fullwidth letter
    "\u{0430}lice",          // Cyrillic a
    "al\u{0456}ce",          // Cyrillic i (Ukrainian)
    "alic\u{0435}",          // Cyrillic e
    "ali\u{200d}ce",         // zero-width joiner
    "ali\u{200b}ce",         // zero-width space
    "ali\u{2060}ce",         // word joiner
    "alice\u{feff}",         // byte-order mark
    "\u{202e}ecila",         // right-to-left override
    "\u{2067}alice\u{2069}", // right-to-left isolate
    "al\u{0131}ce",          // dotless i
    "AL\u{0130}CE",          // capital I with dot (lowercases to i + a mark)
    "ali\u{0107}e",          // c with acute, composed
    "alic\u{0065}\u{0301}",  // alice + combining acute (NFD of alicé)
    "alic\u{00e9}",          // alicé, NFC
    "a\u{0300}lice",         // a + combining grave
    "alice\u{0000}",         // NUL
    "alice ",                // trailing space
    "\u{00a0}alice",         // no-break space
    "alice\u{3000}",         // ideographic space
    "ALICE\u{1d00}",         // small capital a
    "\u{1d41a}lice",         // mathematical bold a
];

on_both_backends! {
    async fn visually_identical_usernames_can_never_be_two_accounts(app: TestApp) {
        let (alice, _) = app.person("alice").await;
        let ops = &app.operator_token;

        // Case is folded: these are alice, and cannot be created again.
        for same in ["ALICE", "Alice", "aLiCe"] {
            let request = pb::CreateAccountRequest {
                username: same.into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            };
            let result = unchanged(
                &app,
                same,
                app.accounts().create_account(bearer(request, ops)),
            )
            .await;
            let status = result.expect_err("taken");
            assert_eq!(status.code(), Code::AlreadyExists, "{same}: {status:?}");
            let found = app
                .accounts()
                .get_account(bearer(
                    pb::GetAccountRequest {
                        lookup: Some(pb::get_account_request::Lookup::Username(same.into())),
                    },
                    ops,
                ))
                .await
                .expect("found")
                .into_inner()
                .account
                .expect("account");
            assert_eq!(found.account_id, alice.account_id);
        }
        // Everything outside ASCII letters, digits, `.`, `_` and `-` is
        // refused: no account can be created under it, looked up by it, or
        // signed in with it.
        for lookalike in ALICE_LOOKALIKES {
            let label = format!("{lookalike:?}");
            for kind in [pb::AccountKind::Robot, pb::AccountKind::Person] {
                let password = if kind == pb::AccountKind::Person {
                    PASSWORD
                } else {
                    ""
                };
                let request = pb::CreateAccountRequest {
                    username: (*lookalike).into(),
                    password: password.into(),
                    kind: kind as i32,
                    ..Default::default()
                };
                let result = unchanged(
                    &app,
                    &label,
                    app.accounts().create_account(bearer(request, ops)),
                )
                .await;
                assert_invalid(&label, result, &["username"]);
            }
            let request = pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username(
                    (*lookalike).into(),
                )),
            };
            let result = unchanged(
                &app,
                &label,
                app.accounts().get_account(bearer(request, ops)),
            )
            .await;
            assert_invalid(&label, result, &["username"]);
            let request = pb::SignInRequest {
                username: (*lookalike).into(),
                password: PASSWORD.into(),
            };
            let result = unchanged(&app, &label, app.accounts().sign_in(request)).await;
            assert_invalid(&label, result, &["username"]);
        }
        // Lookalikes of other letters: Kelvin sign K, long s, Roman numeral
        // one; none may stand beside the ASCII name.
        app.robot("kim").await;
        app.robot("sam").await;
        app.robot("ivy").await;
        for lookalike in ["\u{212a}im", "\u{017f}am", "\u{2160}vy", "K\u{0131}m"] {
            let label = format!("{lookalike:?}");
            let request = pb::CreateAccountRequest {
                username: lookalike.into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            };
            let result = unchanged(
                &app,
                &label,
                app.accounts().create_account(bearer(request, ops)),
            )
            .await;
            assert_invalid(&label, result, &["username"]);
        }
        let accounts = app
            .accounts()
            .list_accounts(bearer(
                pb::ListAccountsRequest {
                    page_size: 100,
                    page_token: String::new(),
                },
                ops,
            ))
            .await
            .expect("list")
            .into_inner()
            .accounts;
        let names: Vec<_> = accounts.iter().map(|a| a.username.as_str()).collect();
        assert_eq!(names, ["ops", "alice", "kim", "sam", "ivy"]);

        // Free text shown to people refuses invisible and direction-changing
        // characters too, so `ci-deploy` has no invisible twin among the
        // account's token names, and an email cannot hide a reversed part.
        app.token(ops, &alice.account_id, "ci-deploy", &[]).await;
        for invisible in [
            "\u{200b}",
            "\u{200d}",
            "\u{2060}",
            "\u{feff}",
            "\u{202e}",
            "\u{2066}",
            "\u{00ad}",
            "\u{e0041}",
        ] {
            let label = format!("{invisible:?}");
            let name = format!("ci-{invisible}deploy");
            let request = pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name,
                ..Default::default()
            };
            let result = unchanged(
                &app,
                &label,
                app.tokens().create_token(bearer(request, ops)),
            )
            .await;
            assert_invalid(&label, result, &["name"]);
            let request = pb::CreateAccountRequest {
                username: "bob".into(),
                email: format!("bob{invisible}@example.com"),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            };
            let result = unchanged(
                &app,
                &label,
                app.accounts().create_account(bearer(request, ops)),
            )
            .await;
            assert_invalid(&label, result, &["email"]);
        }
    }
}

// ---------------------------------------------------------------------------
// Timestamps.

on_both_backends! {
    async fn out_of_range_timestamps_are_invalid_argument(app: TestApp) {
        let robot = app.robot("ci-bot").await;
        let ops = &app.operator_token;
        let now = now_seconds();
        let ts = |seconds: i64, nanos: i32| Some(prost_types::Timestamp { seconds, nanos });
        let year_10000 = 253_402_300_800;
        let year_0 = -62_135_596_801;
        let never_valid = [
            ("year 10000", ts(year_10000, 0)),
            ("i64::MAX seconds", ts(i64::MAX, 0)),
            ("i64::MIN seconds", ts(i64::MIN, 0)),
            ("year 0", ts(year_0, 0)),
            ("negative nanos", ts(now + 3600, -1)),
            ("nanos of a whole second", ts(now + 3600, 1_000_000_000)),
            ("i32::MIN nanos", ts(now + 3600, i32::MIN)),
            ("i32::MAX nanos", ts(now + 3600, i32::MAX)),
        ];
        let in_the_past = [
            ("negative seconds", ts(-1, 0)),
            ("the epoch", ts(0, 0)),
            ("year 1", ts(year_0 + 1, 0)),
            ("a second ago", ts(now - 1, 0)),
        ];
        for (label, expire_time) in never_valid.iter().chain(&in_the_past) {
            let request = pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "ci".into(),
                expire_time: *expire_time,
                ..Default::default()
            };
            let result = unchanged(&app, label, app.tokens().create_token(bearer(request, ops))).await;
            assert_invalid(label, result, &["expire_time"]);
        }
        // Valid, but beyond the server's longest token lifetime.
        let request = pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "ci".into(),
            expire_time: ts(year_10000 - 1, 999_999_999),
            ..Default::default()
        };
        let result = unchanged(
            &app,
            "9999-12-31",
            app.tokens().create_token(bearer(request, ops)),
        )
        .await;
        assert_refused(
            "9999-12-31",
            result,
            "ERROR_REASON_TOKEN_LIFETIME",
            &["expire_time"],
        );

        // As filters, the invalid ones are refused and each field named.
        for (label, bad) in never_valid {
            let request = pb::ListTokensRequest {
                account_id: robot.account_id.clone(),
                expire_before: bad,
                last_used_before: bad,
                ..Default::default()
            };
            let result = unchanged(&app, label, app.tokens().list_tokens(bearer(request, ops))).await;
            assert_invalid(label, result, &["expire_before", "last_used_before"]);
        }
        // The extremes of the valid range, and the past, are fine filters.
        app.token(ops, &robot.account_id, "ci", &[]).await;
        for (expire_before, expected) in [
            (ts(year_0 + 1, 0), 0),
            (ts(-1, 0), 0),
            (ts(year_10000 - 1, 999_999_999), 1),
        ] {
            let request = pb::ListTokensRequest {
                account_id: robot.account_id.clone(),
                expire_before,
                last_used_before: ts(year_10000 - 1, 0),
                ..Default::default()
            };
            let listed = app
                .tokens()
                .list_tokens(bearer(request, ops))
                .await
                .expect("a valid filter")
                .into_inner()
                .tokens;
            assert_eq!(listed.len(), expected, "{expire_before:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// Enums.

on_both_backends! {
    async fn unknown_enum_values_are_invalid_argument(app: TestApp) {
        let robot = app.robot("ci-bot").await;
        let ops = &app.operator_token;
        for (label, kind, role, fields) in [
            ("unspecified kind", 0, 0, &["kind"][..]),
            ("kind 3", 3, 0, &["kind"][..]),
            ("kind -1", -1, 0, &["kind"][..]),
            ("kind i32::MAX", i32::MAX, 0, &["kind"][..]),
            ("role 3", 2, 3, &["role"][..]),
            ("role i32::MIN", 2, i32::MIN, &["role"][..]),
            ("both", 99, 99, &["kind", "role"][..]),
        ] {
            let request = pb::CreateAccountRequest {
                username: "bob".into(),
                kind,
                role,
                ..Default::default()
            };
            let result = unchanged(
                &app,
                label,
                app.accounts().create_account(bearer(request, ops)),
            )
            .await;
            assert_invalid(label, result, fields);
        }
        for (label, states, field) in [
            ("unspecified", vec![0], "states[0]"),
            ("5", vec![1, 5], "states[1]"),
            ("-1", vec![-1], "states[0]"),
        ] {
            let request = pb::ListTokensRequest {
                account_id: robot.account_id.clone(),
                states,
                ..Default::default()
            };
            let result = unchanged(&app, label, app.tokens().list_tokens(bearer(request, ops))).await;
            assert_invalid(label, result, &[field]);
        }
        let mut audit = pb::audit_service_client::AuditServiceClient::new(app.channel.clone());
        for (label, types, field) in [
            ("1000", vec![1000], "types[0]"),
            ("-1", vec![1, -1], "types[1]"),
            ("i32::MAX", vec![i32::MAX], "types[0]"),
        ] {
            let request = pb::ListAuditEventsRequest {
                types,
                ..Default::default()
            };
            let result = unchanged(&app, label, audit.list_audit_events(bearer(request, ops))).await;
            assert_invalid(label, result, &[field]);
        }
        // As documented, AUDIT_EVENT_TYPE_UNSPECIFIED in the filter is
        // ignored.
        let all = audit
            .list_audit_events(bearer(pb::ListAuditEventsRequest::default(), ops))
            .await
            .expect("all")
            .into_inner()
            .events;
        let unspecified = audit
            .list_audit_events(bearer(
                pb::ListAuditEventsRequest {
                    types: vec![0],
                    ..Default::default()
                },
                ops,
            ))
            .await
            .expect("ignored")
            .into_inner()
            .events;
        assert_eq!(unspecified, all);
        let created = audit
            .list_audit_events(bearer(
                pb::ListAuditEventsRequest {
                    types: vec![0, pb::AuditEventType::AccountCreated as i32],
                    ..Default::default()
                },
                ops,
            ))
            .await
            .expect("ignored")
            .into_inner()
            .events;
        assert!(!created.is_empty());
        assert!(
            created
                .iter()
                .all(|e| e.r#type == pb::AuditEventType::AccountCreated as i32)
        );

        // A filter repeating an unknown value thousands of times gets one
        // short answer, not thousands of violations.
        let request = pb::ListTokensRequest {
            account_id: robot.account_id.clone(),
            states: vec![99; 20_000],
            ..Default::default()
        };
        let result = unchanged(
            &app,
            "20000 states",
            app.tokens().list_tokens(bearer(request, ops)),
        )
        .await;
        let status = assert_invalid("20000 states", result, &["states"]);
        assert!(
            violated_fields(&status).len() <= 32,
            "{} violations",
            violated_fields(&status).len()
        );
        let request = pb::ListAuditEventsRequest {
            types: vec![99; 20_000],
            ..Default::default()
        };
        let result = unchanged(
            &app,
            "20000 types",
            audit.list_audit_events(bearer(request, ops)),
        )
        .await;
        let status = assert_invalid("20000 types", result, &["types"]);
        assert!(
            violated_fields(&status).len() <= 32,
            "{} violations",
            violated_fields(&status).len()
        );
    }
}

// ---------------------------------------------------------------------------
// Pagination.

/// `text` hex-encoded, the way page tokens are.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

on_both_backends! {
    async fn bad_page_sizes_and_garbage_page_tokens_are_invalid_argument(app: TestApp) {
        let ops = &app.operator_token;
        let alice = app.robot("alice").await;
        let bob = app.robot("bob").await;
        for name in ["one", "two"] {
            app.token(ops, &alice.account_id, name, &[]).await;
            app.token(ops, &bob.account_id, name, &[]).await;
        }
        let mut audit = pb::audit_service_client::AuditServiceClient::new(app.channel.clone());
        let list_accounts = |page_size: i32, page_token: &str| {
            bearer(
                pb::ListAccountsRequest {
                    page_size,
                    page_token: page_token.into(),
                },
                ops,
            )
        };
        let list_tokens = |account: &pb::Account, page_size: i32, page_token: &str| {
            bearer(
                pb::ListTokensRequest {
                    account_id: account.account_id.clone(),
                    page_size,
                    page_token: page_token.into(),
                    ..Default::default()
                },
                ops,
            )
        };
        let list_events = |page_size: i32, page_token: &str| {
            bearer(
                pb::ListAuditEventsRequest {
                    page_size,
                    page_token: page_token.into(),
                    ..Default::default()
                },
                ops,
            )
        };

        // Sizes: negative is refused, huge is clamped.
        for size in [-1, i32::MIN] {
            let label = format!("page_size {size}");
            let result = unchanged(
                &app,
                &label,
                app.accounts().list_accounts(list_accounts(size, "")),
            )
            .await;
            assert_invalid(&label, result, &["page_size"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().list_tokens(list_tokens(&alice, size, "")),
            )
            .await;
            assert_invalid(&label, result, &["page_size"]);
            let result = unchanged(&app, &label, audit.list_audit_events(list_events(size, ""))).await;
            assert_invalid(&label, result, &["page_size"]);
        }
        let accounts = app
            .accounts()
            .list_accounts(list_accounts(i32::MAX, ""))
            .await
            .expect("clamped")
            .into_inner();
        assert_eq!(accounts.accounts.len(), 3);
        assert!(accounts.next_page_token.is_empty());
        let tokens = app
            .tokens()
            .list_tokens(list_tokens(&alice, i32::MAX, ""))
            .await
            .expect("clamped")
            .into_inner();
        assert_eq!(tokens.tokens.len(), 2);
        audit
            .list_audit_events(list_events(i32::MAX, ""))
            .await
            .expect("clamped");

        // Real tokens of other listings.
        let accounts_token = app
            .accounts()
            .list_accounts(list_accounts(1, ""))
            .await
            .expect("page")
            .into_inner()
            .next_page_token;
        let alice_token = app
            .tokens()
            .list_tokens(list_tokens(&alice, 1, ""))
            .await
            .expect("page")
            .into_inner()
            .next_page_token;
        let events_token = audit
            .list_audit_events(list_events(1, ""))
            .await
            .expect("page")
            .into_inner()
            .next_page_token;
        assert!(!accounts_token.is_empty() && !alice_token.is_empty() && !events_token.is_empty());
        let id = uuid::Uuid::now_v7().to_string();
        let garbage = [
            "zz".to_owned(),
            "abc".to_owned(),
            "00".to_owned(),
            "6".repeat(600),
            "' OR 1=1 --".to_owned(),
            "%".to_owned(),
            "é9".to_owned(),
            "a".repeat(60_000),
            hex(b"accounts\nnot-a-uuid"),
            hex(b"accounts\n' OR 1=1 --"),
            hex(format!("accounts\n{id}'--").as_bytes()),
            hex(b"\xff\xfe\n"),
            hex(format!("accounts\0\n{id}").as_bytes()),
            hex(format!("tokens/{}\n{id}", bob.account_id).as_bytes()),
        ];
        for token in &garbage {
            let label = format!("page token {:?}", &token[..token.len().min(40)]);
            let result = unchanged(
                &app,
                &label,
                app.accounts().list_accounts(list_accounts(1, token)),
            )
            .await;
            assert_invalid(&label, result, &["page_token"]);
            let result = unchanged(
                &app,
                &label,
                app.tokens().list_tokens(list_tokens(&alice, 1, token)),
            )
            .await;
            assert_invalid(&label, result, &["page_token"]);
            let result = unchanged(&app, &label, audit.list_audit_events(list_events(1, token))).await;
            assert_invalid(&label, result, &["page_token"]);
        }
        // A real token only works in its own listing.
        let result = unchanged(
            &app,
            "alice's token for bob",
            app.tokens().list_tokens(list_tokens(&bob, 1, &alice_token)),
        )
        .await;
        assert_invalid("alice's token for bob", result, &["page_token"]);
        for foreign in [&alice_token, &events_token] {
            let result = unchanged(
                &app,
                "foreign",
                app.accounts().list_accounts(list_accounts(1, foreign)),
            )
            .await;
            assert_invalid("foreign token for accounts", result, &["page_token"]);
        }
        for foreign in [&alice_token, &accounts_token] {
            let result = unchanged(
                &app,
                "foreign",
                audit.list_audit_events(list_events(1, foreign)),
            )
            .await;
            assert_invalid("foreign token for events", result, &["page_token"]);
        }
        let result = unchanged(
            &app,
            "foreign",
            app.tokens()
                .list_tokens(list_tokens(&alice, 1, &accounts_token)),
        )
        .await;
        assert_invalid("foreign token for tokens", result, &["page_token"]);
        app.tokens()
            .list_tokens(list_tokens(&alice, 1, &alice_token))
            .await
            .expect("its own listing");
    }
}

// ---------------------------------------------------------------------------
// Too many scopes and secrets.

on_both_backends! {
    async fn too_many_scopes_or_secrets_are_invalid_argument(app: TestApp) {
        let robot = app.robot("ci-bot").await;
        let ops = &app.operator_token;
        let verifier = app.verifier_token().await;
        app.verify("x", &[]).await;
        let scopes = |n: usize| (0..n).map(|i| format!("project:s{i}")).collect::<Vec<_>>();
        for (label, scopes) in [
            ("33 scopes", scopes(33)),
            (
                "33 copies of one scope",
                vec!["project:read".to_owned(); 33],
            ),
            ("5000 scopes", scopes(5_000)),
        ] {
            let request = pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "ci".into(),
                scopes: scopes.clone(),
                ..Default::default()
            };
            let result = unchanged(&app, label, app.tokens().create_token(bearer(request, ops))).await;
            let status = assert_invalid(label, result, &["scopes"]);
            assert_eq!(
                violated_fields(&status).len(),
                1,
                "{label}: one violation, not one per scope"
            );
            let request = pb::VerifyTokenRequest {
                token: "x".into(),
                required_scopes: scopes,
                ..Default::default()
            };
            let result = unchanged(&app, label, app.tokens().verify_token(bearer(request, &verifier))).await;
            assert_invalid(label, result, &["required_scopes"]);
        }
        let (token, secret) = app
            .token(
                ops,
                &robot.account_id,
                "many",
                &scopes(32).iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await;
        assert_eq!(token.scopes.len(), 32, "32 scopes are allowed");
        let verdict = app
            .verify(
                &secret,
                &scopes(32).iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await;
        assert!(verdict.active, "32 required scopes are allowed");

        let request = pb::RevokeLeakedTokenRequest {
            secrets: vec![secret.clone(); 1001],
        };
        let result = unchanged(
            &app,
            "1001 secrets",
            app.tokens().revoke_leaked_token(request),
        )
        .await;
        assert_invalid("1001 secrets", result, &["secrets"]);
        assert!(app.verify(&secret, &[]).await.active, "nothing was revoked");
    }
}
