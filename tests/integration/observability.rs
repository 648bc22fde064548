//! Metrics and logs: what `/metrics` reports after real calls, what the JSON
//! log lines carry, and how a W3C `traceparent` is continued (or, malformed,
//! ignored).
//!
//! Every server in this test binary shares one metrics registry (a recorder
//! is global to a process), and other tests call the same RPCs at the same
//! time. So the in-process tests assert that series grew by at least their
//! own calls; exact counts are checked on the real binary, a process of its
//! own, whose every call the test makes.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::{Code, Request, metadata::MetadataValue};

use crate::{
    both_backends,
    support::binary::{
        Secrets, Server, bootstrap_operator, printed_token, random_hex, serving_field, strip_ansi,
    },
    support::{Backend, PASSWORD, TestApp, TestDatabase, bearer, pb},
};

const ACCOUNTS: &str = "identity.v1.AccountsService";
const TOKENS: &str = "identity.v1.TokensService";
const REQUESTS: &str = "identity_grpc_requests_total";
const VERDICTS: &str = "identity_verify_token_verdicts_total";
const CACHE: &str = "identity_verification_cache_lookups_total";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// `GET /metrics` over a plain TCP connection: the body, after checking the
/// status line and the content type.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let (head, body) = get(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "scrape failed: {head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "not the Prometheus text format: {head}"
    );
    body
}

/// A raw HTTP/1.1 GET: the response head and body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .expect("the metrics listener answers within 10 s")
        .unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"));
    let response = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a response head and body");
    (head.to_owned(), body.to_owned())
}

/// The value of the series `name` whose labels include every one of
/// `labels` (summed, should several match); 0 if none does.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, number) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            if !(rest.is_empty() || rest.starts_with('{')) {
                return None;
            }
            labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
                .then(|| number.parse::<f64>().ok())?
        })
        .sum()
}

/// Checks the latency histogram of one RPC and code against the number of
/// calls it finished: every bucket present, counts cumulative, the `+Inf`
/// bucket, `_count` and the call counter all `calls`, and a positive
/// `_sum`. Problems are pushed onto `problems`.
fn check_histogram(text: &str, labels: &[(&str, &str)], calls: f64, problems: &mut Vec<String>) {
    const LATENCY: &str = "identity_grpc_request_duration_seconds";
    let mut previous = 0.0;
    for le in identity::observability::BUCKETS
        .iter()
        .map(f64::to_string)
        .chain(["+Inf".to_owned()])
    {
        let bucket = format!("{LATENCY}_bucket");
        let with_le: Vec<(&str, &str)> = labels
            .iter()
            .copied()
            .chain([("le", le.as_str())])
            .collect();
        let lines = text
            .lines()
            .filter(|line| line.starts_with(&format!("{bucket}{{")))
            .filter(|line| {
                with_le
                    .iter()
                    .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
            })
            .count();
        if lines != 1 {
            problems.push(format!("{lines} {bucket} lines for {with_le:?}"));
        }
        let count = value(text, &bucket, &with_le);
        if count < previous {
            problems.push(format!("{bucket} {with_le:?}: {count} after {previous}"));
        }
        previous = count;
    }
    for (name, seen) in [
        ("+Inf bucket", previous),
        ("_count", value(text, &format!("{LATENCY}_count"), labels)),
        (REQUESTS, value(text, REQUESTS, labels)),
    ] {
        if seen != calls {
            problems.push(format!(
                "{LATENCY} {labels:?} {name}: {seen}, expected {calls}"
            ));
        }
    }
    if value(text, &format!("{LATENCY}_sum"), labels) <= 0.0 {
        problems.push(format!("{LATENCY}_sum {labels:?} is not positive"));
    }
}

/// How much the series grew from `before` to `after`.
fn delta(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    value(after, name, labels) - value(before, name, labels)
}

/// Fails unless every non-empty line of `log` is a JSON object.
pub(crate) fn assert_json_lines(log: &str) {
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {line}"));
        assert!(
            parsed.is_object(),
            "a log line is not a JSON object: {line}"
        );
    }
}

