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

use crate::both_backends;
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

/// An audit client.
fn audit_client(
    app: &TestApp,
) -> pb::audit_service_client::AuditServiceClient<tonic::transport::Channel> {
    pb::audit_service_client::AuditServiceClient::new(app.channel.clone())
}

// ---------------------------------------------------------------------------
// The table: a row is one malformed request and what it must get.

/// What a row's request must get.
#[derive(Debug)]
enum Expect {
    /// INVALID_ARGUMENT with this ErrorInfo reason, a BadRequest naming each
    /// field (and, if given, no more than this many violations), and a
    /// message that does not echo a huge input.
    Refused {
        reason: &'static str,
        fields: Vec<String>,
        most_violations: Option<usize>,
    },
    /// RESOURCE_EXHAUSTED (MESSAGE_TOO_LARGE) naming this limit.
    TooLarge(usize),
    /// A failure with this code and ErrorInfo reason.
    Status(Code, &'static str),
    /// A failure with this code.
    Code(Code),
    /// Served.
    Served,
    /// A VerifyToken answer: not active, for this reason.
    Inactive(pb::InactiveReason),
}

/// [`Expect::Refused`] with the plain INVALID_ARGUMENT reason, naming
/// `fields`.
fn invalid(fields: &[&str]) -> Expect {
    refused("ERROR_REASON_INVALID_ARGUMENT", fields)
}

/// [`Expect::Refused`] with `reason`, naming `fields`.
fn refused(reason: &'static str, fields: &[&str]) -> Expect {
    Expect::Refused {
        reason,
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        most_violations: None,
    }
}

/// [`invalid`], with at most `most` violations in the BadRequest.
fn invalid_at_most(fields: &[&str], most: usize) -> Expect {
    Expect::Refused {
        reason: "ERROR_REASON_INVALID_ARGUMENT",
        fields: fields.iter().map(|f| (*f).to_owned()).collect(),
        most_violations: Some(most),
    }
}

/// What a row's call answered: the VerifyToken answer, if it was one.
type Answer = Result<Option<pb::VerifyTokenResponse>, Status>;

/// One malformed request: the RPC, a label saying what is wrong with it,
/// the call (not yet started) and what it must get.
struct Row<'a> {
    rpc: &'static str,
    label: String,
    call: std::pin::Pin<Box<dyn Future<Output = Answer> + 'a>>,
    expect: Expect,
}

/// A row whose call answers `Result<T, Status>`.
fn row<'a, T: 'a>(
    rpc: &'static str,
    label: impl Into<String>,
    call: impl Future<Output = Result<T, Status>> + 'a,
    expect: Expect,
) -> Row<'a> {
    Row {
        rpc,
        label: label.into(),
        call: Box::pin(async move { call.await.map(|_| None) }),
        expect,
    }
}

/// A VerifyToken row, whose answer is checked too.
fn verify_row<'a>(
    label: impl Into<String>,
    call: impl Future<Output = Result<tonic::Response<pb::VerifyTokenResponse>, Status>> + 'a,
    expect: Expect,
) -> Row<'a> {
    Row {
        rpc: "VerifyToken",
        label: label.into(),
        call: Box::pin(async move { call.await.map(|r| Some(r.into_inner())) }),
        expect,
    }
}

/// A row whose call answers with a bare status (`Code::Ok` when served),
/// as [`raw_http`] does.
fn status_row<'a>(
    rpc: &'static str,
    label: impl Into<String>,
    call: impl Future<Output = Status> + 'a,
    expect: Expect,
) -> Row<'a> {
    Row {
        rpc,
        label: label.into(),
        call: Box::pin(async move {
            let status = call.await;
            if status.code() == Code::Ok {
                Ok(None)
            } else {
                Err(status)
            }
        }),
        expect,
    }
}

