//! What a client can hold on a listener, tried with raw HTTP/2 frames over
//! TCP: the preface timeout, idle connections, the connection limit, the
//! stream limit of the plaintext health port, the health budget, streams
//! the server is made to reset ("MadeYouReset"), request trailers and a
//! second message on a unary call, deadlines, reflection streams held open,
//! and responses the client does not take in. The transport tests run
//! on SQLite only (the store plays no part in them); the ones that reach a
//! handler run on both stores.

use std::{net::SocketAddr, time::Duration};

use prost::bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{Backend, TestApp, pb, plaintext};

/// The longest any test here waits for the server to act; only ever
/// reached when the server does not do what it should.
const PATIENCE: Duration = Duration::from_secs(30);

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One HTTP/2 frame as read off the wire.
#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY.
    fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().expect("4 bytes"))
    }
}

/// A raw HTTP/2 client connection.
struct Raw {
    stream: TcpStream,
}

impl Raw {
    /// Connects without sending anything.
    async fn tcp(addr: SocketAddr) -> Self {
        Self {
            stream: TcpStream::connect(addr).await.expect("connect"),
        }
    }

    /// Connects and sends the preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> Self {
        let mut raw = Self::tcp(addr).await;
        raw.stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .expect("preface");
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.stream
            .write_all(&frame(kind, flags, stream, payload))
            .await
            .expect("write a frame");
    }

    /// The next frame, or `None` once the server has closed the connection.
    /// Answers the server's pings, as every client must.
    async fn frame(&mut self) -> Option<Frame> {
        let frame = read_frame(&mut self.stream).await?;
        if frame.kind == PING && frame.flags & ACK == 0 {
            let payload = frame.payload.clone();
            // The server may be closing already.
            let _ = self
                .stream
                .write_all(&self::frame(PING, ACK, 0, &payload))
                .await;
        }
        Some(frame)
    }

    /// Reads frames until the server closes the connection, returning them.
    async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.frame().await {
            frames.push(frame);
        }
        frames
    }
}

/// The next frame `reader` holds, or `None` once the server has closed the
/// connection.
async fn read_frame(reader: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let read = async {
        let mut header = [0_u8; 9];
        reader.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; len];
        reader.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes(header[5..9].try_into().ok()?) & 0x7fff_ffff,
            payload,
        })
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("the server neither sent a frame nor closed the connection")
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len())
        .expect("small frame")
        .to_be_bytes();
    let mut out = vec![len[1], len[2], len[3], kind, flags];
    out.extend(stream.to_be_bytes());
    out.extend(payload);
    out
}

/// An HPACK block of literal fields (never indexed, no Huffman): the
/// request line of a gRPC call to `path`, then `extra`.
fn request_headers(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    for (name, value) in fields.iter().chain(extra) {
        block.push(0x10);
        hpack_string(&mut block, name.as_bytes());
        hpack_string(&mut block, value.as_bytes());
    }
    block
}

fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    // A 7-bit prefix integer.
    if s.len() < 127 {
        out.push(s.len() as u8);
    } else {
        out.push(127);
        let mut rest = s.len() - 127;
        while rest >= 128 {
            out.push((rest % 128) as u8 | 0x80);
            rest /= 128;
        }
        out.push(rest as u8);
    }
    out.extend(s);
}

/// A gRPC message frame holding `message`.
fn grpc_message(message: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend(u32::try_from(message.len()).expect("small").to_be_bytes());
    out.extend(message);
    out
}

const WATCH: &str = "/grpc.health.v1.Health/Watch";
const CHECK: &str = "/grpc.health.v1.Health/Check";

