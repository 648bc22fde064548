//! The real `identity` binary, run as a child process: what it logs (never a
//! secret), how it stops (SIGTERM drains and exits 0), how it refuses a bad
//! configuration (naming the setting), and its one-shot commands
//! (`bootstrap-operator`, `migrate`).
//!
//! [`Server`] starts the binary on `127.0.0.1:0`, learns the bound address
//! from the `serving addr=...` log line on stderr (no sleeping for
//! readiness), keeps collecting stderr in the background, and kills the
//! child if the test ends without stopping it.

use std::{
    io::{BufRead as _, BufReader, Read},
    net::{SocketAddr, TcpListener},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::{Rng as _, rngs::OsRng};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    Backend, TestDatabase, bearer,
    pb::{
        self, accounts_service_client::AccountsServiceClient,
        audit_service_client::AuditServiceClient, tokens_service_client::TokensServiceClient,
    },
};

/// The binary under test.
const BINARY: &str = env!("CARGO_BIN_EXE_identity");
/// How long the server may take to log `serving`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot command (or a refused start) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to exit after SIGTERM with nothing in
/// flight.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A command that runs the binary against `database_url`, with piped
/// stdout and stderr, none of this process's `IDENTITY_*` settings, and
/// metrics and the web page on ports of the kernel's choosing.
pub(crate) fn identity_command(database_url: &str) -> Command {
    let mut command = Command::new(BINARY);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IDENTITY_") {
            command.env_remove(&name);
        }
    }
    command
        .env("DATABASE_URL", database_url)
        // Servers run side by side: none may take the default metrics port.
        .env("IDENTITY_METRICS_ADDR", "127.0.0.1:0")
        .env("IDENTITY_WEB_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

/// Everything a child writes to one pipe, collected by a background thread
/// until the pipe closes.
struct Capture {
    text: Arc<Mutex<String>>,
    thread: Option<JoinHandle<()>>,
}

impl Capture {
    /// Starts collecting `pipe`; each line is also sent to `lines`, if given.
    fn start(
        pipe: impl Read + Send + 'static,
        lines: Option<mpsc::UnboundedSender<String>>,
    ) -> Self {
        let text = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&text);
        let thread = std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match reader.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = String::from_utf8_lossy(&buf).into_owned();
                        sink.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push_str(&line);
                        if let Some(lines) = &lines {
                            // The reader may be gone; the text is kept anyway.
                            let _ = lines.send(line);
                        }
                    }
                }
            }
        });
        Self {
            text,
            thread: Some(thread),
        }
    }

    /// What has been collected so far.
    fn snapshot(&self) -> String {
        self.text
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits for the pipe to close (the child has exited) and returns all
    /// of it.
    fn finish(&mut self) -> String {
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the capture thread panicked");
        }
        self.snapshot()
    }
}

/// How a child process ended, and everything it wrote.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) status: ExitStatus,
    pub(crate) stdout: String,
    pub(crate) stderr: String,
}

/// A running child process of the binary, killed on drop unless it has
/// been waited for.
pub(crate) struct Process {
    child: Child,
    stdout: Capture,
    stderr: Capture,
    stderr_lines: mpsc::UnboundedReceiver<String>,
    status: Option<ExitStatus>,
}

