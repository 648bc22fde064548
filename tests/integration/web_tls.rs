//! The Access Tokens page over TLS, against the real server: the web
//! listener serves the gRPC certificate, negotiates HTTP/2 by ALPN, adds
//! HSTS to the security headers, names its cookies with the `__Host-`
//! prefix and marks them `Secure`, checks the `https` Origin, and gives a
//! plaintext client no page. The certificates are tls.rs's, the answers
//! web.rs's [`Reply`].

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use prost::bytes::Bytes;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    support::{Backend, PASSWORD, TestApp, bearer, pb},
    tls::{Ca, Files, SERVER_NAMES, spawn_tls},
    web::{Reply, assert_secure_headers, encode},
};

/// A server with TLS from `files` and the web page on a port of the
/// kernel's choosing.
async fn spawn(files: &Files, ca: &Ca) -> TestApp {
    spawn_tls(Backend::Sqlite, files, ca, None, |config| {
        config.web_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await
}

/// A browser of the page over TLS and HTTP/2: trusts `ca`, offers `h2`
/// only, keeps its cookies and sends an Origin (this page's by default).
struct TlsBrowser {
    addr: SocketAddr,
    connector: tokio_rustls::TlsConnector,
    cookies: BTreeMap<String, String>,
    origin: String,
}

impl TlsBrowser {
    fn new(addr: SocketAddr, ca: &Ca) -> Self {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.issuer.der().clone())
            .expect("a CA certificate");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Self {
            addr,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            cookies: BTreeMap::new(),
            origin: format!("https://{addr}"),
        }
    }

    /// A new TLS connection, which must have negotiated `h2`.
    async fn connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to the web page");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("a name");
        let tls = self
            .connector
            .connect(name, tcp)
            .await
            .expect("a TLS handshake with the web page");
        assert_eq!(
            tls.get_ref().1.alpn_protocol(),
            Some(&b"h2"[..]),
            "the web listener negotiates HTTP/2"
        );
        tls
    }

    /// Sends one request on a new TLS connection, which must have
    /// negotiated `h2`, and reads the whole answer.
    async fn request(&self, method: &str, path: &str, form: Option<&str>) -> Reply {
        let tls = self.connect().await;
        let (client, connection) = h2::client::handshake(tls).await.expect("HTTP/2");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut client = client.ready().await.expect("ready");
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.addr));
        if !self.cookies.is_empty() {
            let joined = self
                .cookies
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            request = request.header("cookie", joined);
        }
        if form.is_some() {
            request = request
                .header("content-type", "application/x-www-form-urlencoded")
                .header("origin", &self.origin);
        }
        let request = request.body(()).expect("a request");
        let (response, mut send) = client.send_request(request, form.is_none()).expect("send");
        if let Some(form) = form {
            send.send_data(Bytes::from(form.to_owned()), true)
                .expect("send the form");
        }
        let (parts, mut body) = response.await.expect("a response").into_parts();
        let mut raw = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("the response body");
            let _ = body.flow_control().release_capacity(chunk.len());
            raw.extend_from_slice(&chunk);
        }
        Reply {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        v.to_str().expect("a text header").to_owned(),
                    )
                })
                .collect(),
            body: String::from_utf8(raw).expect("a UTF-8 answer"),
        }
    }

    fn keep(&mut self, reply: &Reply) {
        for set in reply.set_cookies() {
            let pair = set.split(';').next().unwrap_or_default();
            let (name, value) = pair.split_once('=').expect("name=value");
            if set.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let reply = self.request("GET", path, None).await;
        self.keep(&reply);
        reply
    }

    async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body = fields
            .iter()
            .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let reply = self.request("POST", path, Some(&body)).await;
        self.keep(&reply);
        reply
    }
}

/// Creates a person with [`PASSWORD`].
async fn create_person(app: &TestApp, username: &str) {
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create a person");
}

/// The `Set-Cookie` of `reply` for cookie `name`.
#[track_caller]
fn set_cookie<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .unwrap_or_else(|| panic!("a {name} cookie: {:?}", reply.set_cookies()))
}