/// A plaintext health listener besides the main port.
fn with_health_port(config: &mut identity::config::Config) {
    config.health_listen_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_the_preface_are_closed() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        with_health_port(config);
        config.connections.preface_timeout = Duration::from_millis(300);
    })
    .await;
    for addr in [app.addr, app.health_addr.expect("a health port")] {
        // Nothing at all.
        let mut silent = Raw::tcp(addr).await;
        silent.until_closed().await;
        // Part of the preface.
        let mut partial = Raw::tcp(addr).await;
        partial
            .stream
            .write_all(b"PRI * HTTP/2.0")
            .await
            .expect("write");
        partial.until_closed().await;
    }
    // A client that does speak HTTP/2 is served as before.
    let status = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("a health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_busy_ones_kept() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        with_health_port(config);
        config.connections.idle_timeout = Duration::from_secs(1);
    })
    .await;
    for addr in [app.addr, app.health_addr.expect("a health port")] {
        // A connection with a Watch stream open, and one with nothing.
        let mut busy = Raw::connect(addr).await;
        busy.send(HEADERS, END_HEADERS, 1, &request_headers(WATCH, &[]))
            .await;
        busy.send(DATA, END_STREAM, 1, &grpc_message(&[])).await;
        let mut idle = Raw::connect(addr).await;
        let frames = idle.until_closed().await;
        assert!(
            frames
                .iter()
                .any(|f| f.kind == GOAWAY && f.error_code() == 0),
            "an idle connection is closed with GOAWAY(NO_ERROR): {frames:?}"
        );
        // The busy one is still served.
        busy.send(PING, 0, 0, b"still up").await;
        loop {
            let frame = busy.frame().await.expect("the busy connection is open");
            assert_ne!(
                frame.kind, GOAWAY,
                "{addr}: the busy connection was closed: {frame:?}"
            );
            if frame.kind == PING && frame.flags & ACK != 0 {
                break;
            }
        }
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_at_accept() {
    // The test's own channel holds one connection already.
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.connections.max_connections = 2;
    })
    .await;
    let mut admitted = Raw::connect(app.addr).await;
    let first = admitted.frame().await.expect("the server's SETTINGS");
    assert_eq!(first.kind, SETTINGS, "{first:?}");
    let mut refused = Raw::tcp(app.addr).await;
    let frames = refused.until_closed().await;
    assert!(
        frames.is_empty(),
        "a connection over the limit got frames: {frames:?}"
    );
    let metrics = crate::observability::scrape(app.metrics_addr.expect("metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("identity_connections_refused_total{listener=\"grpc\"}")),
        "no refusal counted:\n{metrics}"
    );
    // The admitted ones are still served.
    let status = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("a health check")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_port_limits_streams_per_connection() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        with_health_port(config);
        config.max_streams_per_connection = 4;
    })
    .await;
    let mut raw = Raw::connect(app.health_addr.expect("a health port")).await;
    let settings = raw.frame().await.expect("the server's SETTINGS");
    assert_eq!(settings.kind, SETTINGS);
    let advertised = settings
        .payload
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes(s[2..6].try_into().expect("4 bytes")));
    assert_eq!(advertised, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");
    // Five Watch streams, each open for as long as the connection.
    for stream in [1, 3, 5, 7, 9] {
        raw.send(HEADERS, END_HEADERS, stream, &request_headers(WATCH, &[]))
            .await;
        raw.send(DATA, END_STREAM, stream, &grpc_message(&[])).await;
    }
    loop {
        let frame = raw.frame().await.expect("the connection stays open");
        if frame.stream == 9 {
            assert!(
                frame.kind == RST_STREAM && frame.error_code() == REFUSED_STREAM,
                "the fifth stream was served: {frame:?}"
            );
            break;
        }
        assert_ne!(frame.kind, RST_STREAM, "{frame:?}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_calls_have_a_bounded_budget_of_their_own() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        with_health_port(config);
        config.connections.max_health_requests = 2;
    })
    .await;
    let health_port = plaintext(app.health_addr.expect("a health port"))
        .connect()
        .await
        .expect("connect to the health port");
    let mut client = HealthClient::new(health_port);
    let mut watches = Vec::new();
    for _ in 0..2 {
        let mut watch = client
            .watch(HealthCheckRequest::default())
            .await
            .expect("a Watch within the budget")
            .into_inner();
        let first = watch.message().await.expect("a status").expect("a status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        watches.push(watch);
    }
    let refused = client
        .watch(HealthCheckRequest::default())
        .await
        .expect_err("a third Watch on that listener");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    // Open streams, which anyone can hold, never starve the probes: Check
    // has a budget of its own.
    let status = client
        .check(HealthCheckRequest::default())
        .await
        .expect("a Check while the Watch budget is full")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    // The main port has a budget of its own, and the API its own.
    let status = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest::default())
        .await
        .expect("health on the main port")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    drop(watches);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_server_must_reset_are_limited_per_connection() {
    let app = TestApp::spawn_with(Backend::Sqlite, with_health_port).await;
    for addr in [app.addr, app.health_addr.expect("a health port")] {
        let raw = Raw::connect(addr).await;
        let (mut reader, mut writer) = raw.stream.into_split();
        const STREAMS: u32 = 1100;
        let writer = tokio::spawn(async move {
            let headers = request_headers(CHECK, &[("content-length", "5")]);
            for i in 0..STREAMS {
                let stream = 2 * i + 1;
                // A request that announces a body and ends without one is
                // a stream error: the server must reset the stream.
                let frames = frame(HEADERS, END_HEADERS | END_STREAM, stream, &headers);
                if writer.write_all(&frames).await.is_err() {
                    return; // The server closed the connection.
                }
            }
        });
        let mut resets = 0;
        let goaway = loop {
            let Some(frame) = read_frame(&mut reader).await else {
                break None;
            };
            match frame.kind {
                RST_STREAM => resets += 1,
                GOAWAY => break Some(frame.error_code()),
                _ => {}
            }
            if resets == STREAMS {
                break None;
            }
        };
        assert_eq!(
            goaway,
            Some(ENHANCE_YOUR_CALM),
            "{addr}: {resets} streams reset without GOAWAY(ENHANCE_YOUR_CALM)"
        );
        assert!(resets < STREAMS, "{resets} resets");
        writer.await.expect("the writer");
    }
    app.stop().await;
}

/// Makes one gRPC call with the `h2` crate, which sends exactly what it is
/// given: `headers` besides the request line, each of `messages` framed,
/// then `trailers` when there are any. The call's status code.
async fn h2_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, String)],
    messages: &[Vec<u8>],
    trailers: &[(&str, String)],
) -> Code {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(()).expect("a request");
    let (response, mut send) = client.send_request(request, false).expect("send");
    let mut body = Vec::new();
    for message in messages {
        body.extend(grpc_message(message));
    }
    send.send_data(Bytes::from(body), trailers.is_empty())
        .expect("send the body");
    if !trailers.is_empty() {
        let mut map = http::HeaderMap::new();
        for (name, value) in trailers {
            map.insert(
                http::HeaderName::from_bytes(name.as_bytes()).expect("a header name"),
                value.parse().expect("a header value"),
            );
        }
        send.send_trailers(map).expect("send the trailers");
    }
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("an answer")
        .expect("a response");
    let (parts, mut body) = response.into_parts();
    let status = match parts.headers.get("grpc-status") {
        Some(status) => status.clone(),
        None => {
            while let Some(chunk) = body.data().await {
                let chunk = chunk.expect("the response body");
                let _ = body.flow_control().release_capacity(chunk.len());
            }
            body.trailers()
                .await
                .expect("the trailers")
                .and_then(|t| t.get("grpc-status").cloned())
                .expect("a grpc-status")
        }
    };
    Code::from_bytes(status.as_bytes())
}