/// A request carrying `traceparent`, and optionally a bearer token.
fn traced<T>(message: T, token: Option<&str>, traceparent: &str) -> Request<T> {
    let mut request = match token {
        Some(token) => bearer(message, token),
        None => Request::new(message),
    };
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(traceparent).expect("ASCII"),
    );
    request
}

fn by_username(username: &str) -> pb::GetAccountRequest {
    pb::GetAccountRequest {
        lookup: Some(pb::get_account_request::Lookup::Username(username.into())),
    }
}

/// A fresh valid `traceparent`: it and its trace id.
fn new_traceparent() -> (String, String) {
    let trace_id = random_hex();
    let parent = &random_hex()[..16];
    (format!("00-{trace_id}-{parent}-01"), trace_id)
}

/// Traceparents that must be ignored: wrong version, all-zero ids,
/// uppercase, wrong lengths, junk.
fn malformed_traceparents() -> Vec<String> {
    let trace = random_hex();
    vec![
        format!("01-{trace}-00f067aa0ba902b7-01"),
        format!("ff-{trace}-00f067aa0ba902b7-01"),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
        format!("00-{trace}-0000000000000000-01"),
        format!("00-{}-00f067aa0ba902b7-01", trace.to_uppercase()),
        format!("00-{}-00f067aa0ba902b7-01", &trace[1..]),
        format!("00-{trace}-00f067aa0ba902b7-1"),
        format!("00-{trace}-00f067aa0ba902b7-01-extra"),
        "not a traceparent at all".to_owned(),
        String::new(),
    ]
}

// ---------------------------------------------------------------------------
// In process: the shared registry
// ---------------------------------------------------------------------------