impl Process {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {BINARY}: {e}"));
        let (tx, stderr_lines) = mpsc::unbounded_channel();
        let stdout = Capture::start(child.stdout.take().expect("piped stdout"), None);
        let stderr = Capture::start(child.stderr.take().expect("piped stderr"), Some(tx));
        Self {
            child,
            stdout,
            stderr,
            stderr_lines,
            status: None,
        }
    }

    /// The child's process id.
    pub(crate) fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (such as `TERM`) with `kill(1)`.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill -{signal} failed: {status}");
    }

    /// The exit status, if the child exits within `timeout`.
    pub(crate) async fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.status {
                return Some(status);
            }
            self.status = self.child.try_wait().expect("cannot wait for the child");
            if self.status.is_none() {
                if Instant::now() >= deadline {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }

    /// Waits for the child to exit (failing the test, with its stderr, if
    /// it does not within `timeout`) and returns its status and output.
    pub(crate) async fn finish(&mut self, timeout: Duration) -> Finished {
        let Some(status) = self.wait_timeout(timeout).await else {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
            panic!(
                "{BINARY} did not exit within {timeout:?}; stderr:\n{}",
                self.stderr.finish()
            );
        };
        Finished {
            status,
            stdout: self.stdout.finish(),
            stderr: self.stderr.finish(),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a one-shot command to completion.
pub(crate) async fn run(command: Command) -> Finished {
    Process::spawn(command).finish(COMMAND_TIMEOUT).await
}

/// Runs `identity migrate`, then `identity bootstrap-operator --username
/// <username>` (which refuses a database without its schema), each with
/// `env`; returns how the second finished.
pub(crate) async fn bootstrap_operator(
    database_url: &str,
    username: &str,
    env: &[(&str, &str)],
) -> Finished {
    let mut migrate = identity_command(database_url);
    migrate.arg("migrate").envs(env.iter().copied());
    let migrated = run(migrate).await;
    assert!(
        migrated.status.success(),
        "migrate before bootstrap-operator failed ({}); stderr:\n{}",
        migrated.status,
        migrated.stderr
    );
    let mut command = identity_command(database_url);
    command
        .args(["bootstrap-operator", "--username", username])
        .envs(env.iter().copied());
    run(command).await
}

/// The token printed by a successful `bootstrap-operator`, checking that
/// stdout holds exactly that one line.
#[track_caller]
pub(crate) fn printed_token(finished: &Finished) -> String {
    assert!(
        finished.status.success(),
        "bootstrap-operator failed ({}); stderr:\n{}",
        finished.status,
        finished.stderr
    );
    let token = finished
        .stdout
        .strip_suffix('\n')
        .unwrap_or_else(|| panic!("stdout is not one line: {:?}", finished.stdout));
    assert!(
        !token.contains('\n') && token.starts_with("idpat_"),
        "stdout is not exactly one token line: {:?}",
        finished.stdout
    );
    assert_eq!(token.len(), 44, "unexpected token length: {token:?}");
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "unexpected characters in {token:?}"
    );
    token.to_owned()
}

/// The server, serving on an address it chose.
pub(crate) struct Server {
    pub(crate) process: Process,
    /// Where it serves gRPC.
    pub(crate) addr: SocketAddr,
    /// Where it serves metrics, if they are on.
    pub(crate) metrics_addr: Option<SocketAddr>,
}

impl Server {
    /// Starts the binary's default command (serve) on `127.0.0.1:0` against
    /// `database_url`, with `env` added, and waits until it logs `serving`.
    pub(crate) async fn start(database_url: &str, env: &[(&str, &str)]) -> Self {
        let mut command = identity_command(database_url);
        command
            .args(["--listen-addr", "127.0.0.1:0"])
            .envs(env.iter().copied());
        Self::start_command(command).await
    }

    /// Starts `command` (made by [`identity_command`]) and waits until it
    /// logs `serving`.
    pub(crate) async fn start_command(command: Command) -> Self {
        let mut process = Process::spawn(command);
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, process.stderr_lines.recv()).await {
                Ok(Some(line)) => {
                    if let Some(addr) = serving_addr(&line) {
                        let metrics_addr =
                            serving_field(&line, "metrics_addr").and_then(|addr| addr.parse().ok());
                        return Self {
                            process,
                            addr,
                            metrics_addr,
                        };
                    }
                }
                Ok(None) => {
                    let finished = process.finish(COMMAND_TIMEOUT).await;
                    panic!(
                        "the server exited ({}) before serving; stderr:\n{}",
                        finished.status, finished.stderr
                    );
                }
                Err(_) => panic!(
                    "the server did not log `serving` within {READY_TIMEOUT:?}; stderr so far:\n{}",
                    process.stderr.snapshot()
                ),
            }
        }
    }

    /// A connected channel to the server.
    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid uri")
            .connect()
            .await
            .unwrap_or_else(|e| panic!("cannot connect to the server at {}: {e}", self.addr))
    }

    /// Sends SIGTERM and waits (at most [`SHUTDOWN_TIMEOUT`]) for the exit.
    pub(crate) async fn terminate(mut self) -> Finished {
        self.process.signal("TERM");
        self.process.finish(SHUTDOWN_TIMEOUT).await
    }
}

/// The address in a `serving addr=...` log line (text or JSON).
fn serving_addr(line: &str) -> Option<SocketAddr> {
    serving_field(line, "addr")?.parse().ok()
}

/// The value of `field` in the `serving` log line, written as text
/// (`serving addr=... metrics_addr=...`) or as JSON; `None` for other lines.
fn serving_field(line: &str, field: &str) -> Option<String> {
    if line.trim_start().starts_with('{') {
        let json: serde_json::Value = serde_json::from_str(line).ok()?;
        let fields = json.get("fields")?;
        if fields.get("message")?.as_str()? != "serving" {
            return None;
        }
        return Some(fields.get(field)?.as_str()?.to_owned());
    }
    let line = strip_ansi(line);
    let mut words = line.split_whitespace();
    words.find(|word| *word == "serving")?;
    let prefix = format!("{field}=");
    words.find_map(|word| Some(word.strip_prefix(&prefix)?.to_owned()))
}

/// `text` without ANSI escape sequences (CSI sequences such as colours, and
/// two-character escapes).
pub(crate) fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
        } else if chars.next() == Some('[') {
            // Parameters and intermediates, up to the final byte @ to ~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// 32 random hex digits, to make test values unique.
pub(crate) fn random_hex() -> String {
    format!("{:032x}", OsRng.r#gen::<u128>())
}

/// A database URL for a new SQLite file in a temporary directory.
pub(crate) fn sqlite_file() -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("identity.db");
    let url = format!("sqlite:{}", path.display());
    (dir, path, url)
}

/// `url` with a password: a PostgreSQL URL with a user but no password
/// gets a random one. Also returns the password, if there is one.
pub(crate) fn with_database_password(url: &str) -> (String, Option<String>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((_, password)) => (url.to_owned(), Some(password.to_owned())),
            None => {
                let password = format!("dbpw{}", random_hex());
                (
                    format!("{scheme}://{userinfo}:{password}@{host}{path}"),
                    Some(password),
                )
            }
        },
        None => (url.to_owned(), None),
    }
}