async fn request_trailers_and_second_messages_are_refused(app: TestApp) {
    const LIST: &str = "/identity.v1.AccountsService/ListAccounts";
    let valid = || ("authorization", format!("Bearer {}", app.operator_token));
    let garbage = ("authorization", "Bearer garbage".to_owned());
    let message = prost::Message::encode_to_vec(&pb::ListAccountsRequest::default());
    let one = std::slice::from_ref(&message);

    // The credential in the headers: served.
    let served = h2_call(app.addr, LIST, &[valid()], one, &[]).await;
    assert_eq!(served, Code::Ok);
    // A garbage credential in the headers, a valid one in a trailer.
    let overridden = h2_call(app.addr, LIST, &[garbage], one, &[valid()]).await;
    assert_eq!(overridden, Code::InvalidArgument);
    // No credential in the headers, a valid one in a trailer.
    let smuggled = h2_call(app.addr, LIST, &[], one, &[valid()]).await;
    assert_eq!(smuggled, Code::InvalidArgument);
    // Any trailer at all.
    let trailer = h2_call(
        app.addr,
        LIST,
        &[valid()],
        one,
        &[("x-note", "hello".to_owned())],
    )
    .await;
    assert_eq!(trailer, Code::InvalidArgument);
    // Two messages on a unary call.
    let two = [message.clone(), message.clone()];
    let second = h2_call(app.addr, LIST, &[valid()], &two, &[]).await;
    assert_eq!(second, Code::InvalidArgument);
    app.stop().await;
}
crate::both_backends!(request_trailers_and_second_messages_are_refused);