async fn calls_appear_in_the_metrics_by_rpc_code_verdict_and_cache_result(app: TestApp) {
    let addr = app.metrics_addr.expect("test servers serve metrics");
    let (alice, session) = app.person("alice").await;
    let (_, pat) = app
        .token(&session, &alice.account_id, "ci", &["project:read"])
        .await;
    // Prime the cache with the token, so the next lookups of it hit.
    assert!(app.verify(&pat, &[]).await.active);
    let before = scrape(addr).await;

    let mut accounts = app.accounts();
    for _ in 0..2 {
        accounts
            .get_account(bearer(by_username("alice"), &app.operator_token))
            .await
            .expect("get alice");
    }
    let missing = accounts
        .get_account(bearer(by_username("nobody-here"), &app.operator_token))
        .await;
    assert_eq!(missing.expect_err("no such account").code(), Code::NotFound);
    let anonymous = accounts
        .get_account(Request::new(by_username("alice")))
        .await;
    assert_eq!(
        anonymous.expect_err("no credential").code(),
        Code::Unauthenticated
    );
    for _ in 0..3 {
        assert!(app.verify(&pat, &["project:read"]).await.active);
    }
    assert!(!app.verify(&pat, &["project:write"]).await.active);
    assert!(!app.verify("not-a-token", &[]).await.active);

    let after = scrape(addr).await;
    let grew = |name: &str, labels: &[(&str, &str)], at_least: f64| {
        let grown = delta(&before, &after, name, labels);
        assert!(
            grown >= at_least,
            "{name} {labels:?} grew by {grown}, expected at least {at_least}:\n{after}"
        );
    };
    grew(
        REQUESTS,
        &[
            ("service", ACCOUNTS),
            ("method", "GetAccount"),
            ("code", "OK"),
        ],
        2.0,
    );
    grew(
        REQUESTS,
        &[
            ("service", ACCOUNTS),
            ("method", "GetAccount"),
            ("code", "NOT_FOUND"),
        ],
        1.0,
    );
    grew(
        REQUESTS,
        &[
            ("service", ACCOUNTS),
            ("method", "GetAccount"),
            ("code", "UNAUTHENTICATED"),
        ],
        1.0,
    );
    grew(
        REQUESTS,
        &[
            ("service", TOKENS),
            ("method", "VerifyToken"),
            ("code", "OK"),
        ],
        5.0,
    );
    grew(
        "identity_grpc_request_duration_seconds_count",
        &[("method", "GetAccount"), ("code", "OK")],
        2.0,
    );
    grew(
        "identity_grpc_request_duration_seconds_bucket",
        &[("method", "GetAccount"), ("code", "OK"), ("le", "+Inf")],
        2.0,
    );
    grew(VERDICTS, &[("verdict", "active")], 3.0);
    grew(VERDICTS, &[("verdict", "insufficient_scope")], 1.0);
    grew(VERDICTS, &[("verdict", "malformed")], 1.0);
    // Four verifications of the primed token and eight authentications
    // of the operator, every one counted: all cached on SQLite; on
    // PostgreSQL bypassing the cache until the change channel proves
    // itself current, and a miss once after each time it did not (the
    // cache starts empty again), which a loaded machine makes happen.
    let lookups = delta(&before, &after, CACHE, &[("result", "hit")])
        + delta(&before, &after, CACHE, &[("result", "bypassed")])
        + delta(&before, &after, CACHE, &[("result", "miss")]);
    assert!(lookups >= 12.0, "cache lookups grew by {lookups}:\n{after}");
    if app.db.url.starts_with("sqlite:") {
        grew(CACHE, &[("result", "hit")], 12.0);
    }
    for (name, help) in [
        (REQUESTS, "# TYPE identity_grpc_requests_total counter"),
        (
            "identity_grpc_request_duration_seconds",
            "# TYPE identity_grpc_request_duration_seconds histogram",
        ),
        (VERDICTS, "# HELP identity_verify_token_verdicts_total"),
        (
            "identity_db_pool_max_connections",
            "# TYPE identity_db_pool_max_connections gauge",
        ),
    ] {
        assert!(after.contains(help), "{name}: no {help:?} in\n{after}");
    }
    // Sub-millisecond buckets exist.
    assert!(after.contains("le=\"0.0001\""), "{after}");

    // Nothing a client chose is a label: no username, no secret.
    for secret in [
        &pat,
        &session,
        &app.operator_token,
        "alice",
        "nobody-here",
        "not-a-token",
        PASSWORD,
    ] {
        assert!(!after.contains(secret), "{secret:?} is in the metrics");
    }

    let (head, _) = get(addr, "/elsewhere").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
}
both_backends!(calls_appear_in_the_metrics_by_rpc_code_verdict_and_cache_result);

async fn a_valid_traceparent_is_continued_and_a_malformed_one_ignored(app: TestApp) {
    let mut accounts = app.accounts();
    let (traceparent, trace_id) = new_traceparent();
    let parent_id = &traceparent[36..52];
    let answered = accounts
        .get_account(traced(
            by_username("ops"),
            Some(&app.operator_token),
            &traceparent,
        ))
        .await
        .expect("a traced call succeeds");
    let response = answered
        .metadata()
        .get("traceresponse")
        .expect("a traceresponse")
        .to_str()
        .expect("ASCII")
        .to_owned();
    let parts: Vec<&str> = response.split('-').collect();
    assert_eq!(parts.len(), 4, "{response}");
    assert_eq!(parts[0], "00", "{response}");
    assert_eq!(parts[1], trace_id, "the trace continues: {response}");
    assert_eq!(parts[2].len(), 16, "{response}");
    assert!(
        parts[2]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{response}"
    );
    assert_ne!(parts[2], "0000000000000000", "{response}");
    assert_ne!(
        parts[2], parent_id,
        "this service's own span id: {response}"
    );
    assert_eq!(parts[3], "01", "the flags are kept: {response}");

    // An error answer (trailers-only) carries it too.
    let refused = accounts
        .get_account(traced(by_username("ops"), None, &traceparent))
        .await
        .expect_err("no credential");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(
        refused.metadata().get("traceresponse").is_some(),
        "{refused:?}"
    );

    for bad in malformed_traceparents() {
        let answered = accounts
            .get_account(traced(by_username("ops"), Some(&app.operator_token), &bad))
            .await
            .unwrap_or_else(|e| panic!("traceparent {bad:?} broke the call: {e}"));
        assert!(
            answered.metadata().get("traceresponse").is_none(),
            "traceparent {bad:?} was not ignored"
        );
    }
    // Two traceparents are ambiguous: ignored as well.
    let mut twice = traced(by_username("ops"), Some(&app.operator_token), &traceparent);
    twice.metadata_mut().append(
        "traceparent",
        MetadataValue::try_from(traceparent.as_str()).expect("ASCII"),
    );
    let answered = accounts
        .get_account(twice)
        .await
        .expect("two traceparents are ignored");
    assert!(answered.metadata().get("traceresponse").is_none());
}
both_backends!(a_valid_traceparent_is_continued_and_a_malformed_one_ignored);