/// A cookie a browser keeps only over HTTPS and only for this host:
/// `Secure`, `HttpOnly`, `SameSite=Strict`, `Path=/` and no `Domain`.
#[track_caller]
fn assert_host_only_secure(cookie: &str) {
    let parts: Vec<&str> = cookie.split("; ").collect();
    for part in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(parts.contains(&part), "{part}: {cookie}");
    }
    assert!(
        !parts
            .iter()
            .any(|p| p.to_ascii_lowercase().starts_with("domain")),
        "no Domain: {cookie}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_the_page_speaks_h2_with_hsts_and_secure_host_prefixed_cookies() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn(&files, &ca).await;
    create_person(&app, "alice").await;
    let mut browser = TlsBrowser::new(app.web_addr.expect("web page on"), &ca);

    let form = browser.get("/sign-in").await;
    assert_eq!(form.status, 200);
    assert_secure_headers("sign-in form over TLS", &form);
    assert_eq!(
        form.header("strict-transport-security"),
        Some("max-age=31536000"),
        "HSTS over TLS"
    );
    // The sign-in form's double-submit cookie is host-only and secure too.
    assert_host_only_secure(set_cookie(&form, "__Host-identity-sign-in"));
    assert!(
        !browser.cookies.contains_key("identity-sign-in"),
        "no unprefixed cookie over TLS"
    );
    let csrf = form.input("csrf").expect("the sign-in form's token");
    let credentials = [
        ("csrf", csrf.as_str()),
        ("username", "alice"),
        ("password", PASSWORD),
    ];

    // The plaintext origin of the same host is another origin.
    browser.origin = format!("http://{}", browser.addr);
    let refused = browser.post("/sign-in", &credentials).await;
    assert_eq!(refused.status, 403, "an http:// Origin over TLS");
    assert!(refused.set_cookies().is_empty(), "{refused:?}");
    browser.origin = format!("https://{}", browser.addr);

    let signed_in = browser.post("/sign-in", &credentials).await;
    assert_eq!(signed_in.status, 303, "{}", signed_in.body);
    assert_eq!(signed_in.header("location"), Some("/tokens"));
    assert_secure_headers("sign-in over TLS", &signed_in);
    assert!(signed_in.header("strict-transport-security").is_some());
    let session = set_cookie(&signed_in, "__Host-identity-session");
    assert_host_only_secure(session);
    assert!(
        session.split("; ").any(|p| p.starts_with("Max-Age=")),
        "{session}"
    );
    // The double-submit cookie is spent.
    assert!(
        !browser.cookies.contains_key("__Host-identity-sign-in"),
        "{:?}",
        signed_in.set_cookies()
    );

    let tokens = browser.get("/tokens").await;
    assert_eq!(tokens.status, 200, "the cookie opens the token list");
    assert_secure_headers("token list over TLS", &tokens);
    assert!(tokens.header("strict-transport-security").is_some());

    // The same secret under the unprefixed name opens nothing over TLS.
    let secret = browser.cookies["__Host-identity-session"].clone();
    browser.cookies.clear();
    browser
        .cookies
        .insert("identity-session".to_owned(), secret.clone());
    let unprefixed = browser.get("/tokens").await;
    assert_eq!(unprefixed.status, 303);
    assert_eq!(unprefixed.header("location"), Some("/sign-in"));

    // And a form posted with the session from the https origin works.
    browser.cookies.clear();
    browser
        .cookies
        .insert("__Host-identity-session".to_owned(), secret);
    let new = browser.get("/tokens/new").await;
    assert_eq!(new.status, 200);
    let csrf = new.input("csrf").expect("the session's CSRF token");
    let created = browser
        .post(
            "/tokens",
            &[("csrf", &csrf), ("name", "ci"), ("expires", "7")],
        )
        .await;
    assert_eq!(created.status, 200, "{}", created.body);
    let token = created.input("secret").expect("the secret, shown once");
    assert!(app.verify(&token, &[]).await.active);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_request_to_the_tls_web_port_gets_no_page() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn(&files, &ca).await;
    let addr = app.web_addr.expect("web page on");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the web port");
    stream
        .write_all(
            format!("GET /sign-in HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send");
    // The acceptor closes the connection (after at most a TLS alert).
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("HTTP/"), "no HTTP answer: {text:?}");
    assert!(!text.contains("<html"), "no page: {text:?}");
    // The listener still serves TLS clients.
    let mut browser = TlsBrowser::new(addr, &ca);
    assert_eq!(browser.get("/sign-in").await.status, 200);
    app.stop().await;
}

/// Over TLS, as on the gRPC port, a connection that completes its handshake
/// and then sends no HTTP/2 preface is closed after the preface timeout,
/// and one whose requests are done after the idle timeout: neither keeps a
/// place of the listener's connection cap (both used to stay open for
/// ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_idle_tls_connections_are_closed() {
    let ca = Ca::new("server CA");
    let files = Files::new(&ca.server(1, SERVER_NAMES), None);
    let app = spawn_tls(Backend::Sqlite, &files, &ca, None, |config| {
        config.web_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        config.connections.preface_timeout = Duration::from_secs(1);
        config.connections.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = app.web_addr.expect("web page on");
    let browser = TlsBrowser::new(addr, &ca);
    // Bounded so that a regression fails rather than hangs.
    let bound = Duration::from_secs(60);

    let mut silent = browser.connect().await;
    let mut raw = Vec::new();
    let closed = tokio::time::timeout(bound, silent.read_to_end(&mut raw)).await;
    assert!(closed.is_ok(), "a connection without a preface stays open");

    let tls = browser.connect().await;
    let (client, connection) = h2::client::handshake(tls).await.expect("HTTP/2");
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::builder()
        .uri(format!("https://{addr}/sign-in"))
        .body(())
        .expect("a request");
    let (response, _) = client.send_request(request, true).expect("send");
    let response = response.await.expect("a response");
    assert_eq!(response.status(), 200);
    drop(response);
    let ended = tokio::time::timeout(bound, connection).await;
    assert!(ended.is_ok(), "an idle connection stays open");
    app.stop().await;
}