/// How `answer` differs from `expect`, if it does.
fn mismatch(expect: &Expect, answer: &Answer) -> Option<String> {
    let status = match (expect, answer) {
        (Expect::Served, Ok(_)) => return None,
        (Expect::Inactive(reason), Ok(verdict)) => {
            let verdict = verdict.as_ref().expect("a VerifyToken row");
            return (verdict.active || verdict.reason != *reason as i32)
                .then(|| format!("expected inactive, {reason:?}; got {verdict:?}"));
        }
        (expect, Ok(_)) => return Some(format!("expected {expect:?}, got OK")),
        (Expect::Served | Expect::Inactive(_), Err(status)) => {
            return Some(format!("expected an answer, got {status:?}"));
        }
        (_, Err(status)) => status,
    };
    let got = format!("{:?}/{}", status.code(), reason(status));
    match expect {
        Expect::Refused {
            reason: expected,
            fields,
            most_violations,
        } => {
            let mut problems = Vec::new();
            if status.code() != Code::InvalidArgument || reason(status) != *expected {
                problems.push(format!("expected InvalidArgument/{expected}, got {got}"));
            }
            let named = violated_fields(status);
            for field in fields {
                if !named.contains(field) {
                    problems.push(format!("BadRequest should name {field:?}, names {named:?}"));
                }
            }
            if let Some(most) = most_violations
                && named.len() > *most
            {
                problems.push(format!("{} violations, at most {most}", named.len()));
            }
            if status.message().len() >= 2_000 {
                problems.push(format!(
                    "the message must not echo the input ({} bytes)",
                    status.message().len()
                ));
            }
            (!problems.is_empty()).then(|| format!("{} ({status:?})", problems.join("; ")))
        }
        Expect::TooLarge(limit) => {
            let max_bytes = status
                .get_error_details()
                .error_info()
                .and_then(|info| info.metadata.get("max_bytes").cloned());
            (status.code() != Code::ResourceExhausted
                || reason(status) != "ERROR_REASON_MESSAGE_TOO_LARGE"
                || max_bytes != Some(limit.to_string()))
            .then(|| {
                format!(
                    "expected ResourceExhausted/ERROR_REASON_MESSAGE_TOO_LARGE naming \
                     {limit}, got {got} naming {max_bytes:?} ({status:?})"
                )
            })
        }
        Expect::Status(code, expected) => (status.code() != *code || reason(status) != *expected)
            .then(|| format!("expected {code:?}/{expected}, got {got} ({status:?})")),
        Expect::Code(code) => {
            (status.code() != *code).then(|| format!("expected {code:?}, got {got} ({status:?})"))
        }
        Expect::Served | Expect::Inactive(_) => unreachable!("matched above"),
    }
}

