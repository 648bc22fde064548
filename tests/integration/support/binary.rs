//! The harness for the real `identity` binary, run as a child process.
//!
//! [`Server`] starts the binary on `127.0.0.1:0`, learns the bound address
//! from the `serving addr=...` log line on stderr (no sleeping for
//! readiness), keeps collecting stderr in the background, and kills the
//! child if the test ends without stopping it. [`run`] runs a one-shot
//! command to completion; [`Secrets`] checks that no secret reached what a
//! child wrote.

use std::{
    io::{BufRead as _, BufReader, Read},
    net::SocketAddr,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, PoisonError},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use rand::{Rng as _, rngs::OsRng};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// The binary under test.
const BINARY: &str = env!("CARGO_BIN_EXE_identity");
/// How long the server may take to log `serving`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a one-shot command (or a refused start) may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server may take to exit after SIGTERM with nothing in
/// flight.
pub(crate) const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

/// A command that runs the binary against `database_url`, with piped
/// stdout and stderr, none of this process's `IDENTITY_*` settings, and
/// metrics on a port of the kernel's choosing.
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

    /// What the child has written to stderr so far.
    pub(crate) fn stderr(&self) -> String {
        self.stderr.snapshot()
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
pub(crate) fn serving_addr(line: &str) -> Option<SocketAddr> {
    serving_field(line, "addr")?.parse().ok()
}

/// The value of `field` in the `serving` log line, written as text
/// (`serving addr=... metrics_addr=...`) or as JSON; `None` for other lines.
pub(crate) fn serving_field(line: &str, field: &str) -> Option<String> {
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

// Secrets and their derived forms
// ---------------------------------------------------------------------------

pub(crate) const BASE64_STANDARD: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
pub(crate) const BASE64_URL_SAFE: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// `bytes` in base64 over `alphabet`, without padding.
pub(crate) fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> String {
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
