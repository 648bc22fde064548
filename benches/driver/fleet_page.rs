//! `bash benches/fleet_page.sh [--release]`: one page of the operators'
//! fleet-wide views at a million tokens (issue 12). Starts the cluster (the
//! tests' code), migrates it with `identity migrate`, bootstraps an
//! operator, loads 1000 robot accounts, 1,000,000 tokens (1000 per account,
//! the accounts interleaved over the id range) and 1,000,000 audit events
//! (one a second, the newest now) straight in with SQL generate_series,
//! starts `identity serve` on it and runs the client (benches/fleet_page.rs),
//! which times BENCH_RUNS (50) calls of each case and prints medians, the
//! ratio to the per-account listing and the EXPLAIN ANALYZE of the deep
//! pages. Uses the debug build unless --release. Not run in CI.

use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
};

use crate::{
    cluster::{self, Db},
    procs::{self, Result, fail, log},
    replicas::{self, tail},
    scenarios::cargo_build_bench,
};

const LOAD_SQL: &str = r"
INSERT INTO accounts (account_id, username, username_key, kind, role, create_time)
SELECT '00000000-0000-7000-a000-' || lpad(to_hex(a), 12, '0'), 'bench-robot-' || a,
       'bench-robot-' || a, 'robot', 'user', :now
FROM generate_series(1, 1000) AS a;
INSERT INTO tokens (token_id, account_id, name, live_name, digest, scopes, create_time,
                    expire_time, family_id)
SELECT id, '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'), 'bulk-' || i,
       'bulk-' || i, decode(md5(i::text) || md5('x' || i), 'hex'), 'project:read',
       :now - (1000000 - i)::bigint * 1000000, :now + (i % 90 + 1) * 86400000000, id
FROM (SELECT i, '00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0') AS id
      FROM generate_series(1, 1000000) AS i) AS n;
INSERT INTO audit_events (event_id, event_time, event_type, outcome, actor_account_id,
                          subject_account_id, subject_credential_id)
SELECT '00000000-0000-7000-9000-' || lpad(to_hex(i), 12, '0'), :now - (1000000 - i)::bigint * 1000000,
       'token.created', 'success', '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'),
       '00000000-0000-7000-a000-' || lpad(to_hex(i % 1000 + 1), 12, '0'),
       '00000000-0000-7000-8000-' || lpad(to_hex(i), 12, '0')
FROM generate_series(1, 1000000) AS i;
VACUUM ANALYZE;
";

/// The whole fleet_page run; `args` are fleet_page.sh's (`--release`).
pub fn run(args: &[String]) -> Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&repo)?;
    let release = args.first().is_some_and(|a| a == "--release");
    let profile = if release { "release" } else { "debug" };
    let mut flags = vec!["--locked"];
    if release {
        flags.push("--release");
    }
    log(format!("build identity and the client ({profile})"));
    if !procs::run(
        Command::new("cargo")
            .arg("build")
            .args(&flags)
            .args(["--bin", "identity"]),
        None,
    )? {
        return fail("cargo build --bin identity failed");
    }
    let Some(client) = cargo_build_bench(&flags, "fleet_page")? else {
        return fail("cargo build --bench fleet_page failed");
    };
    let identity = repo.join("target").join(profile).join("identity");

    let work = tempfile::Builder::new()
        .prefix("fleet-page.")
        .tempdir()?
        .keep();
    procs::own_work_dir(work.clone(), false);
    log("initdb + start PostgreSQL on 127.0.0.1 (the tests' cluster code)");
    let db = Db::start(cluster::FLEET_SETTINGS)?;
    db.announce();
    let url = db.url();
    let quiet = |args: &[&str]| {
        Command::new(&identity)
            .args(args)
            .env("DATABASE_URL", &url)
            .env("IDENTITY_LOG", "warn")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
    };
    if !quiet(&["migrate"])?.status.success() {
        return fail("identity migrate failed");
    }
    let ops = quiet(&["bootstrap-operator", "--username", "bench-ops"])?;
    if !ops.status.success() {
        return fail("identity bootstrap-operator failed");
    }
    let ops = String::from_utf8_lossy(&ops.stdout).trim().to_owned();

    let now_us = procs::epoch_secs() * 1_000_000;
    log("load 1000 accounts, 1,000,000 tokens and 1,000,000 audit events");
    let started = procs::epoch_secs();
    let sql = work.join("load.sql");
    fs::write(&sql, LOAD_SQL)?;
    db.psql(&[
        "-v",
        &format!("now={now_us}"),
        "-f",
        &sql.display().to_string(),
    ])?;
    log(format!("loaded in {}s", procs::epoch_secs() - started));

    let server_log = work.join("server.log");
    let file = fs::File::create(&server_log)?;
    let mut command = Command::new(&identity);
    command
        .arg("serve")
        .env("DATABASE_URL", &url)
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .env("IDENTITY_LOG", "info")
        .env("IDENTITY_METRICS_ADDR", "off")
        .env("IDENTITY_WEB_ADDR", "off")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let mut server = procs::spawn(&mut command)?;
    let Some(addr) = replicas::wait_serving(&mut server, &server_log, "identity::app: serving")
    else {
        eprintln!("{}", tail(&server_log, 200));
        return fail("the server did not start");
    };
    log(format!("server ({profile}) on {addr}; timing"));
    let mut command = Command::new(&client);
    command
        .env("BENCH_TARGET", format!("http://{addr}"))
        .env("BENCH_OPERATOR_TOKEN", &ops)
        .env("BENCH_ACCOUNT", "00000000-0000-7000-a000-000000000001")
        .env("DATABASE_URL", &url)
        .stdin(Stdio::null());
    if !procs::run(&mut command, None)? {
        return fail("the fleet_page client failed");
    }
    procs::stop(&mut server);
    Ok(())
}