/// Runs `rows` in order, each checked against what it must get and to have
/// changed nothing stored, and fails listing every row that did otherwise.
async fn check(app: &TestApp, rows: Vec<Row<'_>>) {
    let total = rows.len();
    let mut failures = Vec::new();
    for row in rows {
        let before = snapshot(app).await;
        let answer = row.call.await;
        let mut problems = Vec::new();
        if snapshot(app).await != before {
            problems.push("the request changed stored data".to_owned());
        }
        problems.extend(mismatch(&row.expect, &answer));
        if !problems.is_empty() {
            failures.push(format!(
                "{} {}: {}",
                row.rpc,
                row.label,
                problems.join("; ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} rows answered otherwise:\n{}",
        failures.len(),
        failures.join("\n")
    );
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

async fn undecodable_requests_are_invalid_argument_and_change_nothing(app: TestApp) {
    let app = &app;
    let robot = app.robot("ci-bot").await;
    let ops = Some(app.operator_token.as_str());
    let robot_kind = varint_field(4, pb::AccountKind::Robot as u64);
    let mut rows = Vec::new();
    for bad in NOT_UTF8 {
        let label = format!("{bad:x?}");
        // CreateAccountRequest.username, then .email.
        let body = [delimited(1, bad), robot_kind.clone()].concat();
        rows.push(row(
            "CreateAccount",
            format!("username {label}"),
            raw_call(app, CREATE_ACCOUNT, body, ops),
            invalid(&["username"]),
        ));
        let body = [
            delimited(1, b"robot2"),
            delimited(3, bad),
            robot_kind.clone(),
        ]
        .concat();
        rows.push(row(
            "CreateAccount",
            format!("email {label}"),
            raw_call(app, CREATE_ACCOUNT, body, ops),
            invalid(&["email"]),
        ));
        // CreateTokenRequest.name, then one of its scopes.
        let account = delimited(1, robot.account_id.as_bytes());
        let body = [account.clone(), delimited(2, bad)].concat();
        rows.push(row(
            "CreateToken",
            format!("name {label}"),
            raw_call(app, CREATE_TOKEN, body, ops),
            invalid(&["name"]),
        ));
        let body = [
            account,
            delimited(2, b"ci"),
            delimited(3, b"tokens:read"),
            delimited(3, bad),
        ]
        .concat();
        rows.push(row(
            "CreateToken",
            format!("scopes {label}"),
            raw_call(app, CREATE_TOKEN, body, ops),
            invalid(&["scopes"]),
        ));
        // SignIn needs no credential: its username, then its password.
        let body = [delimited(1, bad), delimited(2, PASSWORD.as_bytes())].concat();
        rows.push(row(
            "SignIn",
            format!("sign-in username {label}"),
            raw_call(app, SIGN_IN, body, None),
            invalid(&["username"]),
        ));
        let body = [delimited(1, b"ci-bot"), delimited(2, bad)].concat();
        rows.push(row(
            "SignIn",
            format!("sign-in password {label}"),
            raw_call(app, SIGN_IN, body, None),
            invalid(&["password"]),
        ));
        // The credential VerifyToken checks.
        rows.push(row(
            "VerifyToken",
            format!("verify {label}"),
            raw_call(app, VERIFY_TOKEN, delimited(1, bad), ops),
            invalid(&["token"]),
        ));
        // A page token.
        rows.push(row(
            "ListAuditEvents",
            format!("page_token {label}"),
            raw_call(app, LIST_AUDIT_EVENTS, delimited(4, bad), ops),
            invalid(&["page_token"]),
        ));
    }
    // A leak report (anonymous) with one undecodable secret.
    let body = [delimited(1, b"idpat_whatever"), delimited(1, NOT_UTF8[0])].concat();
    rows.push(row(
        "RevokeLeakedToken",
        "leak report",
        raw_call(app, REVOKE_LEAKED, body, None),
        invalid(&["secrets"]),
    ));

    // Broken framing inside the message, and a broken nested message.
    let structural: Vec<(&str, Vec<u8>, &[&str])> = vec![
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
        rows.push(row(
            "CreateAccount",
            label,
            raw_call(app, CREATE_ACCOUNT, body, ops),
            invalid(fields),
        ));
    }
    let expire_time = delimited(4, &[0x08, 0xff]);
    let body = [
        delimited(1, robot.account_id.as_bytes()),
        delimited(2, b"ci"),
        expire_time,
    ]
    .concat();
    rows.push(row(
        "CreateToken",
        "truncated Timestamp inside CreateTokenRequest",
        raw_call(app, CREATE_TOKEN, body, ops),
        invalid(&["expire_time.seconds"]),
    ));
    check(app, rows).await;

    // The server is unharmed: a well-formed request still works.
    let ok = pb::CreateAccountRequest {
        username: "robot2".into(),
        kind: pb::AccountKind::Robot as i32,
        ..Default::default()
    };
    raw_call(app, CREATE_ACCOUNT, ok.encode_to_vec(), ops)
        .await
        .expect("a valid message is accepted");
}

both_backends!(undecodable_requests_are_invalid_argument_and_change_nothing);

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

async fn broken_grpc_framing_is_invalid_argument(app: TestApp) {
    let app = &app;
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
        (
            "a message cut short",
            framed(0, len, &robot[..robot.len() - 1]),
        ),
        ("compression flag 2", framed(2, len, &robot)),
        ("compression flag 255", framed(255, len, &robot)),
    ];
    let mut rows = Vec::new();
    for (label, body) in cases {
        rows.push(status_row(
            "CreateAccount",
            label,
            raw_http(app, CREATE_ACCOUNT, body),
            Expect::Status(Code::InvalidArgument, "ERROR_REASON_INVALID_ARGUMENT"),
        ));
    }
    // Over the limit, by the prefix alone.
    rows.push(status_row(
        "CreateAccount",
        "prefix over the limit",
        raw_http(app, CREATE_ACCOUNT, framed(0, u32::MAX, &robot)),
        Expect::TooLarge(identity::config::Config::DEFAULT_MAX_MESSAGE_BYTES),
    ));
    check(app, rows).await;
    // The same bytes, framed properly, are served.
    let status = raw_http(app, CREATE_ACCOUNT, framed(0, len, &robot)).await;
    assert_eq!(status.code(), Code::Ok, "{status:?}");
}

both_backends!(broken_grpc_framing_is_invalid_argument);

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

async fn oversize_requests_are_resource_exhausted_and_the_largest_legitimate_one_passes(
    app: TestApp,
) {
    let app = &app;
    let limit = identity::config::Config::DEFAULT_MAX_MESSAGE_BYTES;
    let ops = Some(app.operator_token.as_str());

    check(
        app,
        vec![
            // One byte over the limit is refused before it is decoded...
            row(
                "CreateAccount",
                "limit + 1",
                raw_call(app, CREATE_ACCOUNT, create_account_of_len(limit + 1), ops),
                Expect::TooLarge(limit),
            ),
            // ...and so is far more, on a method that needs no credential.
            row(
                "RevokeLeakedToken",
                "8 MiB",
                raw_call(app, REVOKE_LEAKED, delimited(1, &vec![b'a'; 8 << 20]), None),
                Expect::TooLarge(limit),
            ),
            row(
                "SignIn",
                "8 MiB sign-in",
                raw_call(app, SIGN_IN, delimited(2, &vec![b'p'; 8 << 20]), None),
                Expect::TooLarge(limit),
            ),
            // Exactly the limit is decoded, and then judged on its merits
            // (the email is far too long).
            row(
                "CreateAccount",
                "exactly the limit",
                raw_call(app, CREATE_ACCOUNT, create_account_of_len(limit), ops),
                invalid(&["email"]),
            ),
        ],
    )
    .await;

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

both_backends!(oversize_requests_are_resource_exhausted_and_the_largest_legitimate_one_passes);

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
    check(
        &app,
        vec![
            row(
                "CreateAccount",
                "limit + 1",
                raw_call(&app, CREATE_ACCOUNT, create_account_of_len(limit + 1), ops),
                Expect::TooLarge(limit),
            ),
            row(
                "CreateAccount",
                "exactly the limit",
                raw_call(&app, CREATE_ACCOUNT, create_account_of_len(limit), ops),
                invalid(&["email"]),
            ),
            // A request the default would accept is refused under this
            // limit.
            row(
                "CreateAccount",
                "100 kB",
                raw_call(&app, CREATE_ACCOUNT, create_account_of_len(100_000), ops),
                Expect::TooLarge(limit),
            ),
        ],
    )
    .await;
    app.robot("still-works").await;
    app.stop().await;
}

// ---------------------------------------------------------------------------
// Empty and huge fields.

async fn empty_and_huge_fields_are_invalid_argument(app: TestApp) {
    let app = &app;
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
    let mut rows = Vec::new();
    for (label, request, fields) in create {
        let request = bearer(request, ops);
        rows.push(row(
            "CreateAccount",
            label,
            async move { app.accounts().create_account(request).await },
            invalid(fields),
        ));
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
        rows.push(row(
            "GetAccount",
            label,
            async move { app.accounts().get_account(request).await },
            invalid(&[field]),
        ));
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
        rows.push(row(
            "SignIn",
            label,
            async move { app.accounts().sign_in(request).await },
            invalid(fields),
        ));
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
        rows.push(row(
            "ChangePassword",
            label,
            async move { app.accounts().change_password(request).await },
            invalid(fields),
        ));
    }

    for id in [String::new(), huge.clone()] {
        let label = format!("account id of {} bytes", id.len());
        let account_id = id.clone();
        let request = bearer(pb::DisableAccountRequest { account_id }, ops);
        rows.push(row(
            "DisableAccount",
            &label,
            async move { app.accounts().disable_account(request).await },
            invalid(&["account_id"]),
        ));
        let account_id = id.clone();
        let request = bearer(pb::EnableAccountRequest { account_id }, ops);
        rows.push(row(
            "EnableAccount",
            &label,
            async move { app.accounts().enable_account(request).await },
            invalid(&["account_id"]),
        ));
        let account_id = id.clone();
        let request = bearer(pb::DeleteAccountRequest { account_id }, ops);
        rows.push(row(
            "DeleteAccount",
            &label,
            async move { app.accounts().delete_account(request).await },
            invalid(&["account_id"]),
        ));
        let account_id = id.clone();
        let request = bearer(pb::SignOutEverywhereRequest { account_id }, ops);
        rows.push(row(
            "SignOutEverywhere",
            &label,
            async move { app.accounts().sign_out_everywhere(request).await },
            invalid(&["account_id"]),
        ));
        let token_id = id.clone();
        let request = bearer(pb::GetTokenRequest { token_id }, ops);
        rows.push(row(
            "GetToken",
            &label,
            async move { app.tokens().get_token(request).await },
            invalid(&["token_id"]),
        ));
        let token_id = id.clone();
        let request = bearer(pb::RevokeTokenRequest { token_id }, ops);
        rows.push(row(
            "RevokeToken",
            &label,
            async move { app.tokens().revoke_token(request).await },
            invalid(&["token_id"]),
        ));
        let token_id = id.clone();
        let request = bearer(pb::RotateTokenRequest { token_id }, ops);
        rows.push(row(
            "RotateToken",
            &label,
            async move { app.tokens().rotate_token(request).await },
            invalid(&["token_id"]),
        ));
        let request = bearer(
            pb::ListTokensRequest {
                account_id: id.clone(),
                ..Default::default()
            },
            ops,
        );
        // Without an account, ListTokens is the operators' listing of
        // every account's tokens (fleet.rs).
        let expect = if id.is_empty() {
            Expect::Served
        } else {
            invalid(&["account_id"])
        };
        rows.push(row(
            "ListTokens",
            &label,
            async move { app.tokens().list_tokens(request).await },
            expect,
        ));
    }
    let audit = pb::ListAuditEventsRequest {
        account_id: huge.clone(),
        ..Default::default()
    };
    let request = bearer(audit, ops);
    rows.push(row(
        "ListAuditEvents",
        "huge audit account id",
        async move { audit_client(app).list_audit_events(request).await },
        invalid(&["account_id"]),
    ));

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
        let request = bearer(request, ops);
        rows.push(row(
            "CreateToken",
            label,
            async move { app.tokens().create_token(request).await },
            invalid(fields),
        ));
    }
    check(app, rows).await;

    // VerifyToken: a credential that is empty or huge is an answer (not
    // well-formed), not an error; the caller's own fields are checked.
    // VerifyToken needs `tokens:verify` granted by name; made (and used
    // once) before the calls that must change nothing.
    let verifier = app.verifier_token().await;
    app.verify("x", &[]).await;
    let verifier = &verifier;
    let mut rows = Vec::new();
    for credential in [String::new(), huge.clone()] {
        let label = format!("a credential of {} bytes", credential.len());
        let request = bearer(
            pb::VerifyTokenRequest {
                token: credential,
                ..Default::default()
            },
            verifier,
        );
        rows.push(verify_row(
            label,
            async move { app.tokens().verify_token(request).await },
            Expect::Inactive(pb::InactiveReason::Malformed),
        ));
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
        let request = bearer(request, verifier);
        rows.push(verify_row(
            label,
            async move { app.tokens().verify_token(request).await },
            invalid(&[field]),
        ));
    }

    // A leak report of nothing is refused; of empty or huge strings,
    // accepted and ignored.
    let request = pb::RevokeLeakedTokenRequest { secrets: vec![] };
    rows.push(row(
        "RevokeLeakedToken",
        "no secrets",
        async move { app.tokens().revoke_leaked_token(request).await },
        invalid(&["secrets"]),
    ));
    let request = pb::RevokeLeakedTokenRequest {
        secrets: vec![String::new(), huge.clone()],
    };
    rows.push(row(
        "RevokeLeakedToken",
        "junk secrets",
        async move { app.tokens().revoke_leaked_token(request).await },
        Expect::Served,
    ));
    check(app, rows).await;
}

both_backends!(empty_and_huge_fields_are_invalid_argument);

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

async fn sql_metacharacters_are_plain_text_in_every_field(app: TestApp) {
    let app = &app;
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
    let request = bearer(
        pb::GetAccountRequest {
            lookup: Some(pb::get_account_request::Lookup::Username("a_ice".into())),
        },
        ops,
    );
    check(
        app,
        vec![row(
            "GetAccount",
            "a_ice",
            async move { app.accounts().get_account(request).await },
            Expect::Code(Code::NotFound),
        )],
    )
    .await;
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
    let mut rows = Vec::new();
    for nasty in &nasties {
        let label = format!("{nasty:?}");
        // (`alice_` is a fine username.)
        if nasty != "_" {
            let with_name = format!("alice{nasty}");
            let request = bearer(
                pb::CreateAccountRequest {
                    username: with_name.clone(),
                    kind: pb::AccountKind::Robot as i32,
                    ..Default::default()
                },
                ops,
            );
            rows.push(row(
                "CreateAccount",
                &label,
                async move { app.accounts().create_account(request).await },
                invalid(&["username"]),
            ));
            let lookup = pb::get_account_request::Lookup::Username(with_name.clone());
            let request = bearer(
                pb::GetAccountRequest {
                    lookup: Some(lookup),
                },
                ops,
            );
            rows.push(row(
                "GetAccount",
                &label,
                async move { app.accounts().get_account(request).await },
                invalid(&["username"]),
            ));
            let request = pb::SignInRequest {
                username: with_name.clone(),
                password: PASSWORD.into(),
            };
            rows.push(row(
                "SignIn",
                &label,
                async move { app.accounts().sign_in(request).await },
                invalid(&["username"]),
            ));
        }
        let lookup =
            pb::get_account_request::Lookup::AccountId(format!("{}{nasty}", alice.account_id));
        let request = bearer(
            pb::GetAccountRequest {
                lookup: Some(lookup),
            },
            ops,
        );
        rows.push(row(
            "GetAccount",
            &label,
            async move { app.accounts().get_account(request).await },
            invalid(&["account_id"]),
        ));
        let request = bearer(
            pb::ListTokensRequest {
                account_id: alice.account_id.clone(),
                page_token: nasty.clone(),
                ..Default::default()
            },
            ops,
        );
        rows.push(row(
            "ListTokens",
            &label,
            async move { app.tokens().list_tokens(request).await },
            invalid(&["page_token"]),
        ));
        let audit = pb::ListAuditEventsRequest {
            account_id: nasty.clone(),
            ..Default::default()
        };
        let request = bearer(audit, ops);
        rows.push(row(
            "ListAuditEvents",
            &label,
            async move { audit_client(app).list_audit_events(request).await },
            invalid(&["account_id"]),
        ));
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "scoped".into(),
                scopes: vec![format!("project:{nasty}")],
                ..Default::default()
            },
            ops,
        );
        rows.push(row(
            "CreateToken",
            &label,
            async move { app.tokens().create_token(request).await },
            invalid(&["scopes[0]"]),
        ));
        let verify = pb::VerifyTokenRequest {
            token: format!("idpat_{nasty}"),
            required_scopes: vec![nasty.clone()],
            required_resources: vec![],
            client_address: format!("127.0.0.1{nasty}"),
        };
        let request = bearer(verify, &verifier);
        rows.push(verify_row(
            &label,
            async move { app.tokens().verify_token(request).await },
            invalid(&["required_scopes[0]", "client_address"]),
        ));
        let verify = pb::VerifyTokenRequest {
            token: format!("idpat_{nasty}"),
            ..Default::default()
        };
        let request = bearer(verify, &verifier);
        rows.push(verify_row(
            &label,
            async move { app.tokens().verify_token(request).await },
            Expect::Inactive(pb::InactiveReason::Malformed),
        ));
    }
    // Only control characters are refused in token names and emails.
    for nul in ["ci\0", "\0", "ci\0'; --"] {
        let label = format!("{nul:?}");
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: nul.into(),
                ..Default::default()
            },
            ops,
        );
        rows.push(row(
            "CreateToken",
            &label,
            async move { app.tokens().create_token(request).await },
            invalid(&["name"]),
        ));
        let request = bearer(
            pb::CreateAccountRequest {
                username: "nul".into(),
                email: format!("{nul}@example.com"),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            ops,
        );
        rows.push(row(
            "CreateAccount",
            &label,
            async move { app.accounts().create_account(request).await },
            invalid(&["email"]),
        ));
    }
    // A leak report of nasty strings is accepted and revokes nothing.
    let request = pb::RevokeLeakedTokenRequest {
        secrets: nasties
            .iter()
            .flat_map(|n| [n.clone(), format!("idpat_{n}"), format!("idses_{n}")])
            .collect(),
    };
    rows.push(row(
        "RevokeLeakedToken",
        "leak report",
        async move { app.tokens().revoke_leaked_token(request).await },
        Expect::Served,
    ));
    check(app, rows).await;
}

