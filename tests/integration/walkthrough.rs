//! The README's grpcurl walk-through, run verbatim against a real server with
//! the real `grpcurl` and the real `identity` binary, so the README cannot
//! drift from the service.

use std::{path::Path, process::Command};

use crate::both_backends;
use crate::support::TestApp;

/// The shell blocks of the README's walk-through section, in order.
fn walkthrough_script() -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("read README.md");
    let start = readme
        .find("## Walk-through with grpcurl")
        .expect("README has a walk-through section");
    let section = &readme[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut script = String::from("set -euo pipefail\n");
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("```").expect("closed code block");
        script.push_str(&body[..close]);
        rest = &body[close + 3..];
    }
    assert!(
        script.lines().count() > 20,
        "the walk-through lost its commands"
    );
    script
}

/// Fails with a helpful message when an external client is missing.
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{tool}` is not on PATH: run the suite with `bash .ci/test`, which installs it"
    );
}

async fn the_readme_walkthrough_works_as_written(app: TestApp) {
    require("grpcurl");
    require("jq");
    let binary_dir = Path::new(env!("CARGO_BIN_EXE_identity"))
        .parent()
        .expect("bin dir");
    let path = format!(
        "{}:{}",
        binary_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = walkthrough_script();
    let addr = app.addr.to_string();
    let db_url = app.db.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .args(["-c", &script])
            .env("PATH", path)
            .env("ADDR", addr)
            .env("DATABASE_URL", db_url)
            .output()
            .expect("run bash")
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the walk-through failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("\"status\": \"SERVING\""), "{stdout}");
    assert!(stdout.contains("\"active\": true"), "{stdout}");
    assert!(
        stdout.contains("\"credentialKind\": \"CREDENTIAL_KIND_PERSONAL_ACCESS_TOKEN\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"state\": \"TOKEN_STATE_REVOKED\""),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("INACTIVE_REASON_REVOKED").count(),
        2,
        "{stdout}"
    );
    assert!(
        stdout.contains("\"previous\": \"TOKEN_STATE_REVOKED\""),
        "{stdout}"
    );
    for event in [
        "AUDIT_EVENT_TYPE_TOKEN_ROTATED",
        "AUDIT_EVENT_TYPE_TOKEN_LEAKED",
        "AUDIT_EVENT_TYPE_ACCOUNT_CREATED",
    ] {
        assert!(stdout.contains(event), "{event} missing from\n{stdout}");
    }
    assert!(stderr.contains("ERROR_REASON_INVALID_ARGUMENT"), "{stderr}");
    assert!(stderr.contains("\"field\":\"username\""), "{stderr}");
}
both_backends!(the_readme_walkthrough_works_as_written);

/// Reflection is off: grpcurl cannot list services, but works from the
/// `.proto` files as the README shows. (Reflection does not touch storage:
/// one backend suffices.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_reflection_grpcurl_works_from_the_protos() {
    require("grpcurl");
    let app = crate::support::TestApp::spawn_with(crate::support::Backend::Sqlite, |config| {
        config.reflection = false
    })
    .await;
    let grpcurl = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            Command::new("grpcurl")
                .args(&args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .output()
                .expect("run grpcurl")
        })
    };
    let addr = app.addr.to_string();
    let listed = grpcurl(vec!["-plaintext".into(), addr.clone(), "list".into()])
        .await
        .expect("join");
    let stderr = String::from_utf8_lossy(&listed.stderr);
    assert!(
        !listed.status.success(),
        "reflection answered: {}",
        String::from_utf8_lossy(&listed.stdout)
    );
    assert!(
        stderr.contains("does not support the reflection API"),
        "{stderr}"
    );

    let verified = grpcurl(vec![
        "-plaintext".into(),
        "-import-path".into(),
        "proto".into(),
        "-proto".into(),
        "identity/v1/tokens.proto".into(),
        "-H".into(),
        format!("authorization: Bearer {}", app.verifier_token().await),
        "-d".into(),
        format!("{{\"token\": \"{}\"}}", app.operator_token),
        addr,
        "identity.v1.TokensService/VerifyToken".into(),
    ])
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&verified.stdout);
    assert!(
        verified.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    assert!(stdout.contains("\"active\": true"), "{stdout}");
}