// ---------------------------------------------------------------------------
// The real binary: exact counts and JSON logs
// ---------------------------------------------------------------------------

/// One `finished` log line: its event fields and its call span's fields.
struct Finished {
    fields: serde_json::Value,
    span: serde_json::Value,
}

impl Finished {
    fn span_str(&self, key: &str) -> Option<&str> {
        self.span.get(key)?.as_str()
    }
}

/// Every `finished` event in a JSON log.
fn finished_events(log: &str) -> Vec<Finished> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|json| json["fields"]["message"] == "finished")
        .map(|json| Finished {
            fields: json["fields"].clone(),
            span: json["span"].clone(),
        })
        .collect()
}

async fn a_json_logging_server_reports_each_call_exactly_on(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let mut secrets = Secrets::default();
    let operator = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    secrets.token("operator token", &operator);
    let server = Server::start(&db.url, &[("IDENTITY_LOG_FORMAT", "json")]).await;
    let metrics_addr = server.metrics_addr.expect("metrics are on");
    let channel = server.channel().await;
    let mut accounts = pb::accounts_service_client::AccountsServiceClient::new(channel.clone());
    let mut tokens = pb::tokens_service_client::TokensServiceClient::new(channel.clone());

    // GetAccount: OK twice (once traced, once with a malformed
    // traceparent), UNAUTHENTICATED once, NOT_FOUND once.
    let (traceparent, trace_id) = new_traceparent();
    let answered = accounts
        .get_account(traced(by_username("ops"), Some(&operator), &traceparent))
        .await
        .expect("get ops");
    let span_id = answered
        .metadata()
        .get("traceresponse")
        .expect("a traceresponse")
        .to_str()
        .expect("ASCII")
        .split('-')
        .nth(2)
        .expect("a span id")
        .to_owned();
    let ops_id = answered.into_inner().account.expect("account").account_id;
    let malformed = format!("00-{}-00f067aa0ba902b7-01", random_hex().to_uppercase());
    accounts
        .get_account(traced(by_username("ops"), Some(&operator), &malformed))
        .await
        .expect("a malformed traceparent is ignored");
    let anonymous = accounts.get_account(Request::new(by_username("ops"))).await;
    assert_eq!(
        anonymous.expect_err("anonymous").code(),
        Code::Unauthenticated
    );
    let missing = accounts
        .get_account(bearer(by_username("nobody"), &operator))
        .await;
    assert_eq!(missing.expect_err("missing").code(), Code::NotFound);

    // A person, two failed sign-ins (wrong password, unknown user) and one
    // that succeeds: one hash and three verifications.
    let password = format!("pw-{}-pw", random_hex());
    let wrong = format!("wrong-{}", random_hex());
    secrets.plain("password", &password);
    secrets.plain("wrong password", &wrong);
    let alice = accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "alice".into(),
                password: password.clone(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create alice")
        .into_inner()
        .account
        .expect("account");
    for (username, password) in [("alice", &wrong), ("nobody", &password)] {
        let failed = accounts
            .sign_in(pb::SignInRequest {
                username: username.into(),
                password: password.clone(),
            })
            .await;
        assert_eq!(
            failed.expect_err("a failed sign-in").code(),
            Code::Unauthenticated
        );
    }
    let session = accounts
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: password.clone(),
        })
        .await
        .expect("sign in")
        .into_inner()
        .session_token;
    secrets.token("session", &session);

    // A token, verified: active twice, then lacking a scope, then revoked;
    // and a malformed and an unknown credential.
    let created = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                scopes: vec!["project:read".into()],
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create a token")
        .into_inner();
    let pat = created.secret;
    secrets.token("personal access token", &pat);
    let unknown = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::PersonalAccessToken,
    )
    .expose()
    .to_owned();
    secrets.token("unknown token", &unknown);
    // VerifyToken needs `tokens:verify` granted by name.
    let verifier_secret = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create a verifier token")
        .into_inner()
        .secret;
    secrets.token("verifier token", &verifier_secret);
    let verifier = tokens.clone();
    let verify = |token: &str, scopes: &[&str]| {
        let mut tokens = verifier.clone();
        let request = bearer(
            pb::VerifyTokenRequest {
                token: token.to_owned(),
                required_scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                ..Default::default()
            },
            &verifier_secret,
        );
        async move {
            tokens
                .verify_token(request)
                .await
                .expect("verify")
                .into_inner()
        }
    };
    assert!(verify(&pat, &["project:read"]).await.active);
    assert!(verify(&pat, &[]).await.active);
    assert!(!verify(&pat, &["project:write"]).await.active);
    assert!(!verify("garbage", &[]).await.active);
    assert!(!verify(&unknown, &[]).await.active);
    tokens
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: created.token.expect("token").token_id,
            },
            &operator,
        ))
        .await
        .expect("revoke");
    assert!(!verify(&pat, &[]).await.active);

    let text = scrape(metrics_addr).await;
    let rpc = |service: &str, method: &str, code: &str| {
        value(
            &text,
            REQUESTS,
            &[("service", service), ("method", method), ("code", code)],
        )
    };
    let expected = [
        (ACCOUNTS, "GetAccount", "OK", 2.0),
        (ACCOUNTS, "GetAccount", "UNAUTHENTICATED", 1.0),
        (ACCOUNTS, "GetAccount", "NOT_FOUND", 1.0),
        (ACCOUNTS, "CreateAccount", "OK", 1.0),
        (ACCOUNTS, "SignIn", "OK", 1.0),
        (ACCOUNTS, "SignIn", "UNAUTHENTICATED", 2.0),
        (TOKENS, "CreateToken", "OK", 2.0),
        (TOKENS, "RevokeToken", "OK", 1.0),
        (TOKENS, "VerifyToken", "OK", 6.0),
    ];
    let mut problems = Vec::new();
    for (service, method, code, count) in expected {
        let seen = rpc(service, method, code);
        if seen != count {
            problems.push(format!(
                "{service}/{method} {code}: {seen}, expected {count}"
            ));
        }
    }
    let total = value(&text, REQUESTS, &[]);
    if total != 17.0 {
        problems.push(format!("{total} calls in all, expected 17"));
    }
    for (service, method, code, calls) in [
        (TOKENS, "VerifyToken", "OK", 6.0),
        (ACCOUNTS, "GetAccount", "OK", 2.0),
        (ACCOUNTS, "SignIn", "UNAUTHENTICATED", 2.0),
    ] {
        let labels = [("service", service), ("method", method), ("code", code)];
        check_histogram(&text, &labels, calls, &mut problems);
    }
    let all = value(&text, "identity_grpc_request_duration_seconds_count", &[]);
    if all != 17.0 {
        problems.push(format!("{all} latency samples in all, expected 17"));
    }
    for line in [
        "# TYPE identity_grpc_requests_total counter",
        "# TYPE identity_grpc_request_duration_seconds histogram",
        "# HELP identity_grpc_request_duration_seconds",
    ] {
        if !text.lines().any(|l| l.starts_with(line)) {
            problems.push(format!("no {line:?}"));
        }
    }
    for (name, labels, count) in [
        (
            "identity_grpc_request_duration_seconds_count",
            &[("method", "GetAccount"), ("code", "OK")][..],
            2.0,
        ),
        (
            "identity_grpc_request_duration_seconds_bucket",
            &[("method", "GetAccount"), ("code", "OK"), ("le", "+Inf")][..],
            2.0,
        ),
        (VERDICTS, &[("verdict", "active")][..], 2.0),
        (VERDICTS, &[("verdict", "insufficient_scope")][..], 1.0),
        (VERDICTS, &[("verdict", "malformed")][..], 1.0),
        (VERDICTS, &[("verdict", "unknown")][..], 1.0),
        (VERDICTS, &[("verdict", "revoked")][..], 1.0),
        (VERDICTS, &[("verdict", "expired")][..], 0.0),
        (
            "identity_sign_in_failures_total",
            &[("cause", "wrong_password")][..],
            1.0,
        ),
        (
            "identity_sign_in_failures_total",
            &[("cause", "unknown_user")][..],
            1.0,
        ),
        ("identity_sign_in_failures_total", &[][..], 2.0),
        // One hash (the new account) and three verifications (sign-ins).
        ("identity_password_hash_wait_seconds_count", &[][..], 4.0),
        ("identity_password_hashes_waiting", &[][..], 0.0),
        ("identity_password_hashes_running", &[][..], 0.0),
        ("identity_db_pool_max_connections", &[][..], 16.0),
    ] {
        let seen = value(&text, name, labels);
        if seen != count {
            problems.push(format!("{name} {labels:?}: {seen}, expected {count}"));
        }
    }
    // Cache lookups: the caller of each of the 13 authenticated calls, and
    // the 5 well-formed credentials verified ("garbage" never reaches it).
    let lookups = value(&text, CACHE, &[]);
    if lookups != 18.0 {
        problems.push(format!("{lookups} cache lookups, expected 18"));
    }
    if backend == Backend::Sqlite && value(&text, CACHE, &[("result", "hit")]) < 1.0 {
        problems.push("no cache hit on SQLite".to_owned());
    }
    for line in [
        "identity_password_hashes_waiting",
        "identity_db_pool_connections{state=\"idle\"}",
    ] {
        if !text.contains(line) {
            problems.push(format!("no {line}"));
        }
    }
    assert!(problems.is_empty(), "{}\n\n{text}", problems.join("\n"));
    for name in ["alice", "nobody"] {
        assert!(
            !text.contains(name),
            "the username {name:?} is in the metrics:\n{text}"
        );
    }

    drop((accounts, tokens, channel));
    let stopped = server.terminate().await;
    assert!(stopped.status.success(), "{stopped:?}");
    assert_json_lines(&stopped.stderr);
    let events = finished_events(&stopped.stderr);

    // The traced call: its trace id, this service's span id, the caller.
    let traced: Vec<&Finished> = events
        .iter()
        .filter(|e| e.span_str("trace_id") == Some(trace_id.as_str()))
        .collect();
    assert_eq!(
        traced.len(),
        1,
        "one call had the trace:\n{}",
        stopped.stderr
    );
    let call = traced[0];
    assert_eq!(
        call.span_str("rpc"),
        Some("identity.v1.AccountsService/GetAccount")
    );
    assert_eq!(call.span_str("span_id"), Some(span_id.as_str()));
    assert_eq!(call.span_str("account_id"), Some(ops_id.as_str()));
    assert!(
        call.span_str("token_id").is_some_and(|t| !t.is_empty()),
        "no token id"
    );
    assert_eq!(call.fields["code"], "OK");
    let latency = call.fields["latency_ms"]
        .as_f64()
        .expect("a numeric latency");
    assert!((0.0..10_000.0).contains(&latency), "latency {latency} ms");

    // Every call at info is logged once: VerifyToken (6 calls) is at debug.
    assert_eq!(events.len(), 11, "finished events:\n{}", stopped.stderr);
    for event in &events {
        let trace = event
            .span_str("trace_id")
            .expect("every call has a trace id");
        assert!(
            trace.len() == 32
                && trace
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
            "trace id {trace:?}"
        );
        assert!(
            !malformed.contains(trace),
            "a malformed traceparent was continued"
        );
        assert!(event.fields["code"].is_string() && event.fields["latency_ms"].is_number());
        // Where the call came from, as the throttle and the audit log saw it.
        assert!(
            event
                .span_str("client_address")
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "no client address: {:?}",
            event.span
        );
        // A failure names its ErrorInfo reason; a success has none.
        assert_eq!(
            event.fields.get("reason").is_some(),
            event.fields["code"] != "OK",
            "{:?}",
            event.fields
        );
    }
    let reasons: Vec<(&str, &str)> = events
        .iter()
        .filter_map(|e| {
            Some((
                e.fields["code"].as_str()?,
                e.fields.get("reason")?.as_str()?,
            ))
        })
        .collect();
    assert!(
        reasons.contains(&("NOT_FOUND", "ERROR_REASON_ACCOUNT_NOT_FOUND")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&("UNAUTHENTICATED", "ERROR_REASON_CREDENTIAL_MISSING")),
        "{reasons:?}"
    );
    let unauthenticated = events
        .iter()
        .filter(|e| e.fields["code"] == "UNAUTHENTICATED")
        .collect::<Vec<_>>();
    assert_eq!(unauthenticated.len(), 3, "one GetAccount and two sign-ins");
    assert!(
        unauthenticated
            .iter()
            .all(|e| e.span_str("account_id").is_none()),
        "an unauthenticated call has no account"
    );
    secrets.assert_absent_from(&[
        ("the server's stderr", &stopped.stderr),
        ("the server's metrics", &text),
    ]);
}

