//! The README's example verifier clients (`examples/verify_client.rs`, with
//! tonic, and `examples/verify_client.py`, with grpcio), run against the real
//! server: each maps verdicts to the HTTP statuses the README recommends,
//! fails closed while the service is down, and answers the first request
//! after a restart (the Python one only because of the channel options and
//! `wait_for_ready` it shows: grpcio's defaults fail it at once).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use crate::support::{Backend, TestApp};

/// A running example client: one line in, one line out.
struct Client {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Client {
    fn spawn(mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        Self {
            child,
            stdin,
            stdout,
        }
    }

    /// The client's answer for `presented`, such as `200 alice`. Blocking:
    /// call it from `spawn_blocking`.
    fn decide(&mut self, presented: &str) -> String {
        writeln!(self.stdin, "{presented}").expect("write to the client");
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("read the answer");
        assert!(!line.is_empty(), "the client exited");
        line.trim().to_owned()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks `client` about `presented` without blocking the runtime.
async fn decide(client: Client, presented: &str) -> (Client, String) {
    let presented = presented.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut client = client;
        let answer = client.decide(&presented);
        (client, answer)
    })
    .await
    .expect("the client task")
}

/// `examples/verify_client.rs`, built as a plain binary by the cargo that
/// runs this suite (`cargo test --all-targets` builds examples as test
/// harnesses instead), into the same target directory.
fn rust_example() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cargo = Command::new(env!("CARGO"));
    // Not the variables cargo sets for a test run (its CARGO_PKG_*, the
    // library path it extends): with them the nested build would rebuild
    // dependencies it already has.
    for (name, _) in std::env::vars_os() {
        let name_text = name.to_string_lossy();
        if (name_text.starts_with("CARGO_")
            && name_text != "CARGO_HOME"
            && name_text != "CARGO_TARGET_DIR")
            || name_text == "LD_LIBRARY_PATH"
            || name_text == "OUT_DIR"
        {
            cargo.env_remove(&name);
        }
    }
    let status = cargo
        .current_dir(root)
        .args(["build", "--locked", "--example", "verify_client"])
        .status()
        .expect("run cargo build --example verify_client");
    assert!(status.success(), "cannot build examples/verify_client.rs");
    let exe = std::env::current_exe().expect("the test binary");
    let target = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    target.join("examples").join("verify_client")
}

/// The Python with grpcio and grpcio-tools that `.ci/test` installs.
fn python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/.tools/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run the suite with `bash .ci/test`, which installs grpcio",
        python.display()
    );
    python
}

/// Python stubs for the protos, generated into `dir` with grpcio-tools.
fn python_stubs(dir: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status = Command::new(python())
        .current_dir(root)
        .args(["-m", "grpc_tools.protoc", "-I", "proto"])
        .arg(format!("--python_out={}", dir.display()))
        .arg(format!("--grpc_python_out={}", dir.display()))
        .args([
            "proto/identity/v1/accounts.proto",
            "proto/identity/v1/audit.proto",
            "proto/identity/v1/tokens.proto",
        ])
        .status()
        .expect("run grpc_tools.protoc");
    assert!(status.success(), "grpc_tools.protoc failed");
}

/// A free loopback port, for a server that must come back on the same one.
fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// Runs `client` (started against `addr`) through the verdicts, an outage
/// and a restart of the replica serving `addr`.
async fn the_client_maps_verdicts_and_survives_a_restart(
    make: impl Fn(SocketAddr, &str, u64) -> Command,
) {
    let app = TestApp::spawn(Backend::Sqlite).await;
    let addr = free_addr();
    let serving = app.replica_with(|c| c.listen_addr = addr).await;
    let (alice, session) = app.person("alice").await;
    let (_, readable) = app
        .token(&session, &alice.account_id, "reader", &["project:read"])
        .await;
    let (_, other) = app
        .token(&session, &alice.account_id, "other", &["project:write"])
        .await;
    let (revoked_token, revoked) = app.token(&session, &alice.account_id, "gone", &[]).await;
    app.tokens()
        .revoke_token(crate::support::bearer(
            crate::support::pb::RevokeTokenRequest {
                token_id: revoked_token.token_id,
            },
            &session,
        ))
        .await
        .expect("revoke");
    let verifier = app.verifier_token().await;

    // A generous deadline for the restart: what is asserted is that the first
    // call after it succeeds, not how fast.
    let mut client = Client::spawn(make(addr, &verifier, 10_000));
    let mut answer;
    for (presented, expected) in [
        (readable.as_str(), "200 alice"),
        (other.as_str(), "403 INACTIVE_REASON_INSUFFICIENT_SCOPE"),
        (revoked.as_str(), "401 INACTIVE_REASON_REVOKED"),
        ("idpat_garbage", "401 INACTIVE_REASON_MALFORMED"),
    ] {
        (client, answer) = decide(client, presented).await;
        assert_eq!(answer, expected, "for {expected}");
    }

    // The service goes away: fail closed.
    serving.stop().await;
    let mut down = Client::spawn(make(addr, &verifier, 300));
    (down, answer) = decide(down, &readable).await;
    assert!(answer.starts_with("503 "), "{answer}");
    drop(down);

    // It comes back on the same address: the long-lived client's next call
    // succeeds.
    let back = app.replica_with(|c| c.listen_addr = addr).await;
    (client, answer) = decide(client, &readable).await;
    assert_eq!(answer, "200 alice");

    // A verifier whose own credential is wrong is a misconfiguration: 500.
    let mut wrong = Client::spawn(make(addr, &readable, 2_000));
    (wrong, answer) = decide(wrong, &readable).await;
    assert_eq!(answer, "500 PERMISSION_DENIED");
    drop((wrong, client));
    back.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_example_client_maps_verdicts_and_survives_a_restart() {
    let example = rust_example();
    the_client_maps_verdicts_and_survives_a_restart(|addr, verifier, deadline_ms| {
        let mut command = Command::new(&example);
        command
            .arg("project:read")
            .env("IDENTITY_ADDR", format!("http://{addr}"))
            .env("VERIFIER_TOKEN", verifier)
            .env("VERIFY_DEADLINE_MS", deadline_ms.to_string());
        command
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_client_maps_verdicts_and_survives_a_restart() {
    let stubs = tempfile::tempdir().expect("a directory for the stubs");
    python_stubs(stubs.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/verify_client.py");
    let python = python();
    the_client_maps_verdicts_and_survives_a_restart(|addr, verifier, deadline_ms| {
        let mut command = Command::new(&python);
        command
            .arg(&script)
            .arg("project:read")
            .env("PYTHONPATH", stubs.path())
            .env("IDENTITY_ADDR", addr.to_string())
            .env("VERIFIER_TOKEN", verifier)
            .env("VERIFY_DEADLINE_MS", deadline_ms.to_string());
        command
    })
    .await;
}