both_backends!(sql_metacharacters_are_plain_text_in_every_field);

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

async fn visually_identical_usernames_can_never_be_two_accounts(app: TestApp) {
    let app = &app;
    let (alice, _) = app.person("alice").await;
    let ops = &app.operator_token;

    // Case is folded: these are alice, and cannot be created again.
    let same_names = ["ALICE", "Alice", "aLiCe"];
    let mut rows = Vec::new();
    for same in same_names {
        let request = bearer(
            pb::CreateAccountRequest {
                username: same.into(),
                kind: pb::AccountKind::Robot as i32,
                ..Default::default()
            },
            ops,
        );
        rows.push(row(
            "CreateAccount",
            same,
            async move { app.accounts().create_account(request).await },
            Expect::Code(Code::AlreadyExists),
        ));
    }
    check(app, rows).await;
    for same in same_names {
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
    let mut rows = Vec::new();
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
            let request = bearer(request, ops);
            rows.push(row(
                "CreateAccount",
                format!("{label} as a {kind:?}"),
                async move { app.accounts().create_account(request).await },
                invalid(&["username"]),
            ));
        }
        let request = pb::GetAccountRequest {
            lookup: Some(pb::get_account_request::Lookup::Username(
                (*lookalike).into(),
            )),
        };
        let request = bearer(request, ops);
        rows.push(row(
            "GetAccount",
            &label,
            async move { app.accounts().get_account(request).await },
            invalid(&["username"]),
        ));
        let request = pb::SignInRequest {
            username: (*lookalike).into(),
            password: PASSWORD.into(),
        };
        rows.push(row(
            "SignIn",
            &label,
            async move { app.accounts().sign_in(request).await },
            invalid(&["username"]),
        ));
    }
    check(app, rows).await;
    // Lookalikes of other letters: Kelvin sign K, long s, Roman numeral
    // one; none may stand beside the ASCII name.
    app.robot("kim").await;
    app.robot("sam").await;
    app.robot("ivy").await;
    let mut rows = Vec::new();
    for lookalike in ["\u{212a}im", "\u{017f}am", "\u{2160}vy", "K\u{0131}m"] {
        let request = pb::CreateAccountRequest {
            username: lookalike.into(),
            kind: pb::AccountKind::Robot as i32,
            ..Default::default()
        };
        let request = bearer(request, ops);
        rows.push(row(
            "CreateAccount",
            format!("{lookalike:?}"),
            async move { app.accounts().create_account(request).await },
            invalid(&["username"]),
        ));
    }
    check(app, rows).await;
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
    let mut rows = Vec::new();
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
        let request = bearer(request, ops);
        rows.push(row(
            "CreateToken",
            &label,
            async move { app.tokens().create_token(request).await },
            invalid(&["name"]),
        ));
        let request = pb::CreateAccountRequest {
            username: "bob".into(),
            email: format!("bob{invisible}@example.com"),
            kind: pb::AccountKind::Robot as i32,
            ..Default::default()
        };
        let request = bearer(request, ops);
        rows.push(row(
            "CreateAccount",
            &label,
            async move { app.accounts().create_account(request).await },
            invalid(&["email"]),
        ));
    }
    check(app, rows).await;
}