mod a_json_logging_server_reports_each_call_exactly {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        a_json_logging_server_reports_each_call_exactly_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        a_json_logging_server_reports_each_call_exactly_on(Backend::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_be_turned_off() {
    let app = crate::support::TestApp::spawn_with(Backend::Sqlite, |config| {
        config.metrics_addr = None;
    })
    .await;
    assert_eq!(app.metrics_addr, None);
    let db = TestDatabase::new(Backend::Sqlite).await;
    let server = Server::start(&db.url, &[("IDENTITY_METRICS_ADDR", "off")]).await;
    assert_eq!(
        server.metrics_addr, None,
        "the serving line says metrics are off"
    );
    // It serves all the same (and has its signal handler by then).
    let status = tonic_health::pb::health_client::HealthClient::new(server.channel().await)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("a health check")
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let stopped = server.terminate().await;
    assert!(stopped.status.success(), "{stopped:?}");
    app.stop().await;
}

/// The binary names its build when it starts and in `identity_build_info`,
/// and exports the process's own metrics (memory, CPU, open files).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_build_and_the_process_are_in_the_log_and_the_metrics() {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let server = Server::start(&db.url, &[]).await;
    let metrics = scrape(server.metrics_addr.expect("metrics are on")).await;
    let finished = server.terminate().await;
    let serving = finished
        .stderr
        .lines()
        .find(|line| serving_field(line, "addr").is_some())
        .map(strip_ansi)
        .expect("a serving line");
    let field = |name: &str| {
        serving_field(&serving, name).unwrap_or_else(|| panic!("no {name} in {serving}"))
    };
    assert_eq!(field("version"), env!("CARGO_PKG_VERSION"));
    let commit = field("commit");
    assert!(!commit.is_empty(), "{serving}");
    let info = format!(
        "identity_build_info{{version=\"{}\",commit=\"{commit}\"}} 1",
        env!("CARGO_PKG_VERSION")
    );
    assert!(metrics.contains(&info), "no {info} in:\n{metrics}");
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
            .trim()
            .parse()
            .expect("a number")
    };
    assert!(value("process_resident_memory_bytes") > 1_000_000.0);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_threads") >= 1.0);
    assert!(value("process_cpu_seconds_total") >= 0.0);
}
