//! The Access Tokens page in a real browser: starts the server (SQLite) and
//! runs tests/browser/access_tokens.mjs (headless Chromium through
//! playwright-core, both installed by `.ci/test`), checking over gRPC what
//! the script reports: the token it read from the page is active for its
//! scope and then spent, the token it revoked is REVOKED at once, and the
//! session it signed out of is over. Screenshots: target/browser/, and the
//! token list in docs/access-tokens.png for the README.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
};

use tonic::Code;

use crate::{
    support::{Backend, PASSWORD, TestApp, bearer, pb},
    web::request,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_works_in_a_real_browser() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tools = std::env::var("NODE_TOOLS")
        .unwrap_or_else(|_| root.join(".ci/.tools").display().to_string());
    assert!(
        Path::new(&tools)
            .join("node_modules/playwright-core")
            .is_dir()
            && Path::new("/usr/bin/chromium").exists(),
        "playwright-core (in {tools}) and /usr/bin/chromium are needed: run .ci/test once"
    );
    let app = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.web_addr = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let web = app.web_addr.expect("web page on");
    app.accounts()
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: "alice".into(),
                password: PASSWORD.into(),
                kind: pb::AccountKind::Person as i32,
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create alice");
    let mut child = Command::new("node")
        .arg(root.join("tests/browser/access_tokens.mjs"))
        .env("WEB_URL", format!("http://{web}"))
        .env("WEB_USERNAME", "alice")
        .env("WEB_PASSWORD", PASSWORD)
        .env("SCREENSHOTS", root.join("target/browser"))
        .env("DOCS_PNG", root.join("docs/access-tokens.png"))
        .env("NODE_TOOLS", &tools)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run node");
    let mut stdin = child.stdin.take().expect("stdin");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel();
    let stdout = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while let Some(line) = lines.recv().await {
        let (what, value) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        seen.push(what.to_owned());
        let answer = match what {
            "SECRET" => {
                // Not for another project (which spends no use), then its
                // one use on its own project, then exhausted.
                let scope = ["projects:read"];
                let elsewhere = app.verify_for(value, &scope, &["projects/77e1d0"]).await;
                let first = app.verify_for(value, &scope, &["projects/3f9c2a"]).await;
                let second = app.verify_for(value, &scope, &["projects/3f9c2a"]).await;
                let not_allowed = pb::InactiveReason::ResourceNotAllowed as i32;
                let exhausted = pb::InactiveReason::Exhausted as i32;
                if !elsewhere.active
                    && elsewhere.reason == not_allowed
                    && elsewhere.missing_resources == ["projects/77e1d0"]
                    && first.active
                    && first
                        .principal
                        .as_ref()
                        .is_some_and(|p| p.resources == ["projects/3f9c2a"])
                    && !second.active
                    && second.reason == exhausted
                {
                    "ok".to_owned()
                } else {
                    format!("verified {elsewhere:?}, then {first:?}, then {second:?}")
                }
            }
            "REVOKED" => {
                let verified = app.verify(value, &[]).await;
                if !verified.active && verified.reason == pb::InactiveReason::Revoked as i32 {
                    "ok".to_owned()
                } else {
                    format!("{verified:?}")
                }
            }
            "SIGNED_OUT" => {
                let page = request(
                    web,
                    "GET",
                    "/tokens",
                    &[("Cookie", format!("identity-session={value}"))],
                    "",
                )
                .await;
                let grpc = app
                    .accounts()
                    .sign_out(bearer(pb::SignOutRequest {}, value))
                    .await;
                match (page.status, grpc) {
                    (303, Err(status)) if status.code() == Code::Unauthenticated => "ok".to_owned(),
                    (status, grpc) => format!("page {status}, gRPC {grpc:?}"),
                }
            }
            "DONE" => break,
            _ => continue,
        };
        writeln!(stdin, "{answer}").expect("answer the script");
    }
    drop(stdin);
    let status = child.wait().expect("node exits");
    assert!(status.success(), "the browser script failed after {seen:?}");
    assert_eq!(seen, ["SECRET", "REVOKED", "SIGNED_OUT", "DONE"]);
    app.stop().await;
}
