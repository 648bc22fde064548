//! The Access Tokens web page over HTTP, against the real server: the
//! security headers on every response, cookies, CSRF and Origin checks
//! that refuse and change nothing, escaping, the sign-in throttle shared
//! with gRPC `SignIn`, sign-out, and tokens created, revoked and
//! regenerated on the page as `VerifyToken` sees them.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use identity::{config::Config, domain::throttle::ThrottleSettings};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

use crate::support::{Backend, PASSWORD, TestApp, assert_status, bearer, pb, sign_in};

/// Runs `$name(backend)` once per backend.
macro_rules! on_both {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name(crate::support::Backend::Sqlite).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name(crate::support::Backend::Postgres).await;
            }
        }
    };
}

/// A server with the web page on a port of the kernel's choosing.
async fn spawn(backend: Backend, adjust: impl FnOnce(&mut Config)) -> TestApp {
    TestApp::spawn_with(backend, |config| {
        config.web_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
        adjust(config);
    })
    .await
}

/// One HTTP/1.1 answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every `Set-Cookie` of the answer.
    pub fn set_cookies(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("set-cookie"))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The value of the `name="field"` input's `value` in the body.
    pub fn input(&self, field: &str) -> Option<String> {
        let at = self
            .body
            .find(&format!(r#"name="{field}" value=""#))
            .or_else(|| {
                self.body
                    .find(&format!(r#"id="{field}" class="secret" value=""#))
            })?;
        let rest = &self.body[at..];
        let start = rest.find("value=\"")? + 7;
        let end = rest[start..].find('"')?;
        Some(rest[start..start + end].to_owned())
    }
}

/// Percent-encodes a form value.
pub(crate) fn encode(raw: &str) -> String {
    raw.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Sends one request on a new connection and reads the whole answer.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> Reply {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the web page");
    let mut text = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        text.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    text.push_str(body);
    stream.write_all(text.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read the answer");
    let raw = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a head and a body");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A browser of the page: keeps its cookies and sends this page's Origin.
pub struct Browser {
    pub addr: SocketAddr,
    pub cookies: BTreeMap<String, String>,
    pub origin: String,
    /// The `Host` it sends: the address unless set (a proxy's name).
    pub host: Option<String>,
}

impl Browser {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            cookies: BTreeMap::new(),
            origin: format!("http://{addr}"),
            host: None,
        }
    }

    fn cookie_header(&self) -> Vec<(&'static str, String)> {
        let host = self.host.iter().map(|h| ("Host", h.clone()));
        if self.cookies.is_empty() {
            return host.collect();
        }
        let joined = self
            .cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        host.chain([("Cookie", joined)]).collect()
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

    pub async fn get(&mut self, path: &str) -> Reply {
        let reply = request(self.addr, "GET", path, &self.cookie_header(), "").await;
        self.keep(&reply);
        reply
    }

    /// POSTs `fields` as a form, with this page's Origin.
    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Reply {
        let body = fields
            .iter()
            .map(|(n, v)| format!("{}={}", encode(n), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut headers = self.cookie_header();
        headers.push((
            "Content-Type",
            "application/x-www-form-urlencoded".to_owned(),
        ));
        headers.push(("Origin", self.origin.clone()));
        let reply = request(self.addr, "POST", path, &headers, &body).await;
        self.keep(&reply);
        reply
    }

    /// Signs in on the page: the answer to the form's POST.
    pub async fn sign_in(&mut self, username: &str, password: &str) -> Reply {
        let form = self.get("/sign-in").await;
        let csrf = form.input("csrf").expect("the sign-in form's token");
        self.post(
            "/sign-in",
            &[
                ("csrf", &csrf),
                ("username", username),
                ("password", password),
            ],
        )
        .await
    }

    /// The CSRF token of the signed-in session, read from a page.
    pub async fn csrf(&mut self) -> String {
        self.get("/tokens/new")
            .await
            .input("csrf")
            .expect("a signed-in page carries the CSRF token")
    }

    /// The session cookie's value.
    pub fn session(&self) -> String {
        self.cookies
            .get("identity-session")
            .cloned()
            .expect("signed in")
    }
}

/// Creates a person with [`PASSWORD`] (not signed in): its id.
async fn create_person(app: &TestApp, username: &str) -> String {
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
        .expect("create a person")
        .into_inner()
        .account
        .expect("account")
        .account_id
}

/// The tokens of `account_id`, as the operator lists them over gRPC.
async fn tokens_of(app: &TestApp, account_id: &str) -> Vec<pb::Token> {
    app.tokens()
        .list_tokens(bearer(
            pb::ListTokensRequest {
                account_id: account_id.into(),
                page_size: 1000,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("list tokens")
        .into_inner()
        .tokens
}

#[track_caller]
pub(crate) fn assert_secure_headers(what: &str, reply: &Reply) {
    for (name, value) in [
        (
            "content-security-policy",
            "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
        ("referrer-policy", "no-referrer"),
        ("x-content-type-options", "nosniff"),
        ("cache-control", "no-store"),
    ] {
        assert_eq!(reply.header(name), Some(value), "{what}: {name}");
    }
    assert!(
        !reply.body.contains("<script>") && !reply.body.contains(" style="),
        "{what}: no inline script or style"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_carries_the_security_headers() {
    let app = spawn(Backend::Sqlite, |_| {}).await;
    let addr = app.web_addr.expect("web page on");
    create_person(&app, "alice").await;
    let mut browser = Browser::new(addr);
    let mut seen = vec![
        ("sign-in form", browser.get("/sign-in").await),
        ("stylesheet", browser.get("/static/app.css").await),
        ("script", browser.get("/static/copy.js").await),
        ("unknown page", browser.get("/nope").await),
        ("signed out", browser.get("/tokens").await),
        (
            "a form without a token",
            browser.post("/sign-in", &[("username", "alice")]).await,
        ),
        ("wrong password", browser.sign_in("alice", "not it").await),
        ("sign-in", browser.sign_in("alice", PASSWORD).await),
        ("token list", browser.get("/tokens").await),
        ("account", browser.get("/account").await),
    ];
    let csrf = browser.csrf().await;
    seen.push((
        "the secret page",
        browser
            .post(
                "/tokens",
                &[("csrf", &csrf), ("name", "ci"), ("expires", "7")],
            )
            .await,
    ));
    seen.push((
        "a bad form",
        browser
            .post("/tokens", &[("csrf", &csrf), ("name", "")])
            .await,
    ));
    let statuses: Vec<u16> = seen.iter().map(|(_, r)| r.status).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 404, 303, 403, 401, 303, 200, 200, 200, 422]
    );
    for (what, reply) in &seen {
        assert_secure_headers(what, reply);
    }
    assert!(
        seen[10]
            .1
            .input("secret")
            .is_some_and(|s| s.starts_with("idp_") || !s.is_empty())
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_cookie_is_http_only_strict_and_expires_with_the_session() {
    let ttl = Duration::from_secs(3600);
    let app = spawn(Backend::Sqlite, |config| config.identity.session_ttl = ttl).await;
    create_person(&app, "alice").await;
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    let reply = browser.sign_in("alice", PASSWORD).await;
    assert_eq!(reply.status, 303);
    assert_eq!(reply.header("location"), Some("/tokens"));
    let session = reply
        .set_cookies()
        .into_iter()
        .find(|c| c.starts_with("identity-session="))
        .expect("a session cookie")
        .to_owned();
    for part in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.split("; ").any(|p| p == part), "{part}: {session}");
    }
    assert!(
        !session.contains("Secure"),
        "plaintext: no Secure: {session}"
    );
    let max_age: u64 = session
        .split("; ")
        .find_map(|p| p.strip_prefix("Max-Age="))
        .and_then(|v| v.parse().ok())
        .expect("Max-Age");
    assert!(
        (ttl.as_secs() - 60..=ttl.as_secs()).contains(&max_age),
        "expires with the session: {max_age}"
    );
    // The redirect carries no secret.
    assert!(
        !reply
            .header("location")
            .unwrap_or_default()
            .contains("ids_")
    );
    app.stop().await;
}

async fn state_changing_requests_need_the_csrf_token_and_this_origin(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let addr = app.web_addr.expect("web page on");
    let alice = create_person(&app, "alice").await;
    let mut browser = Browser::new(addr);
    // Sign-in without the double-submit cookie, or with another value.
    let form = browser.get("/sign-in").await;
    let csrf = form.input("csrf").expect("token");
    let credentials = [("username", "alice"), ("password", PASSWORD)];
    let mut stranger = Browser::new(addr);
    let refused = stranger
        .post(
            "/sign-in",
            &[&[("csrf", csrf.as_str())][..], &credentials].concat(),
        )
        .await;
    assert_eq!(refused.status, 403, "no cookie");
    let refused = browser
        .post(
            "/sign-in",
            &[&[("csrf", "0".repeat(64).as_str())][..], &credentials].concat(),
        )
        .await;
    assert_eq!(refused.status, 403, "another value");
    // A pair the client picked itself, equal in form and cookie but not of
    // the form the page issues: empty, short, or upper-case hex.
    for picked in ["", "abc", &"AB".repeat(32)] {
        let refused = request(
            addr,
            "POST",
            "/sign-in",
            &[
                ("Origin", format!("http://{addr}")),
                (
                    "Content-Type",
                    "application/x-www-form-urlencoded".to_owned(),
                ),
                ("Cookie", format!("identity-sign-in={picked}")),
            ],
            &format!("csrf={picked}&username=alice&password={}", encode(PASSWORD)),
        )
        .await;
        assert_eq!(refused.status, 403, "a client-picked token {picked:?}");
    }
    assert!(!browser.cookies.contains_key("identity-session"));
    let (_, session) = ((), browser.sign_in("alice", PASSWORD).await);
    assert_eq!(session.status, 303);
    let csrf = browser.csrf().await;
    let create = |csrf: &str| {
        vec![
            ("csrf", csrf.to_owned()),
            ("name", "from elsewhere".to_owned()),
            ("expires", "30".to_owned()),
        ]
    };
    let as_fields =
        |fields: &[(&'static str, String)]| -> Vec<(&'static str, String)> { fields.to_vec() };
    for (what, fields, origin) in [
        ("no token", as_fields(&create("")[1..]), None),
        ("a wrong token", create(&"a".repeat(64)), None),
        (
            "a foreign origin",
            create(&csrf),
            Some("http://evil.example"),
        ),
        ("an opaque origin", create(&csrf), Some("null")),
    ] {
        let saved = browser.origin.clone();
        if let Some(origin) = origin {
            browser.origin = origin.to_owned();
        }
        let fields: Vec<(&str, &str)> = fields.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let reply = browser.post("/tokens", &fields).await;
        browser.origin = saved;
        assert_eq!(reply.status, 403, "{what}");
        assert!(reply.input("secret").is_none(), "{what}");
    }
    assert!(tokens_of(&app, &alice).await.is_empty(), "nothing created");
    // A cross-site form post a browser makes without an Origin, marked by
    // Sec-Fetch-Site.
    let mut headers = browser.cookie_header();
    headers.push((
        "Content-Type",
        "application/x-www-form-urlencoded".to_owned(),
    ));
    headers.push(("Sec-Fetch-Site", "cross-site".to_owned()));
    let body = format!("csrf={csrf}&name=x&expires=30");
    assert_eq!(
        request(addr, "POST", "/tokens", &headers, &body)
            .await
            .status,
        403
    );
    // Or with `Origin: null`, as Chromium sends under no-referrer.
    headers.push(("Origin", "null".to_owned()));
    let reply = request(addr, "POST", "/tokens", &headers, &body).await;
    assert_eq!(reply.status, 403, "null origin, cross-site");
    assert!(tokens_of(&app, &alice).await.is_empty(), "nothing created");
    // Revocation, sign-out and the account's forms are refused alike.
    let (_, secret) = app.token(&browser.session(), &alice, "kept", &[]).await;
    let id = tokens_of(&app, &alice).await[0].token_id.clone();
    for (path, fields) in [
        ("/tokens/revoke", vec![("id", id.as_str())]),
        ("/tokens/rotate", vec![("id", id.as_str())]),
        ("/sign-out", vec![]),
        ("/account/sign-out-everywhere", vec![]),
        (
            "/account/password",
            vec![
                ("current_password", PASSWORD),
                ("new_password", "a completely new passphrase 9"),
                ("new_password_again", "a completely new passphrase 9"),
            ],
        ),
    ] {
        let mut wrong = fields.clone();
        wrong.push(("csrf", "b"));
        assert_eq!(browser.post(path, &wrong).await.status, 403, "{path}");
    }
    assert!(
        app.verify(&secret, &[]).await.active,
        "the token still works"
    );
    assert_eq!(tokens_of(&app, &alice).await.len(), 1, "not rotated");
    assert!(
        sign_in(&app, "alice", PASSWORD).await.is_ok(),
        "password unchanged"
    );
    assert_eq!(browser.get("/tokens").await.status, 200, "still signed in");
    app.stop().await;
}
on_both!(state_changing_requests_need_the_csrf_token_and_this_origin);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_named_like_markup_is_shown_as_text() {
    let app = spawn(Backend::Sqlite, |_| {}).await;
    let alice = create_person(&app, "alice").await;
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    browser.sign_in("alice", PASSWORD).await;
    let name = "<script>alert(1)</script>";
    app.token(&browser.session(), &alice, name, &[]).await;
    for path in ["/tokens", "/tokens?state=active"] {
        let page = browser.get(path).await;
        assert_eq!(page.status, 200);
        assert!(
            page.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{path}"
        );
        assert!(!page.body.contains(name), "{path}");
        assert!(!page.body.contains("<b>"), "{path}");
    }
    // A name typed into the form comes back escaped with its error.
    let csrf = browser.csrf().await;
    let page = browser
        .post(
            "/tokens",
            &[
                ("csrf", &csrf),
                ("name", name),
                ("expires", "date"),
                ("expire_date", "\"><script>"),
            ],
        )
        .await;
    assert_eq!(page.status, 422);
    assert!(!page.body.contains("<script>"));
    assert!(page.body.contains("Enter a date"), "{}", page.body);
    app.stop().await;
}

async fn a_wrong_password_on_the_page_is_throttled_like_sign_in(backend: Backend) {
    let app = spawn(backend, |config| {
        config.identity.sign_in_throttle = ThrottleSettings {
            account_free_failures: 3,
            address_free_failures: 1_000_000,
            // Long enough that no test machine outlasts it.
            base_delay: Duration::from_secs(600),
            max_delay: Duration::from_secs(1200),
            ..ThrottleSettings::default()
        };
    })
    .await;
    let alice = create_person(&app, "alice").await;
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    // Three free failures and a fourth that arms the delay, as for SignIn
    // (throttle.rs): the page and gRPC count the same failures.
    for attempt in 0..4 {
        let page = browser.sign_in("alice", "not the password at all").await;
        assert_eq!(page.status, 401, "attempt {attempt}");
        assert!(page.body.contains("Unknown username or wrong password."));
    }
    let hashes = app.identity.password_verifications();
    let page = browser.sign_in("alice", PASSWORD).await;
    assert_eq!(page.status, 429, "throttled even with the right password");
    assert!(page.header("retry-after").is_some());
    assert!(
        page.body.contains("Too many failed sign-ins"),
        "{}",
        page.body
    );
    assert_eq!(
        app.identity.password_verifications(),
        hashes,
        "no password checked"
    );
    assert_status(
        sign_in(&app, "alice", PASSWORD).await,
        Code::ResourceExhausted,
        "ERROR_REASON_SIGN_IN_THROTTLED",
    );
    // Every checked attempt was audited, from the page's client address.
    let events = app.audit(&alice, &[pb::AuditEventType::SignIn]).await;
    assert_eq!(events.len(), 4);
    for event in &events {
        assert_eq!(event.outcome, pb::AuditOutcome::Failure as i32);
        assert!(event.source_address.starts_with("127.0.0.1:"), "{event:?}");
    }
    app.stop().await;
}
on_both!(a_wrong_password_on_the_page_is_throttled_like_sign_in);

async fn signing_out_on_the_page_ends_the_session(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    create_person(&app, "alice").await;
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    browser.sign_in("alice", PASSWORD).await;
    let session = browser.session();
    let old = browser.cookies.clone();
    let csrf = browser.csrf().await;
    let reply = browser.post("/sign-out", &[("csrf", &csrf)]).await;
    assert_eq!(reply.status, 303);
    assert_eq!(reply.header("location"), Some("/sign-in"));
    assert!(
        !browser.cookies.contains_key("identity-session"),
        "cookie removed"
    );
    // The old cookie no longer works, on the page or over gRPC.
    browser.cookies = old;
    let page = browser.get("/tokens").await;
    assert_eq!(page.status, 303);
    assert_eq!(page.header("location"), Some("/sign-in"));
    let status = app
        .accounts()
        .sign_out(bearer(pb::SignOutRequest {}, &session))
        .await
        .expect_err("the session has ended");
    assert_eq!(status.code(), Code::Unauthenticated);
    app.stop().await;
}
on_both!(signing_out_on_the_page_ends_the_session);

async fn tokens_made_revoked_and_regenerated_on_the_page_are_what_verify_token_says(
    backend: Backend,
) {
    let app = spawn(backend, |_| {}).await;
    let alice = create_person(&app, "alice").await;
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    browser.sign_in("alice", PASSWORD).await;
    let csrf = browser.csrf().await;
    // Create: a scoped one-time token.
    let page = browser
        .post(
            "/tokens",
            &[
                ("csrf", &csrf),
                ("name", "deploy"),
                ("scope", "tokens:read"),
                ("other_scopes", "projects:read, projects:write"),
                ("expires", "7"),
                ("max_uses", "1"),
            ],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let secret = page.input("secret").expect("the secret, shown once");
    assert!(
        page.body
            .contains(&format!("export IDENTITY_TOKEN={secret}"))
    );
    assert!(
        page.body
            .contains(&format!("authorization: Bearer {secret}"))
    );
    assert!(page.body.contains("will not be shown again"));
    let list = browser.get("/tokens").await;
    assert!(
        !list.body.contains(&secret),
        "the list never shows a secret"
    );
    assert!(list.body.contains("expires in 6 days"), "the 7-day warning");
    assert!(list.body.contains("1 of 1"));
    let verified = app.verify(&secret, &["projects:read"]).await;
    assert!(verified.active, "{verified:?}");
    let list = browser.get("/tokens?state=exhausted").await;
    assert!(list.body.contains("deploy"), "spent by its one use");
    assert!(
        browser
            .get("/tokens?state=active")
            .await
            .body
            .contains("No tokens to show.")
    );
    // Revoke, after the confirmation page.
    let (token, other) = app.token(&browser.session(), &alice, "other", &[]).await;
    let confirm = browser
        .get(&format!("/tokens/revoke?id={}", token.token_id))
        .await;
    assert_eq!(confirm.status, 200);
    assert!(confirm.body.contains("Revoke other"));
    let reply = browser
        .post(
            "/tokens/revoke",
            &[("csrf", &csrf), ("id", &token.token_id)],
        )
        .await;
    assert_eq!(reply.status, 303);
    let verified = app.verify(&other, &[]).await;
    assert!(!verified.active);
    assert_eq!(
        verified.reason,
        pb::InactiveReason::Revoked as i32,
        "{verified:?}"
    );
    // Regenerate: the new secret is shown once and works.
    let (token, _) = app.token(&browser.session(), &alice, "ci", &[]).await;
    let page = browser
        .post(
            "/tokens/rotate",
            &[("csrf", &csrf), ("id", &token.token_id)],
        )
        .await;
    assert_eq!(page.status, 200, "{}", page.body);
    let successor = page.input("secret").expect("the new secret");
    assert!(app.verify(&successor, &[]).await.active);
    // Another account's token is not found from the page.
    let bob = create_person(&app, "bob").await;
    let (bobs, bobs_secret) = app.token(&app.operator_token, &bob, "bobs", &[]).await;
    let reply = browser
        .post("/tokens/revoke", &[("csrf", &csrf), ("id", &bobs.token_id)])
        .await;
    assert_eq!(reply.status, 404);
    assert!(app.verify(&bobs_secret, &[]).await.active);
    app.stop().await;
}
on_both!(tokens_made_revoked_and_regenerated_on_the_page_are_what_verify_token_says);

async fn the_account_page_changes_the_password_and_signs_out_everywhere(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let alice = create_person(&app, "alice").await;
    let other = sign_in(&app, "alice", PASSWORD)
        .await
        .expect("another session");
    let mut browser = Browser::new(app.web_addr.expect("web page on"));
    browser.sign_in("alice", PASSWORD).await;
    let csrf = browser.csrf().await;
    let new = "a completely new passphrase 9";
    let wrong = browser
        .post(
            "/account/password",
            &[
                ("csrf", &csrf),
                ("current_password", "not it"),
                ("new_password", new),
                ("new_password_again", new),
            ],
        )
        .await;
    assert_eq!(wrong.status, 422);
    assert!(wrong.body.contains("The current password is wrong."));
    let changed = browser
        .post(
            "/account/password",
            &[
                ("csrf", &csrf),
                ("current_password", PASSWORD),
                ("new_password", new),
                ("new_password_again", new),
            ],
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert!(
        changed.body.contains("1 other session ended"),
        "{}",
        changed.body
    );
    assert!(app.verify(&other, &[]).await.active.eq(&false));
    // The security log, newest first.
    let log = browser.get("/account").await.body;
    let changed_at = log
        .find("account.password_changed")
        .expect("the change is logged");
    let signed_in_at = log.find("session.sign_in").expect("sign-ins");
    assert!(changed_at < signed_in_at, "newest first");
    let reply = browser
        .post("/account/sign-out-everywhere", &[("csrf", &csrf)])
        .await;
    assert_eq!(reply.status, 303);
    assert_eq!(browser.get("/tokens").await.status, 303, "signed out");
    let _ = alice;
    app.stop().await;
}
on_both!(the_account_page_changes_the_password_and_signs_out_everywhere);

/// A request whose body does not arrive within the request timeout is
/// answered 408 and its connection closed: a client trickling a body holds
/// a place of the listener's connection cap no longer than a request may
/// take (without the deadline it held it for ever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_too_slowly_is_answered_408_and_the_connection_closed() {
    let app = spawn(Backend::Sqlite, |config| {
        config.request_timeout = Duration::from_secs(1);
    })
    .await;
    let addr = app.web_addr.expect("web page on");
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the web page");
    stream
        .write_all(
            format!(
                "POST /sign-in HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\n\
                 Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 16000\r\n\r\nc"
            )
            .as_bytes(),
        )
        .await
        .expect("send the head and one byte");
    let mut raw = Vec::new();
    // Bounded so that a regression fails rather than hangs.
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the connection is still open");
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("content-security-policy"), "{text}");
    app.stop().await;
}

/// A page addressed by a name that is not an address (what DNS rebinding
/// sends: the attacker's name, pointed at this server) is refused before
/// anything is read or changed, forms included; its addresses and
/// `localhost` are served.
async fn a_page_addressed_by_a_name_it_is_not_served_under_is_refused(backend: Backend) {
    let app = spawn(backend, |_| {}).await;
    let addr = app.web_addr.expect("web page on");
    let alice = create_person(&app, "alice").await;
    let port = addr.port();
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let mut browser = Browser::new(addr);
        browser.host = Some(host.clone());
        browser.origin = format!("http://{host}");
        assert_eq!(browser.get("/sign-in").await.status, 200, "{host}");
        assert_eq!(
            browser.sign_in("alice", PASSWORD).await.status,
            303,
            "{host}"
        );
    }
    let sessions_before = app.audit(&alice, &[pb::AuditEventType::SignIn]).await.len();
    // The sign-in form's token and cookie, as a rebinding page would first
    // fetch them under its own name.
    let mut honest = Browser::new(addr);
    let csrf = honest
        .get("/sign-in")
        .await
        .input("csrf")
        .expect("the form's token");
    for host in [
        format!("rebind.example:{port}"),
        format!("127.0.0.1.rebind.example:{port}"),
        format!("localhost.rebind.example:{port}"),
    ] {
        let mut attacker = Browser::new(addr);
        attacker.cookies = honest.cookies.clone();
        attacker.host = Some(host.clone());
        attacker.origin = format!("http://{host}");
        let reply = attacker.get("/sign-in").await;
        assert_eq!(reply.status, 421, "{host}: {reply:?}");
        assert!(
            reply.input("csrf").is_none(),
            "{host}: the form is not shown"
        );
        assert_secure_headers(&host, &reply);
        let reply = attacker
            .post(
                "/sign-in",
                &[
                    ("csrf", &csrf),
                    ("username", "alice"),
                    ("password", PASSWORD),
                ],
            )
            .await;
        assert_eq!(reply.status, 421, "{host}: {reply:?}");
        assert!(reply.set_cookies().is_empty(), "{host}: no session");
    }
    assert_eq!(
        app.audit(&alice, &[pb::AuditEventType::SignIn]).await.len(),
        sessions_before,
        "no sign-in attempt under another name"
    );
    app.stop().await;
}
on_both!(a_page_addressed_by_a_name_it_is_not_served_under_is_refused);

/// Behind a TLS-terminating proxy (`web_origin` https://…, the page in
/// plaintext behind it): the page answers to the proxy's name alone, names
/// and marks its cookies for TLS, sends HSTS, and accepts forms from that
/// origin alone; signing in and creating a token work through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_tls_terminating_proxy_the_page_serves_as_its_public_origin() {
    let app = spawn(Backend::Sqlite, |config| {
        config.web_origin =
            Some(identity::web::PublicOrigin::parse("https://ID.example.test/").expect("origin"));
    })
    .await;
    let addr = app.web_addr.expect("web page on");
    let alice = create_person(&app, "alice").await;
    let behind_proxy = |origin: &str| {
        let mut browser = Browser::new(addr);
        browser.host = Some("id.example.test".into());
        browser.origin = origin.into();
        browser
    };

    let mut direct = Browser::new(addr);
    assert_eq!(direct.get("/sign-in").await.status, 421, "its own address");

    // Another scheme or port is another origin: the form is refused.
    for wrong in ["http://id.example.test", "https://id.example.test:8443"] {
        let mut browser = behind_proxy(wrong);
        let reply = browser.sign_in("alice", PASSWORD).await;
        assert_eq!(reply.status, 403, "{wrong}");
    }

    let mut browser = behind_proxy("https://id.example.test");
    let form = browser.get("/sign-in").await;
    assert_eq!(form.status, 200);
    assert_eq!(
        form.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let cookie = form.set_cookies().join("\n");
    assert!(
        cookie.starts_with("__Host-identity-sign-in=") && cookie.contains("; Secure"),
        "{cookie}"
    );
    let signed_in = browser.sign_in("alice", PASSWORD).await;
    assert_eq!(signed_in.status, 303, "{signed_in:?}");
    let session = signed_in.set_cookies().join("\n");
    assert!(
        session.contains("__Host-identity-session=") && session.contains("; Secure"),
        "{session}"
    );
    let csrf = browser.csrf().await;
    let created = browser
        .post(
            "/tokens",
            &[("csrf", &csrf), ("name", "ci"), ("expires", "7")],
        )
        .await;
    assert_eq!(created.status, 200, "{created:?}");
    let secret = created.input("secret").expect("the new secret");
    assert!(app.verify(&secret, &[]).await.active);
    assert_eq!(tokens_of(&app, &alice).await.len(), 1);
    app.stop().await;
}