both_backends!(visually_identical_usernames_can_never_be_two_accounts);

// ---------------------------------------------------------------------------
// Timestamps.

async fn out_of_range_timestamps_are_invalid_argument(app: TestApp) {
    let app = &app;
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
    let mut rows = Vec::new();
    for (label, expire_time) in never_valid.iter().chain(&in_the_past) {
        let request = pb::CreateTokenRequest {
            account_id: robot.account_id.clone(),
            name: "ci".into(),
            expire_time: *expire_time,
            ..Default::default()
        };
        let request = bearer(request, ops);
        rows.push(row(
            "CreateToken",
            *label,
            async move { app.tokens().create_token(request).await },
            invalid(&["expire_time"]),
        ));
    }
    // Valid, but beyond the server's longest token lifetime.
    let request = pb::CreateTokenRequest {
        account_id: robot.account_id.clone(),
        name: "ci".into(),
        expire_time: ts(year_10000 - 1, 999_999_999),
        ..Default::default()
    };
    let request = bearer(request, ops);
    rows.push(row(
        "CreateToken",
        "9999-12-31",
        async move { app.tokens().create_token(request).await },
        refused("ERROR_REASON_TOKEN_LIFETIME", &["expire_time"]),
    ));

    // As filters, the invalid ones are refused and each field named.
    for (label, bad) in never_valid {
        let request = pb::ListTokensRequest {
            account_id: robot.account_id.clone(),
            expire_before: bad,
            last_used_before: bad,
            ..Default::default()
        };
        let request = bearer(request, ops);
        rows.push(row(
            "ListTokens",
            label,
            async move { app.tokens().list_tokens(request).await },
            invalid(&["expire_before", "last_used_before"]),
        ));
    }
    check(app, rows).await;
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

both_backends!(out_of_range_timestamps_are_invalid_argument);

// ---------------------------------------------------------------------------
// Enums.

async fn unknown_enum_values_are_invalid_argument(app: TestApp) {
    let app = &app;
    let robot = app.robot("ci-bot").await;
    let ops = &app.operator_token;
    let mut rows = Vec::new();
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
        let request = bearer(request, ops);
        rows.push(row(
            "CreateAccount",
            label,
            async move { app.accounts().create_account(request).await },
            invalid(fields),
        ));
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
        let request = bearer(request, ops);
        rows.push(row(
            "ListTokens",
            label,
            async move { app.tokens().list_tokens(request).await },
            invalid(&[field]),
        ));
    }
    for (label, types, field) in [
        ("1000", vec![1000], "types[0]"),
        ("-1", vec![1, -1], "types[1]"),
        ("i32::MAX", vec![i32::MAX], "types[0]"),
    ] {
        let request = pb::ListAuditEventsRequest {
            types,
            ..Default::default()
        };
        let request = bearer(request, ops);
        rows.push(row(
            "ListAuditEvents",
            label,
            async move { audit_client(app).list_audit_events(request).await },
            invalid(&[field]),
        ));
    }
    check(app, rows).await;
    let mut audit = audit_client(app);
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
    let tokens = bearer(request, ops);
    let request = pb::ListAuditEventsRequest {
        types: vec![99; 20_000],
        ..Default::default()
    };
    let events = bearer(request, ops);
    check(
        app,
        vec![
            row(
                "ListTokens",
                "20000 states",
                async move { app.tokens().list_tokens(tokens).await },
                invalid_at_most(&["states"], 32),
            ),
            row(
                "ListAuditEvents",
                "20000 types",
                async move { audit_client(app).list_audit_events(events).await },
                invalid_at_most(&["types"], 32),
            ),
        ],
    )
    .await;
}