#[test]
fn the_serving_line_is_found_with_or_without_colours() {
    let plain = "2026-01-01T00:00:00.000000Z  INFO identity::app: serving \
                 addr=127.0.0.1:4242 database=sqlite:/tmp/x/identity.db";
    let coloured = "\u{1b}[2m2026-01-01T00:00:00.000000Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m \
                    \u{1b}[2midentity::app\u{1b}[0m\u{1b}[2m:\u{1b}[0m serving \
                    \u{1b}[3maddr\u{1b}[0m\u{1b}[2m=\u{1b}[0m127.0.0.1:4242 \
                    \u{1b}[3mdatabase\u{1b}[0m\u{1b}[2m=\u{1b}[0msqlite:x.db";
    let expected = Some(SocketAddr::from(([127, 0, 0, 1], 4242)));
    let json = r#"{"timestamp":"2026-01-01T00:00:00.000000Z","level":"INFO","fields":{"message":"serving","addr":"127.0.0.1:4242","metrics_addr":"127.0.0.1:9464","database":"sqlite:x.db"},"target":"identity::app"}"#;
    assert_eq!(serving_addr(plain), expected);
    assert_eq!(serving_addr(coloured), expected);
    assert_eq!(serving_addr(json), expected);
    assert_eq!(
        serving_field(json, "metrics_addr").as_deref(),
        Some("127.0.0.1:9464")
    );
    assert_eq!(
        serving_field(
            "INFO identity::app: serving addr=127.0.0.1:1 metrics_addr=off database=x",
            "metrics_addr"
        )
        .as_deref(),
        Some("off")
    );
    assert_eq!(
        serving_addr("INFO identity::app: database reachable again: reporting SERVING"),
        None
    );
    assert_eq!(
        base64(b"any carnal pleas", BASE64_STANDARD),
        "YW55IGNhcm5hbCBwbGVhcw"
    );
    assert_eq!(base64(&[0xfb, 0xff], BASE64_URL_SAFE), "-_8");
}

// ---------------------------------------------------------------------------
// Secrets and their derived forms
// ---------------------------------------------------------------------------