fn new_person(name: &str) -> pb::CreateAccountRequest {
    pb::CreateAccountRequest {
        username: name.into(),
        password: crate::support::PASSWORD.into(),
        email: format!("{name}@example.com"),
        kind: pb::AccountKind::Person as i32,
        role: 0,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_their_deadline_are_deadline_exceeded() {
    // The server's own limit: hashing the password takes longer.
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.request_timeout = Duration::from_millis(1);
    })
    .await;
    let late = app
        .accounts()
        .create_account(crate::support::bearer(
            new_person("alice"),
            &app.operator_token,
        ))
        .await
        .expect_err("a call past the server's limit");
    assert_eq!(late.code(), Code::DeadlineExceeded, "{late:?}");
    app.stop().await;

    // The client's grpc-timeout (sent raw: tonic's client would enforce it
    // itself as well).
    let app = TestApp::spawn(Backend::Sqlite).await;
    let message = prost::Message::encode_to_vec(&new_person("bob"));
    let code = h2_call(
        app.addr,
        "/identity.v1.AccountsService/CreateAccount",
        &[
            ("authorization", format!("Bearer {}", app.operator_token)),
            ("grpc-timeout", "1m".to_owned()),
        ],
        &[message],
        &[],
    )
    .await;
    assert_eq!(code, Code::DeadlineExceeded);
    app.stop().await;
}

const LIST_ACCOUNTS: &str = "/identity.v1.AccountsService/ListAccounts";
const REFLECTION: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// An HTTP/2 connection by the `h2` crate that grants `window` bytes of
/// flow control to each stream (0: the server can send a response's
/// headers and nothing more), and the task that drives it, which ends when
/// the connection does.
async fn h2_client(
    addr: SocketAddr,
    window: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake(tcp)
        .await
        .expect("HTTP/2");
    let driver = tokio::spawn(connection);
    (client.ready().await.expect("ready"), driver)
}

/// Opens a call on `client` to `path` with `authorization`, sends
/// `message` unless it is `None` (which leaves the request open), and
/// returns the response's headers with the request's sending half.
async fn h2_open(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    authorization: Option<&str>,
    message: Option<&[u8]>,
) -> (http::response::Parts, h2::SendStream<Bytes>) {
    *client = client.clone().ready().await.expect("ready");
    let (response, mut send) = client
        .send_request(h2_request(path, authorization), false)
        .expect("send");
    if let Some(message) = message {
        send.send_data(Bytes::from(grpc_message(message)), true)
            .expect("send the body");
    }
    let response = tokio::time::timeout(PATIENCE, response)
        .await
        .expect("the response's headers")
        .expect("a response");
    (response.into_parts().0, send)
}