both_backends!(unknown_enum_values_are_invalid_argument);

// ---------------------------------------------------------------------------
// Pagination.

/// `text` hex-encoded, the way page tokens are.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn bad_page_sizes_and_garbage_page_tokens_are_invalid_argument(app: TestApp) {
    let app = &app;
    let ops = &app.operator_token;
    let alice = app.robot("alice").await;
    let bob = app.robot("bob").await;
    for name in ["one", "two"] {
        app.token(ops, &alice.account_id, name, &[]).await;
        app.token(ops, &bob.account_id, name, &[]).await;
    }
    let mut audit = audit_client(app);
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
    let mut rows = Vec::new();
    for size in [-1, i32::MIN] {
        let label = format!("page_size {size}");
        let request = list_accounts(size, "");
        rows.push(row(
            "ListAccounts",
            &label,
            async move { app.accounts().list_accounts(request).await },
            invalid(&["page_size"]),
        ));
        let request = list_tokens(&alice, size, "");
        rows.push(row(
            "ListTokens",
            &label,
            async move { app.tokens().list_tokens(request).await },
            invalid(&["page_size"]),
        ));
        let request = list_events(size, "");
        rows.push(row(
            "ListAuditEvents",
            &label,
            async move { audit_client(app).list_audit_events(request).await },
            invalid(&["page_size"]),
        ));
    }
    check(app, rows).await;
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
    let mut rows = Vec::new();
    for token in &garbage {
        let label = format!("page token {:?}", &token[..token.len().min(40)]);
        let request = list_accounts(1, token);
        rows.push(row(
            "ListAccounts",
            &label,
            async move { app.accounts().list_accounts(request).await },
            invalid(&["page_token"]),
        ));
        let request = list_tokens(&alice, 1, token);
        rows.push(row(
            "ListTokens",
            &label,
            async move { app.tokens().list_tokens(request).await },
            invalid(&["page_token"]),
        ));
        let request = list_events(1, token);
        rows.push(row(
            "ListAuditEvents",
            &label,
            async move { audit_client(app).list_audit_events(request).await },
            invalid(&["page_token"]),
        ));
    }
    // A real token only works in its own listing.
    let request = list_tokens(&bob, 1, &alice_token);
    rows.push(row(
        "ListTokens",
        "alice's token for bob",
        async move { app.tokens().list_tokens(request).await },
        invalid(&["page_token"]),
    ));
    for foreign in [&alice_token, &events_token] {
        let request = list_accounts(1, foreign);
        rows.push(row(
            "ListAccounts",
            "foreign token for accounts",
            async move { app.accounts().list_accounts(request).await },
            invalid(&["page_token"]),
        ));
    }
    for foreign in [&alice_token, &accounts_token] {
        let request = list_events(1, foreign);
        rows.push(row(
            "ListAuditEvents",
            "foreign token for events",
            async move { audit_client(app).list_audit_events(request).await },
            invalid(&["page_token"]),
        ));
    }
    let request = list_tokens(&alice, 1, &accounts_token);
    rows.push(row(
        "ListTokens",
        "foreign token for tokens",
        async move { app.tokens().list_tokens(request).await },
        invalid(&["page_token"]),
    ));
    check(app, rows).await;
    app.tokens()
        .list_tokens(list_tokens(&alice, 1, &alice_token))
        .await
        .expect("its own listing");
}