const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `bytes` in base64 over `alphabet`, without padding.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(alphabet[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Every value that must never appear in a log, with a label saying what
/// it is.
#[derive(Default)]
pub(crate) struct Secrets(Vec<(String, String)>);

impl Secrets {
    /// A secret used as is (a password).
    pub(crate) fn plain(&mut self, label: &str, value: &str) {
        self.0.push((label.to_owned(), value.to_owned()));
    }

    /// A token: its text, its random part (the 32 characters after the
    /// prefix), and its SHA-256 digest as hex (both cases), as base64
    /// (standard and URL-safe; the unpadded form is a prefix of the padded
    /// one) and as a byte-array `Debug`.
    pub(crate) fn token(&mut self, label: &str, token: &str) {
        self.plain(label, token);
        if let Some(random) = token.get(6..38) {
            self.plain(&format!("{label}: random part"), random);
        }
        let digest = Sha256::digest(token.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        self.plain(&format!("{label}: SHA-256 hex"), &hex.to_uppercase());
        self.plain(&format!("{label}: SHA-256 hex"), &hex);
        for (name, alphabet) in [("base64", BASE64_STANDARD), ("base64url", BASE64_URL_SAFE)] {
            self.plain(
                &format!("{label}: SHA-256 {name}"),
                &base64(&digest, alphabet),
            );
        }
        self.plain(
            &format!("{label}: SHA-256 bytes"),
            &format!("{:?}", digest.as_slice()),
        );
    }

    /// Fails, naming the secret and the line, if any of `logs` contains one.
    #[track_caller]
    pub(crate) fn assert_absent_from(&self, logs: &[(&str, &str)]) {
        let mut leaks = Vec::new();
        for (log_name, log) in logs {
            let log = strip_ansi(log);
            for (label, secret) in &self.0 {
                for line in log.lines().filter(|line| line.contains(secret.as_str())) {
                    leaks.push(format!("{label} ({secret}) in {log_name}: {line}"));
                }
            }
        }
        assert!(
            leaks.is_empty(),
            "secrets reached the logs:\n{}",
            leaks.join("\n")
        );
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Exercises every credential path of a trace-logging server (and a
/// trace-logging bootstrap), logging in `format` (text or json), then checks
/// that none of the secrets used appears in anything either process wrote
/// besides the bootstrap token on stdout, nor in the server's metrics.
async fn no_secret_reaches_the_logs_on(backend: Backend, format: &str) {
    let db = TestDatabase::new(backend).await;
    let trace = [("IDENTITY_LOG", "trace"), ("IDENTITY_LOG_FORMAT", format)];
    let mut secrets = Secrets::default();

    // A database password, too: the test cluster trusts local connections,
    // so one can be added to a PostgreSQL URL that has none.
    let (url, database_password) = with_database_password(&db.url);
    if let Some(password) = database_password.filter(|p| p.len() >= 8) {
        secrets.plain("database password", &password);
    }

    let bootstrap = bootstrap_operator(&url, "ops", &trace).await;
    let operator = printed_token(&bootstrap);
    secrets.token("operator token", &operator);

    let server = Server::start(&url, &trace).await;
    let channel = server.channel().await;
    let mut accounts = AccountsServiceClient::new(channel.clone());
    let mut tokens = TokensServiceClient::new(channel.clone());

    let password = format!("right-{}-password", random_hex());
    let wrong_password = format!("wrong-{}-password", random_hex());
    secrets.plain("password", &password);
    secrets.plain("wrong password", &wrong_password);

    let alice = accounts
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "alice".into(),
                password: password.clone(),
                email: "alice@example.com".into(),
                kind: pb::AccountKind::Person as i32,
                role: 0,
            },
            &operator,
        ))
        .await
        .expect("create alice")
        .into_inner()
        .account
        .expect("account");

    let session = accounts
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: password.clone(),
        })
        .await
        .expect("sign in")
        .into_inner()
        .session_token;
    secrets.token("session token", &session);

    let created = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: "ci".into(),
                scopes: vec![],
                expire_time: None,
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("create a token")
        .into_inner();
    let pat = created.secret;
    let pat_id = created.token.expect("token").token_id;
    secrets.token("personal access token", &pat);

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
    let verify = |token: &str| {
        let mut tokens = verifier.clone();
        let request = bearer(
            pb::VerifyTokenRequest {
                token: token.to_owned(),
                required_scopes: vec!["project:publish".into()],
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
    let verdict = verify(&pat).await;
    assert!(verdict.active, "{verdict:?}");
    assert!(verify(&session).await.active);

    // The token as the caller's credential, too.
    accounts
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::AccountId(
                    alice.account_id.clone(),
                )),
            },
            &pat,
        ))
        .await
        .expect("get an account with the personal access token");

    // Malformed: a fresh token with its checksum broken. Unknown: a
    // well-formed token that was never issued.
    let unknown = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::PersonalAccessToken,
    )
    .expose()
    .to_owned();
    let mut malformed = identity::domain::credential::Secret::generate(
        identity::domain::credential::CredentialKind::Session,
    )
    .expose()
    .to_owned();
    let last = malformed.pop().expect("non-empty");
    malformed.push(if last == 'a' { 'b' } else { 'a' });
    secrets.token("unknown token", &unknown);
    secrets.token("malformed token", &malformed);
    assert_eq!(
        verify(&malformed).await.reason,
        pb::InactiveReason::Malformed as i32
    );
    assert_eq!(
        verify(&unknown).await.reason,
        pb::InactiveReason::Unknown as i32
    );
    for bad in [&malformed, &unknown] {
        let refused = accounts
            .list_accounts(bearer(pb::ListAccountsRequest::default(), bad))
            .await;
        assert_eq!(
            refused.expect_err("a bad credential").code(),
            tonic::Code::Unauthenticated
        );
    }

    // Every refusal's status (message, details, metadata) is searched too.
    let mut refusals = String::new();
    let failed = accounts
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: wrong_password.clone(),
        })
        .await
        .expect_err("a wrong password");
    assert_eq!(failed.code(), tonic::Code::Unauthenticated);
    refusals.push_str(&format!("{failed:?}\n"));
    // A personal access token must not open a session.
    let refused = accounts
        .sign_in(bearer(
            pb::SignInRequest {
                username: "alice".into(),
                password: password.clone(),
            },
            &pat,
        ))
        .await
        .expect_err("sign-in with a personal access token");
    refusals.push_str(&format!("{refused:?}\n"));

    // Changing the password: the new one, and a wrong current one.
    let new_password = format!("changed-{}-password", random_hex());
    let wrong_current = format!("wrong-current-{}-password", random_hex());
    secrets.plain("new password", &new_password);
    secrets.plain("wrong current password", &wrong_current);
    let refused = accounts
        .change_password(bearer(
            pb::ChangePasswordRequest {
                current_password: wrong_current.clone(),
                new_password: format!("unused-{}-password", random_hex()),
            },
            &session,
        ))
        .await
        .expect_err("a wrong current password");
    refusals.push_str(&format!("{refused:?}\n"));
    accounts
        .change_password(bearer(
            pb::ChangePasswordRequest {
                current_password: password.clone(),
                new_password: new_password.clone(),
            },
            &session,
        ))
        .await
        .expect("change the password");
    let second_session = accounts
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: new_password.clone(),
        })
        .await
        .expect("sign in with the new password")
        .into_inner()
        .session_token;
    secrets.token("second session token", &second_session);

    // Rotation, and reuse of the rotated secret.
    let creator = tokens.clone();
    let create = |name: &str| {
        let mut tokens = creator.clone();
        let request = bearer(
            pb::CreateTokenRequest {
                account_id: alice.account_id.clone(),
                name: name.to_owned(),
                scopes: vec![],
                expire_time: None,
                ..Default::default()
            },
            &session,
        );
        async move {
            let created = tokens
                .create_token(request)
                .await
                .expect("create a token")
                .into_inner();
            (created.token.expect("token").token_id, created.secret)
        }
    };
    let (rotating_id, rotating) = create("rotating").await;
    secrets.token("token before rotation", &rotating);
    let rotated = tokens
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: rotating_id.clone(),
            },
            &session,
        ))
        .await
        .expect("rotate")
        .into_inner()
        .secret;
    secrets.token("token after rotation", &rotated);
    tokens
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: rotating_id,
            },
            &rotating,
        ))
        .await
        .expect_err("reuse of a rotated secret");

    // A leak report, which carries secrets in the request.
    let (_, leaked) = create("leaked").await;
    secrets.token("leaked token", &leaked);
    tokens
        .revoke_leaked_token(pb::RevokeLeakedTokenRequest {
            secrets: vec![leaked.clone(), unknown.clone(), malformed.clone()],
        })
        .await
        .expect("report leaked secrets");
    assert_eq!(
        verify(&leaked).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    accounts
        .sign_out(bearer(pb::SignOutRequest {}, &second_session))
        .await
        .expect("sign out the second session");

    accounts
        .sign_out(bearer(pb::SignOutRequest {}, &session))
        .await
        .expect("sign out");
    assert_eq!(
        verify(&session).await.reason,
        pb::InactiveReason::Revoked as i32
    );
    tokens
        .revoke_token(bearer(
            pb::RevokeTokenRequest { token_id: pat_id },
            &operator,
        ))
        .await
        .expect("revoke");
    assert_eq!(
        verify(&pat).await.reason,
        pb::InactiveReason::Revoked as i32
    );

    // The audit log of the whole flow, as an operator reads it.
    let events = AuditServiceClient::new(channel.clone())
        .list_audit_events(bearer(
            pb::ListAuditEventsRequest {
                page_size: 1000,
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("list audit events")
        .into_inner();
    assert!(events.events.len() >= 10, "{events:?}");
    let audit = format!("{events:?}");

    let metrics = crate::observability::scrape(server.metrics_addr.expect("metrics are on")).await;
    drop((accounts, tokens, channel));
    let stopped = server.terminate().await;
    assert!(
        stopped.status.success(),
        "the server exited with {} after SIGTERM; stderr:\n{}",
        stopped.status,
        stopped.stderr
    );

    // The capture works and the logs are at trace level.
    for expected in [
        "account created",
        "signed in",
        "token created",
        "token revoked",
        "TRACE",
    ] {
        assert!(
            stopped.stderr.contains(expected),
            "the server log lacks {expected:?}:\n{}",
            stopped.stderr
        );
    }
    assert!(
        bootstrap.stderr.contains("issued an operator token"),
        "the bootstrap log lacks its message:\n{}",
        bootstrap.stderr
    );
    if format == "json" {
        crate::observability::assert_json_lines(&stopped.stderr);
    }
    assert!(
        metrics.contains("identity_grpc_requests_total"),
        "{metrics}"
    );
    secrets.assert_absent_from(&[
        ("the bootstrap's stderr", &bootstrap.stderr),
        ("the server's stderr", &stopped.stderr),
        ("the server's stdout", &stopped.stdout),
        ("the audit log", &audit),
        ("the refusals' statuses", &refusals),
        ("the server's metrics", &metrics),
    ]);
}

mod no_secret_ever_reaches_the_logs {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        no_secret_reaches_the_logs_on(Backend::Sqlite, "text").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        no_secret_reaches_the_logs_on(Backend::Postgres, "text").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_json() {
        no_secret_reaches_the_logs_on(Backend::Sqlite, "json").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres_json() {
        no_secret_reaches_the_logs_on(Backend::Postgres, "json").await;
    }
}

/// Starts a server, checks health over a connection, sends `signal`, and
/// checks that the server drained and exited 0 promptly.
async fn signal_drains_and_exits_zero(signal: &str) {
    let db = TestDatabase::new(Backend::Sqlite).await;
    let server = Server::start(&db.url, &[]).await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    for service in [
        "",
        "identity.v1.TokensService",
        "identity.v1.AccountsService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|e| panic!("health check of {service:?}: {e}"))
            .into_inner()
            .status;
        assert_eq!(
            status,
            ServingStatus::Serving as i32,
            "health of {service:?}"
        );
    }

    // The connection stays open across the signal.
    let mut process = server.process;
    process.signal(signal);
    let started = Instant::now();
    let stopped = process.finish(SHUTDOWN_TIMEOUT).await;
    assert_eq!(
        stopped.status.code(),
        Some(0),
        "exit after SIG{signal}: {}; stderr:\n{}",
        stopped.status,
        stopped.stderr
    );
    let log = strip_ansi(&stopped.stderr);
    for expected in ["shutdown requested: draining", "stopped"] {
        assert!(log.contains(expected), "the log lacks {expected:?}:\n{log}");
    }
    assert!(
        !log.contains("drain timeout passed"),
        "an idle connection held up the drain ({:?}):\n{log}",
        started.elapsed()
    );
    drop(channel);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero() {
    signal_drains_and_exits_zero("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_and_exits_zero_too() {
    signal_drains_and_exits_zero("INT").await;
}

/// What is wrong, if anything, with how the binary refused a bad
/// configuration `what`: it must exit non-zero, name one of `names` on
/// stderr, and not serve.
fn refusal_problem(what: &str, finished: &Finished, names: &[&str]) -> Option<String> {
    let stderr = strip_ansi(&finished.stderr);
    if finished.status.success() {
        Some(format!("{what}: exited 0; stderr:\n{stderr}"))
    } else if !names.iter().any(|name| stderr.contains(name)) {
        Some(format!("{what}: stderr names none of {names:?}:\n{stderr}"))
    } else if stderr.contains("serving") {
        Some(format!("{what}: served anyway:\n{stderr}"))
    } else {
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_fails_naming_the_setting() {
    let (_dir, _, sqlite) = sqlite_file();
    // (environment variable, flag, bad value)
    let cases = [
        ("DATABASE_URL", "--database-url", "mysql://x"),
        ("IDENTITY_LISTEN_ADDR", "--listen-addr", "not-an-address"),
        ("IDENTITY_SESSION_TTL", "--session-ttl", "forever"),
        ("IDENTITY_HASH_CONCURRENCY", "--hash-concurrency", "0"),
        ("IDENTITY_DB_MAX_CONNECTIONS", "--db-max-connections", "0"),
        (
            "IDENTITY_DB_ACQUIRE_TIMEOUT",
            "--db-acquire-timeout",
            "soon",
        ),
        ("IDENTITY_PASSWORD_MIN_CHARS", "--password-min-chars", "4"),
        ("IDENTITY_DRAIN_TIMEOUT", "--drain-timeout", "1.5s"),
        ("IDENTITY_MIGRATE", "--migrate", "maybe"),
        ("IDENTITY_LOG", "--log", "identity=loud"),
        // A certificate without its key.
        ("IDENTITY_TLS_CERT", "--tls-cert", "/nonexistent/tls.crt"),
        (
            "IDENTITY_TLS_RELOAD_INTERVAL",
            "--tls-reload-interval",
            "0s",
        ),
        ("IDENTITY_VERIFY_AUTH", "--verify-auth", "anyone"),
        ("IDENTITY_VERIFY_CLIENTS", "--verify-clients", "two words"),
        ("IDENTITY_LOG_FORMAT", "--log-format", "xml"),
        ("IDENTITY_METRICS_ADDR", "--metrics-addr", "everywhere"),
    ];
    let mut failures = Vec::new();
    for (env, flag, value) in cases {
        let mut by_env = identity_command(&sqlite);
        by_env
            .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
            .env(env, value);
        failures.extend(refusal_problem(
            &format!("{env}={value}"),
            &run(by_env).await,
            &[env, flag],
        ));

        let mut by_flag = identity_command(&sqlite);
        by_flag
            .args(["--listen-addr", "127.0.0.1:0"])
            .arg(flag)
            .arg(value);
        failures.extend(refusal_problem(
            &format!("{flag} {value}"),
            &run(by_flag).await,
            &[env, flag],
        ));
    }

    // A listen address that is already taken.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken_addr = taken.local_addr().expect("local address").to_string();
    let mut in_use = identity_command(&sqlite);
    in_use.env("IDENTITY_LISTEN_ADDR", &taken_addr);
    failures.extend(refusal_problem(
        &format!("IDENTITY_LISTEN_ADDR={taken_addr} (in use)"),
        &run(in_use).await,
        &["IDENTITY_LISTEN_ADDR"],
    ));
    // The same for the metrics address.
    let mut metrics_in_use = identity_command(&sqlite);
    metrics_in_use
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .env("IDENTITY_METRICS_ADDR", &taken_addr);
    failures.extend(refusal_problem(
        &format!("IDENTITY_METRICS_ADDR={taken_addr} (in use)"),
        &run(metrics_in_use).await,
        &["IDENTITY_METRICS_ADDR"],
    ));
    drop(taken);

    // A database that does not answer: named, with its password redacted,
    // by a one-shot command (`serve` starts NOT_SERVING instead and waits
    // for it: see `outage.rs`).
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let password = format!("pw{}", random_hex());
    let unreachable = format!("postgres://app:{password}@127.0.0.1:{closed_port}/identity");
    let mut no_database = identity_command(&unreachable);
    no_database
        .arg("migrate")
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .env("IDENTITY_DB_ACQUIRE_TIMEOUT", "1s");
    let started = Instant::now();
    let finished = run(no_database).await;
    let took = started.elapsed();
    if finished.stderr.contains(&password) {
        failures.push(format!(
            "unreachable database: the password is in stderr:\n{}",
            finished.stderr
        ));
    }
    if took > Duration::from_secs(15) {
        failures.push(format!(
            "unreachable database: took {took:?} to fail with a 1 s acquire timeout"
        ));
    }
    failures.extend(refusal_problem(
        "unreachable DATABASE_URL",
        &finished,
        &["DATABASE_URL"],
    ));

    assert!(
        failures.is_empty(),
        "{} bad configuration(s) mishandled:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_database_url_is_not_echoed_with_its_password() {
    // A mistyped scheme is refused by the command line parser, which quotes
    // the value it refused: the URL must not appear there with its password.
    let password = format!("pw{}", random_hex());
    let mut failures = Vec::new();
    for url in [
        format!("postgress://app:{password}@db.internal:5432/identity"),
        format!("mysql://app:{password}@db.internal/identity"),
    ] {
        for by_flag in [false, true] {
            let mut command = identity_command("sqlite::memory:");
            // The flag takes precedence over the variable set above.
            if by_flag {
                command.arg("--database-url").arg(&url);
            } else {
                command.env("DATABASE_URL", &url);
            }
            command.args(["--listen-addr", "127.0.0.1:0"]);
            let finished = run(command).await;
            let what = if by_flag {
                "--database-url"
            } else {
                "DATABASE_URL"
            };
            failures.extend(refusal_problem(
                &format!("{what}={url}"),
                &finished,
                &["DATABASE_URL", "--database-url"],
            ));
            if finished.stderr.contains(&password) {
                failures.push(format!(
                    "{what}={url}: the password is echoed on stderr:\n{}",
                    finished.stderr
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// `bootstrap-operator` on `backend`: one token line, the same operator
/// account each time, refused for another account's username.
async fn bootstrap_operator_prints_only_a_token_on(backend: Backend) {
    let db = TestDatabase::new(backend).await;
    let first = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    let second = printed_token(&bootstrap_operator(&db.url, "ops", &[]).await);
    assert_ne!(first, second, "each run issues a new token");

    let server = Server::start(&db.url, &[]).await;
    let channel = server.channel().await;
    let mut tokens = TokensServiceClient::new(channel.clone());
    let mut accounts = AccountsServiceClient::new(channel.clone());
    // Full access does not include `tokens:verify`: the first token makes
    // a verifier token of the operator's.
    let ops = accounts
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &first,
        ))
        .await
        .expect("look up the operator")
        .into_inner()
        .account
        .expect("account");
    let verifier = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: ops.account_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            &first,
        ))
        .await
        .expect("create a verifier token")
        .into_inner()
        .secret;
    let mut principals = Vec::new();
    for token in [&first, &second] {
        let verdict = tokens
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: token.clone(),
                    required_scopes: vec![],
                    ..Default::default()
                },
                &verifier,
            ))
            .await
            .expect("verify a bootstrap token")
            .into_inner();
        assert!(verdict.active, "{verdict:?}");
        let principal = verdict.principal.expect("principal");
        assert_eq!(principal.account_role, pb::AccountRole::Operator as i32);
        assert_eq!(principal.account_kind, pb::AccountKind::Robot as i32);
        assert_eq!(
            principal.credential_kind,
            pb::CredentialKind::PersonalAccessToken as i32
        );
        assert_eq!(principal.username, "ops");
        assert!(principal.scopes.is_empty(), "full access: {principal:?}");
        principals.push(principal);
    }
    assert_eq!(principals[0].account_id, principals[1].account_id);
    assert_ne!(principals[0].token_id, principals[1].token_id);
    let listed = accounts
        .list_accounts(bearer(pb::ListAccountsRequest::default(), &first))
        .await
        .expect("list accounts")
        .into_inner();
    assert_eq!(listed.accounts.len(), 1, "one operator account: {listed:?}");

    for (username, kind, password) in [
        ("alice", pb::AccountKind::Person, "maple quartz harbor 62"),
        ("ci-bot", pb::AccountKind::Robot, ""),
    ] {
        accounts
            .create_account(bearer(
                pb::CreateAccountRequest {
                    username: username.into(),
                    password: password.into(),
                    email: String::new(),
                    kind: kind as i32,
                    role: 0,
                },
                &first,
            ))
            .await
            .unwrap_or_else(|e| panic!("create {username}: {e}"));
    }
    for username in ["alice", "ALICE", "ci-bot"] {
        let refused = bootstrap_operator(&db.url, username, &[]).await;
        assert!(
            !refused.status.success(),
            "bootstrap-operator for the non-operator {username:?} succeeded; stdout {:?}",
            refused.stdout
        );
        assert_eq!(refused.stdout, "", "no token is printed for {username:?}");
        assert!(
            refused.stderr.contains("not an operator"),
            "the refusal for {username:?} does not say why:\n{}",
            refused.stderr
        );
    }
    let invalid = bootstrap_operator(&db.url, "bad name!", &[]).await;
    assert!(!invalid.status.success(), "an invalid username is refused");
    assert_eq!(invalid.stdout, "");
    assert!(
        invalid.stderr.contains("--username"),
        "the refusal names --username:\n{}",
        invalid.stderr
    );

    let listed = accounts
        .list_accounts(bearer(pb::ListAccountsRequest::default(), &first))
        .await
        .expect("list accounts")
        .into_inner();
    assert_eq!(listed.accounts.len(), 3, "no account was added: {listed:?}");
    drop((tokens, accounts, channel));
    let stopped = server.terminate().await;
    assert!(stopped.status.success(), "{stopped:?}");
}

mod bootstrap_operator_prints_only_a_token {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        bootstrap_operator_prints_only_a_token_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        bootstrap_operator_prints_only_a_token_on(Backend::Postgres).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_applies_the_schema_and_exits() {
    use sqlx::{ConnectOptions as _, sqlite::SqliteConnectOptions};

    let (_dir, path, url) = sqlite_file();
    assert!(!path.exists());
    let migrate = || {
        let mut command = identity_command(&url);
        // Set on the command line, `--migrate false` must not stop `migrate`.
        command.args(["migrate", "--migrate", "false"]);
        run(command)
    };
    let finished = migrate().await;
    assert!(
        finished.status.success(),
        "migrate failed ({}):\n{}",
        finished.status,
        finished.stderr
    );
    assert_eq!(finished.stdout, "", "migrate prints nothing on stdout");
    assert!(
        finished.stderr.contains("migrations applied"),
        "{}",
        finished.stderr
    );
    assert!(!finished.stderr.contains("serving"), "{}", finished.stderr);

    let mut conn = SqliteConnectOptions::new()
        .filename(&path)
        .read_only(true)
        .connect()
        .await
        .expect("open the migrated file");
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .expect("list tables");
    assert!(
        tables.iter().any(|t| t == "accounts"),
        "no accounts table: {tables:?}"
    );
    drop(conn);

    let again = migrate().await;
    assert!(
        again.status.success(),
        "a second migrate failed ({}):\n{}",
        again.status,
        again.stderr
    );

    // The schema is complete: a command that does not migrate works on it.
    let token =
        printed_token(&bootstrap_operator(&url, "ops", &[("IDENTITY_MIGRATE", "false")]).await);
    assert!(token.starts_with("idpat_"));
}

/// Runs one statement on the database at `url`, outside the service.
async fn execute_on(url: &str, statement: &str) {
    use sqlx::Connection as _;
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect(statement);
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query(statement)
            .execute(&mut conn)
            .await
            .expect(statement);
    }
}

/// `serve` without migrating refuses a database that lacks this build's
/// migrations, and any command refuses one migrated by a newer release.
async fn a_schema_this_build_does_not_know_is_refused_on(backend: Backend) {
    let (_dir, url) = match backend {
        Backend::Sqlite => {
            let (dir, _path, url) = sqlite_file();
            (Some(dir), url)
        }
        Backend::Postgres => (None, crate::support::postgres::fresh_database_url().await),
    };
    let serve_without_migrating = || {
        let mut command = identity_command(&url);
        command.args([
            "serve",
            "--listen-addr",
            "127.0.0.1:0",
            "--migrate",
            "false",
        ]);
        run(command)
    };
    let migrate = || {
        let mut command = identity_command(&url);
        command.arg("migrate");
        run(command)
    };

    let unmigrated = serve_without_migrating().await;
    assert!(!unmigrated.status.success(), "{}", unmigrated.stderr);
    assert!(
        unmigrated.stderr.contains("run `identity migrate` first"),
        "{}",
        unmigrated.stderr
    );
    assert!(
        !unmigrated.stderr.contains("serving"),
        "{}",
        unmigrated.stderr
    );

    let migrated = migrate().await;
    assert!(migrated.status.success(), "{}", migrated.stderr);

    // A newer release applied migration 9999.
    execute_on(
        &url,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer release', TRUE, x'00', 0)"
            .replace(
                "x'00'",
                if backend == Backend::Sqlite {
                    "x'00'"
                } else {
                    "'\\x00'::bytea"
                },
            )
            .as_str(),
    )
    .await;
    for finished in [serve_without_migrating().await, migrate().await] {
        assert!(!finished.status.success(), "{}", finished.stderr);
        assert!(
            finished
                .stderr
                .contains("newer than this build: it has migration 9999"),
            "{}",
            finished.stderr
        );
    }
}

mod a_schema_this_build_does_not_know_is_refused {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        a_schema_this_build_does_not_know_is_refused_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        a_schema_this_build_does_not_know_is_refused_on(Backend::Postgres).await;
    }
}

/// `identity config check`: a good file (and the shipped example) passes and
/// prints the effective settings with their origins, the password redacted;
/// a bad file fails naming the setting, never echoing the secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_validates_files_and_redacts_secrets() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let check = |file: &std::path::Path, env: &[(&str, &str)], flags: &[&str]| {
        // No DATABASE_URL in the environment: it must come from the file.
        let mut command = identity_command("sqlite:unused.db");
        command
            .env_remove("DATABASE_URL")
            .arg("--config")
            .arg(file)
            .args(["config", "check"])
            .args(flags)
            .envs(env.iter().copied());
        run(command)
    };
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write the config file");
        path
    };

    let good = write(
        "good.toml",
        "listen_addr = \"0.0.0.0:6000\"\n\
         database_url = \"postgres://app:pw-7f3a9c@db/identity\"\n\
         cache_ttl = \"10s\"\nsession_ttl = \"2h\"\nmigrate = false\n",
    );
    let finished = check(
        &good,
        &[("IDENTITY_CACHE_TTL", "5s")],
        &["--session-ttl", "1h"],
    )
    .await;
    assert!(finished.status.success(), "{}", finished.stderr);
    for expected in [
        "listen_addr = \"0.0.0.0:6000\"  # from the file",
        "database_url = \"postgres://app:***@db/identity\"  # from the file",
        "cache_ttl = \"5s\"  # from IDENTITY_CACHE_TTL",
        "session_ttl = \"1h\"  # from --session-ttl",
        "migrate = false  # from the file",
        "db_max_connections = 16  # default",
    ] {
        assert!(
            finished.stdout.contains(expected),
            "{expected} in:\n{}",
            finished.stdout
        );
    }
    assert!(
        !finished.stdout.contains("pw-7f3a9c"),
        "{}",
        finished.stdout
    );

    // What it prints is itself a valid configuration file.
    let printed = write("printed.toml", &finished.stdout);
    let again = check(&printed, &[], &[]).await;
    assert!(again.status.success(), "{}", again.stderr);

    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/identity.example.toml");
    let finished = check(&example, &[], &[]).await;
    assert!(finished.status.success(), "{}", finished.stderr);

    let bad = [
        (
            "unknown.toml",
            "listen_adr = \"0.0.0.0:1\"\n",
            "unknown setting `listen_adr`",
        ),
        (
            "value.toml",
            "session_ttl = \"soon\"\n",
            "setting `session_ttl`",
        ),
        (
            "range.toml",
            "db_max_connections = 0\n",
            "setting `db_max_connections`",
        ),
        (
            "type.toml",
            "cache_ttl = 1.5\n",
            "setting `cache_ttl` must be",
        ),
        (
            "rule.toml",
            "token_default_ttl = \"400d\"\n",
            "`token_default_ttl` in config file",
        ),
        (
            "syntax.toml",
            "database_url = \"postgres://app:pw-7f3a9c@db/identity\nx = 1\n",
            "not valid TOML at line 1",
        ),
        (
            "url.toml",
            "database_url = \"mysql://app:pw-7f3a9c@db/x\"\n",
            "`database_url` in config file",
        ),
    ];
    for (name, text, expected) in bad {
        let finished = check(&write(name, text), &[], &[]).await;
        assert!(
            !finished.status.success(),
            "{name} passed:\n{}",
            finished.stdout
        );
        assert!(
            finished.stderr.contains(expected),
            "{name}: {}",
            finished.stderr
        );
        assert!(
            !finished.stderr.contains("pw-7f3a9c"),
            "{name}: {}",
            finished.stderr
        );
        assert_eq!(finished.stdout, "", "{name}");
    }
    let missing = check(&dir.path().join("missing.toml"), &[], &[]).await;
    assert!(!missing.status.success());
    assert!(
        missing.stderr.contains("cannot read it"),
        "{}",
        missing.stderr
    );
}