/// A gRPC request's headers for `path`, with `authorization` as a bearer
/// credential.
fn h2_request(path: &str, authorization: Option<&str>) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if let Some(token) = authorization {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    request.body(()).expect("a request")
}

/// Makes `places` ListAccounts calls at once, each on a connection of its
/// own, and checks that every one is served: that many places are free.
async fn every_place_serves(app: &TestApp, places: usize) {
    let message = prost::Message::encode_to_vec(&pb::ListAccountsRequest::default());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..places {
        let (addr, message) = (app.addr, message.clone());
        let authorization = format!("Bearer {}", app.operator_token);
        calls.spawn(async move {
            let headers = [("authorization", authorization)];
            h2_call(addr, LIST_ACCOUNTS, &headers, &[message], &[]).await
        });
    }
    while let Some(code) = calls.join_next().await {
        assert_eq!(code.expect("a call"), Code::Ok);
    }
}

/// The status in a response's headers: `Some` only for a trailers-only
/// answer (a refusal), `None` while its message is still to come.
fn header_status(parts: &http::response::Parts) -> Option<Code> {
    parts
        .headers
        .get("grpc-status")
        .map(|status| Code::from_bytes(status.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_streams_held_open_never_starve_the_api() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.max_concurrent_requests = 4;
        config.connections.max_health_requests = 2;
    })
    .await;
    let (mut client, _driver) = h2_client(app.addr, 65_535).await;
    // Streams anyone can open without a credential, left open: two within
    // reflection's budget, and more beyond it, which are refused.
    let mut open = Vec::new();
    for i in 0..6 {
        let (parts, send) = h2_open(&mut client, REFLECTION, None, None).await;
        let refused = header_status(&parts);
        if i < 2 {
            assert_eq!(refused, None, "reflection stream {i} was refused");
        } else {
            assert_eq!(refused, Some(Code::ResourceExhausted), "stream {i}");
        }
        open.push(send);
    }
    // More than the API's whole budget of streams is open; the API still
    // serves, every one of its places.
    every_place_serves(&app, 4).await;
    drop(open);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_takes_no_response_in_holds_no_call_place_and_loses_its_connection() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.max_concurrent_requests = 4;
        // The period in which a response must be taken in.
        config.request_timeout = Duration::from_secs(1);
    })
    .await;
    // Grants no window: each response's headers arrive, its message never.
    let (mut client, driver) = h2_client(app.addr, 0).await;
    let message = prost::Message::encode_to_vec(&pb::ListAccountsRequest::default());
    let mut stuck = Vec::new();
    for i in 0..12 {
        let (parts, send) = h2_open(
            &mut client,
            LIST_ACCOUNTS,
            Some(app.operator_token.as_str()),
            Some(message.as_slice()),
        )
        .await;
        // Three times the whole budget: each call gave its place back once
        // its answer was produced, though the answer was never sent.
        assert_eq!(header_status(&parts), None, "call {i} was refused");
        assert_eq!(parts.status, http::StatusCode::OK);
        stuck.push(send);
    }
    // Everyone else is served meanwhile.
    let served = h2_call(
        app.addr,
        LIST_ACCOUNTS,
        &[("authorization", format!("Bearer {}", app.operator_token))],
        &[message],
        &[],
    )
    .await;
    assert_eq!(served, Code::Ok);
    // Its connection is closed within two periods of its answers waiting.
    tokio::time::timeout(PATIENCE, driver)
        .await
        .expect("the server closes the connection")
        .expect("the connection's task")
        .ok();
    let metrics = crate::observability::scrape(app.metrics_addr.expect("metrics")).await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("identity_connections_stalled_total{listener=\"grpc\"}")),
        "the stalled connection is not counted:\n{metrics}"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_with_nothing_to_send_keeps_its_connection_past_the_send_timeout() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.request_timeout = Duration::from_secs(1);
    })
    .await;
    let channel = plaintext(app.addr).connect().await.expect("connect");
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .expect("a Watch")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a status");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    // Three periods with nothing to send: the stream stays open (a closed
    // connection would end it with an error at once).
    let quiet = tokio::time::timeout(Duration::from_secs(3), watch.message()).await;
    assert!(quiet.is_err(), "the Watch stream ended: {quiet:?}");
    // (The metrics recorder is the process's, shared with the other tests:
    // the stream itself is the evidence.)
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_whose_message_never_comes_hold_no_place() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        with_health_port(config);
        config.max_concurrent_requests = 4;
        config.connections.max_health_requests = 2;
    })
    .await;
    let health_addr = app.health_addr.expect("a health port");
    // Headers and never a message: twice the API's budget and twice the
    // Check budget on the main port, twice the Check budget on the health
    // port. They wait on the client until their deadline.
    let (mut open, mut clients) = (Vec::new(), Vec::new());
    for (addr, paths) in [
        (app.addr, [LIST_ACCOUNTS; 8].as_slice()),
        (app.addr, [CHECK; 4].as_slice()),
        (health_addr, [CHECK; 4].as_slice()),
    ] {
        let (mut client, driver) = h2_client(addr, 65_535).await;
        for path in paths {
            client = client.ready().await.expect("ready");
            let request = h2_request(path, Some(app.operator_token.as_str()));
            open.push(client.send_request(request, false).expect("send"));
        }
        clients.push((client, driver));
    }
    // Every place is still free: the API's, all at once, and the probes'.
    every_place_serves(&app, 4).await;
    for addr in [app.addr, health_addr] {
        let channel = plaintext(addr).connect().await.expect("connect");
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest::default())
            .await
            .expect("a health check")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{addr}");
    }
    drop((open, clients));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_part_sent_hold_no_more_than_the_read_ahead_budget() {
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        // A read-ahead budget of 256 messages of 1 KiB.
        config.max_message_bytes = 1024;
        // Far later than the refusals this waits for.
        config.request_timeout = Duration::from_secs(60);
    })
    .await;
    // 300 requests, each announcing a 1,000-byte message, sending 990 of
    // its bytes and waiting: more than the budget can hold.
    let mut part = Vec::from([0_u8, 0, 0, 0x03, 0xe8]);
    part.extend([b'x'; 990]);
    let part = Bytes::from(part);
    let (mut waiting, mut clients) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let (mut client, driver) = h2_client(app.addr, 65_535).await;
        for _ in 0..100 {
            client = client.ready().await.expect("ready");
            let request = h2_request(LIST_ACCOUNTS, Some(app.operator_token.as_str()));
            let (response, mut send) = client.send_request(request, false).expect("send");
            send.send_data(part.clone(), false)
                .expect("send part of a message");
            waiting.push((response, send));
        }
        clients.push((client, driver));
    }
    // The requests beyond the budget are refused, long before their
    // deadline.
    let mut refused = 0;
    for (response, _send) in &mut waiting {
        if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_millis(20), response).await {
            assert_eq!(
                header_status(&response.into_parts().0),
                Some(Code::ResourceExhausted)
            );
            refused += 1;
        }
    }
    assert!(
        (30..300).contains(&refused),
        "{refused} of 300 part-sent requests refused"
    );
    // A whole request is served meanwhile.
    let message = prost::Message::encode_to_vec(&pb::ListAccountsRequest::default());
    let headers = [("authorization", format!("Bearer {}", app.operator_token))];
    let served = h2_call(app.addr, LIST_ACCOUNTS, &headers, &[message], &[]).await;
    assert_eq!(served, Code::Ok);
    drop((waiting, clients));
    app.stop().await;
}