both_backends!(bad_page_sizes_and_garbage_page_tokens_are_invalid_argument);

// ---------------------------------------------------------------------------
// Too many scopes and secrets.

async fn too_many_scopes_or_secrets_are_invalid_argument(app: TestApp) {
    let app = &app;
    let robot = app.robot("ci-bot").await;
    let ops = &app.operator_token;
    let verifier = app.verifier_token().await;
    app.verify("x", &[]).await;
    let scopes = |n: usize| (0..n).map(|i| format!("project:s{i}")).collect::<Vec<_>>();
    let mut rows = Vec::new();
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
        let request = bearer(request, ops);
        // One violation, not one per scope.
        rows.push(row(
            "CreateToken",
            label,
            async move { app.tokens().create_token(request).await },
            invalid_at_most(&["scopes"], 1),
        ));
        let request = pb::VerifyTokenRequest {
            token: "x".into(),
            required_scopes: scopes,
            ..Default::default()
        };
        let request = bearer(request, &verifier);
        rows.push(verify_row(
            label,
            async move { app.tokens().verify_token(request).await },
            invalid(&["required_scopes"]),
        ));
    }
    check(app, rows).await;
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
    check(
        app,
        vec![row(
            "RevokeLeakedToken",
            "1001 secrets",
            async move { app.tokens().revoke_leaked_token(request).await },
            invalid(&["secrets"]),
        )],
    )
    .await;
    assert!(app.verify(&secret, &[]).await.active, "nothing was revoked");
}

both_backends!(too_many_scopes_or_secrets_are_invalid_argument);
