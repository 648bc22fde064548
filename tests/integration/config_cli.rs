//! The command line as an operator meets it, through the real binary:
//! `config check` refuses exactly what `serve` refuses, with the same
//! message; a bad value is reported by where it came from (variable, flag
//! or file key) and never repeated; listen addresses may be host names;
//! empty, non-UTF-8 and listed values are named without being repeated;
//! each command's `--help` lists only what it uses; and the commands that
//! act on the database say which one (redacted), `bootstrap-operator`
//! refusing one nobody migrated without creating anything.

use std::path::Path;

use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    support::Backend,
    support::binary::{
        Finished, Server, identity_command, random_hex, run, serving_field, sqlite_file,
        strip_ansi, with_database_password,
    },
};

/// The `error:` lines of a run's stderr, colours removed.
fn error_lines(finished: &Finished) -> Vec<String> {
    strip_ansi(&finished.stderr)
        .lines()
        .filter(|line| line.starts_with("error:"))
        .map(str::to_owned)
        .collect()
}

/// Runs `args` of the binary against a SQLite file in `dir` with `env`.
async fn identity(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Finished {
    let mut command = identity_command(&format!("sqlite:{}", dir.join("identity.db").display()));
    command
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .args(args)
        .envs(env.iter().copied());
    run(command).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_check_refuses_what_serve_refuses_with_the_same_message() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "this is not a certificate\n").expect("write");
    let not_pem = not_pem.to_str().expect("UTF-8 path");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "listen_addr = \"127.0.0.1:0\nx = 1\n").expect("write");
    let bad_toml = bad_toml.to_str().expect("UTF-8 path");
    let password = format!("pw{}", random_hex());
    let notaport = format!("postgres://app:{password}@127.0.0.1:notaport/identity");
    let bogus_sslmode = format!("postgres://app:{password}@127.0.0.1/identity?sslmode=bogus");
    let mysql = format!("mysql://app:{password}@127.0.0.1/identity");
    let db_files: Vec<(&str, String)> = ["sslrootcert", "sslcert", "sslkey"]
        .into_iter()
        .map(|parameter| {
            (
                parameter,
                format!(
                    "postgres://app:{password}@127.0.0.1/identity?sslmode=verify-full&{parameter}=/nonexistent/{parameter}.pem"
                ),
            )
        })
        .collect();
    let missing = [
        ("IDENTITY_TLS_CERT", "/nonexistent/tls.crt"),
        ("IDENTITY_TLS_KEY", "/nonexistent/tls.key"),
        ("IDENTITY_TLS_CLIENT_CA", "/nonexistent/ca.crt"),
    ];
    // (what, environment): each configuration `serve` refuses before it
    // touches the network.
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "client verification without a client CA",
            vec![
                ("IDENTITY_VERIFY_AUTH", "client"),
                ("IDENTITY_VERIFY_CLIENTS", "svc.internal"),
            ],
        ),
        (
            "client verification without client names",
            [
                &missing[..],
                &[("IDENTITY_VERIFY_AUTH", "client-and-scope")],
            ]
            .concat(),
        ),
        (
            "client names with scope verification",
            vec![("IDENTITY_VERIFY_CLIENTS", "svc.internal")],
        ),
        ("TLS files that do not exist", missing[..2].to_vec()),
        (
            "a TLS file that is not PEM",
            vec![
                ("IDENTITY_TLS_CERT", not_pem),
                ("IDENTITY_TLS_KEY", not_pem),
            ],
        ),
        ("a certificate without its key", missing[..1].to_vec()),
        ("a client CA without a certificate", vec![missing[2]]),
        (
            "a zero TLS reload interval",
            [&missing[..2], &[("IDENTITY_TLS_RELOAD_INTERVAL", "0s")]].concat(),
        ),
        (
            "a zero TLS handshake timeout",
            [&missing[..2], &[("IDENTITY_TLS_HANDSHAKE_TIMEOUT", "0s")]].concat(),
        ),
        (
            "a plaintext web origin on a page served over TLS",
            [
                &missing[..2],
                &[("IDENTITY_WEB_ORIGIN", "http://id.example.test")],
            ]
            .concat(),
        ),
        (
            "a read URL with the polled change feed",
            vec![
                ("DATABASE_URL", "postgres://app@127.0.0.1/identity"),
                (
                    "IDENTITY_DATABASE_READ_URL",
                    "postgres://app@127.0.0.2/identity",
                ),
                ("IDENTITY_CHANGE_FEED", "poll"),
            ],
        ),
        (
            "a web origin with a path",
            vec![("IDENTITY_WEB_ORIGIN", "https://id.example.test/tokens")],
        ),
        (
            "a port that is not a number",
            vec![("DATABASE_URL", &notaport)],
        ),
        ("an unknown sslmode", vec![("DATABASE_URL", &bogus_sslmode)]),
        ("an unsupported database", vec![("DATABASE_URL", &mysql)]),
        (
            "the polled change feed on SQLite",
            vec![("IDENTITY_CHANGE_FEED", "poll")],
        ),
        (
            "a zero change feed poll interval",
            vec![("IDENTITY_CHANGE_FEED_POLL_INTERVAL", "0ms")],
        ),
        (
            "a change feed poll interval past the staleness bound",
            vec![("IDENTITY_CHANGE_FEED_POLL_INTERVAL", "1s")],
        ),
        (
            "a database root certificate that does not exist",
            vec![("DATABASE_URL", &db_files[0].1)],
        ),
        (
            "a database client certificate that does not exist",
            vec![("DATABASE_URL", &db_files[1].1)],
        ),
        (
            "a database client key that does not exist",
            vec![("DATABASE_URL", &db_files[2].1)],
        ),
        (
            "metrics on the gRPC address",
            vec![
                ("IDENTITY_LISTEN_ADDR", "127.0.0.1:50095"),
                ("IDENTITY_METRICS_ADDR", "127.0.0.1:50095"),
            ],
        ),
        (
            "health on the gRPC address",
            vec![
                ("IDENTITY_LISTEN_ADDR", "127.0.0.1:50095"),
                ("IDENTITY_HEALTH_LISTEN_ADDR", "127.0.0.1:50095"),
            ],
        ),
        (
            "the web page on the gRPC address",
            vec![
                ("IDENTITY_LISTEN_ADDR", "127.0.0.1:50095"),
                ("IDENTITY_WEB_ADDR", "127.0.0.1:50095"),
            ],
        ),
        (
            "the web page on the metrics address",
            vec![
                ("IDENTITY_METRICS_ADDR", "127.0.0.1:50096"),
                ("IDENTITY_WEB_ADDR", "0.0.0.0:50096"),
            ],
        ),
        (
            "health on a port gRPC takes on every interface",
            vec![
                ("IDENTITY_LISTEN_ADDR", "0.0.0.0:50095"),
                ("IDENTITY_HEALTH_LISTEN_ADDR", "127.0.0.1:50095"),
            ],
        ),
        (
            "metrics on the address localhost resolves to",
            vec![
                ("IDENTITY_LISTEN_ADDR", "localhost:50095"),
                ("IDENTITY_METRICS_ADDR", "127.0.0.1:50095"),
            ],
        ),
        (
            "an IPv6 zone id",
            vec![("IDENTITY_LISTEN_ADDR", "[fe80::1%1]:50077")],
        ),
        (
            "an empty TLS certificate path",
            vec![("IDENTITY_TLS_CERT", "")],
        ),
        (
            "a default token lifetime beyond the longest",
            vec![("IDENTITY_TOKEN_DEFAULT_TTL", "400d")],
        ),
        (
            "a zero default token lifetime",
            vec![("IDENTITY_TOKEN_DEFAULT_TTL", "0s")],
        ),
        ("a zero clock skew", vec![("IDENTITY_MAX_CLOCK_SKEW", "0s")]),
        (
            "a zero request timeout",
            vec![("IDENTITY_REQUEST_TIMEOUT", "0s")],
        ),
        (
            "a zero sign-in backoff",
            vec![("IDENTITY_SIGN_IN_BACKOFF_BASE", "0s")],
        ),
        (
            "a longest backoff beyond 7d",
            vec![
                ("IDENTITY_SIGN_IN_BACKOFF_MAX", "8d"),
                ("IDENTITY_SIGN_IN_ADDRESS_MEMORY", "9d"),
            ],
        ),
        (
            "an address memory shorter than the backoff",
            vec![("IDENTITY_SIGN_IN_ADDRESS_MEMORY", "1m")],
        ),
        (
            "a zero retention interval",
            vec![("IDENTITY_RETENTION_INTERVAL", "0s")],
        ),
        (
            "a bad trusted proxy",
            vec![("IDENTITY_TRUSTED_PROXIES", "10.0.0.0/99")],
        ),
        ("a zero idle timeout", vec![("IDENTITY_IDLE_TIMEOUT", "0s")]),
        (
            "a zero preface timeout",
            vec![("IDENTITY_PREFACE_TIMEOUT", "0s")],
        ),
        (
            "a zero session lifetime",
            vec![("IDENTITY_SESSION_TTL", "0s")],
        ),
        ("a bad log filter", vec![("IDENTITY_LOG", "identity=loud")]),
        ("a bad duration", vec![("IDENTITY_CACHE_TTL", "abc")]),
        (
            "a listen address that does not resolve",
            vec![("IDENTITY_LISTEN_ADDR", "no-such-host.invalid:50051")],
        ),
        (
            "a metrics address that does not resolve",
            vec![("IDENTITY_METRICS_ADDR", "no-such-host.invalid:9464")],
        ),
        (
            "a health address that does not resolve",
            vec![("IDENTITY_HEALTH_LISTEN_ADDR", "no-such-host.invalid:8081")],
        ),
        (
            "a config file that does not exist",
            vec![("IDENTITY_CONFIG", "/nonexistent/identity.toml")],
        ),
        (
            "a config file that is not TOML",
            vec![("IDENTITY_CONFIG", bad_toml)],
        ),
    ];
    let mut failures = Vec::new();
    for (what, env) in &cases {
        let checked = identity(dir.path(), &["config", "check"], env).await;
        let served = identity(dir.path(), &["serve"], env).await;
        for (command, finished) in [("config check", &checked), ("serve", &served)] {
            if finished.status.success() {
                failures.push(format!("{what}: {command} exited 0:\n{}", finished.stderr));
            }
            if finished.stderr.contains("serving") {
                failures.push(format!("{what}: {command} served:\n{}", finished.stderr));
            }
            if finished.stderr.contains(&password) || finished.stdout.contains(&password) {
                failures.push(format!("{what}: {command} shows the database password"));
            }
        }
        let (checked, served) = (error_lines(&checked), error_lines(&served));
        if checked.is_empty() || checked != served {
            failures.push(format!(
                "{what}: config check says {checked:?}, serve says {served:?}"
            ));
        }
        // A rule between settings names each of them.
        for (name, _) in env.iter().filter(|(_, value)| !value.is_empty()) {
            if what.contains(" on ") && !checked.concat().contains(name) {
                failures.push(format!("{what}: does not name {name}: {checked:?}"));
            }
        }
    }
    for (parameter, url) in &db_files {
        let checked = identity(dir.path(), &["config", "check"], &[("DATABASE_URL", url)]).await;
        let errors = error_lines(&checked).concat();
        if !errors.contains(parameter) || !errors.contains("DATABASE_URL") {
            failures.push(format!("{parameter}: not named: {errors}"));
        }
    }
    // Nothing was created in the working directory's place of the database.
    assert!(!dir.path().join("identity.db").exists());
    assert!(
        failures.is_empty(),
        "{} disagreement(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// One way to give a setting: (origin, environment, flags, what the message
/// must name, what it must not).
type Way<'a> = (
    &'a str,
    Vec<(&'a str, &'a str)>,
    Vec<&'a str>,
    &'a str,
    Vec<&'a str>,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_value_is_named_by_where_it_came_from_and_never_repeated() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let password = format!("pw{}", random_hex());
    let notaport = format!("postgres://app:{password}@127.0.0.1:notaport/identity");
    let mysql = format!("mysql://app:{password}@127.0.0.1/identity");
    // (setting id, environment variable, bad value): one of each kind.
    let cases = [
        ("cache_ttl", "IDENTITY_CACHE_TTL", "abc7q"),
        (
            "db_max_connections",
            "IDENTITY_DB_MAX_CONNECTIONS",
            "7777777",
        ),
        (
            "max_streams_per_connection",
            "IDENTITY_MAX_STREAMS_PER_CONNECTION",
            "x7q7",
        ),
        ("reflection", "IDENTITY_REFLECTION", "maybe7q"),
        ("log_format", "IDENTITY_LOG_FORMAT", "xml7q"),
        ("verify_auth", "IDENTITY_VERIFY_AUTH", "anyone7q"),
        ("listen_addr", "IDENTITY_LISTEN_ADDR", "not-an-address-7q"),
        (
            "listen_addr",
            "IDENTITY_LISTEN_ADDR",
            "no-such-7q.invalid:50051",
        ),
        ("metrics_addr", "IDENTITY_METRICS_ADDR", "everywhere7q"),
        ("database_url", "DATABASE_URL", notaport.as_str()),
        ("database_url", "DATABASE_URL", mysql.as_str()),
    ];
    let mut failures = Vec::new();
    for (id, env, value) in cases {
        let flag = format!("--{}", id.replace('_', "-"));
        let file = dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &file,
            format!("{id} = {}\n", toml::Value::String(value.to_owned())),
        )
        .expect("write the config file");
        let file = file.to_str().expect("UTF-8 path").to_owned();
        let key = format!("`{id}`");
        // (origin, environment, flags, what must be named, what must not)
        let ways: [Way<'_>; 3] = [
            (
                "variable",
                vec![(env, value)],
                vec![],
                env,
                vec![&flag, &key],
            ),
            (
                "flag",
                vec![],
                vec![flag.as_str(), value],
                &flag,
                vec![env, &key],
            ),
            (
                "file",
                vec![("IDENTITY_CONFIG", file.as_str())],
                vec![],
                &key,
                vec![env, &flag],
            ),
        ];
        for (origin, env_vars, flags, named, unnamed) in ways {
            let mut args = vec!["config", "check"];
            args.extend(flags);
            let mut env_vars = env_vars;
            if id != "listen_addr" {
                env_vars.insert(0, ("IDENTITY_LISTEN_ADDR", "127.0.0.1:0"));
            }
            let mut command = identity_command(&format!(
                "sqlite:{}",
                dir.path().join("identity.db").display()
            ));
            if id == "listen_addr" || origin == "file" {
                // The harness's own value would override the file's.
                command.env_remove(env);
            }
            command.args(&args).envs(env_vars);
            let finished = run(command).await;
            let what = format!("{id} by {origin}");
            let errors = error_lines(&finished).join("\n");
            if finished.status.success() || errors.is_empty() {
                failures.push(format!("{what}: not refused:\n{}", finished.stderr));
                continue;
            }
            if !errors.contains(named) {
                failures.push(format!("{what}: does not name {named}: {errors}"));
            }
            for other in unnamed {
                if errors.contains(other) {
                    failures.push(format!("{what}: names {other}: {errors}"));
                }
            }
            let output = format!("{}{}", finished.stdout, finished.stderr);
            if output.contains(value) {
                failures.push(format!("{what}: repeats the value: {output}"));
            }
            if output.contains(&password) {
                failures.push(format!("{what}: shows the password: {output}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} message(s) wrong:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Values a listed check cannot hold: an empty path, a value that is not
/// UTF-8, a list with one bad entry, a TLS file and a listener given by
/// flag or file. Each is named by where it was given, the list's entry by
/// its position, and no value is repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_non_utf8_and_listed_values_are_named_where_they_were_given() {
    use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _};

    let dir = tempfile::tempdir().expect("temporary directory");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write the config file");
        path.to_str().expect("UTF-8 path").to_owned()
    };
    let empty_cert = file("empty-cert.toml", "tls_cert = \"\"\n");
    let missing_tls = file(
        "missing-tls.toml",
        "tls_cert = \"/nonexistent/7q.crt\"\ntls_key = \"/nonexistent/7q.key\"\n",
    );
    let missing_tls_file = format!("`tls_cert` in config file {missing_tls}");
    // (what, environment, flags, what the message must name, what it
    // must not contain)
    let cases: Vec<Way<'_>> = vec![
        (
            "an empty certificate variable",
            vec![("IDENTITY_TLS_CERT", "")],
            vec![],
            "IDENTITY_TLS_CERT: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty key variable",
            vec![("IDENTITY_TLS_KEY", "")],
            vec![],
            "IDENTITY_TLS_KEY: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty client CA variable",
            vec![("IDENTITY_TLS_CLIENT_CA", "")],
            vec![],
            "IDENTITY_TLS_CLIENT_CA: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty config variable",
            vec![("IDENTITY_CONFIG", "")],
            vec![],
            "IDENTITY_CONFIG: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty certificate flag",
            vec![],
            vec!["--tls-cert", ""],
            "--tls-cert: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty config flag",
            vec![],
            vec!["--config", ""],
            "--config: must not be empty",
            vec!["expected one of"],
        ),
        (
            "an empty certificate in the file",
            vec![],
            vec!["--config", &empty_cert],
            "setting `tls_cert`: must not be empty",
            vec!["expected one of"],
        ),
        (
            "a bad entry in the client names",
            vec![("IDENTITY_VERIFY_CLIENTS", "good.example,bad entry 7q")],
            vec![],
            "IDENTITY_VERIFY_CLIENTS: entry 2",
            vec!["bad entry", "7q"],
        ),
        (
            "TLS files given by flag",
            vec![],
            vec![
                "--tls-cert",
                "/nonexistent/7q.crt",
                "--tls-key",
                "/nonexistent/7q.key",
            ],
            "TLS: --tls-cert (",
            vec!["IDENTITY_TLS_CERT"],
        ),
        (
            "TLS files given by the file",
            vec![],
            vec!["--config", &missing_tls],
            &missing_tls_file,
            vec!["IDENTITY_TLS_CERT"],
        ),
        (
            "listeners sharing a port, by flag",
            vec![],
            vec![
                "--listen-addr",
                "127.0.0.1:50095",
                "--metrics-addr",
                "127.0.0.1:50095",
            ],
            "--listen-addr and --metrics-addr would listen on the same port",
            vec!["IDENTITY_"],
        ),
    ];
    let mut failures = Vec::new();
    for (what, env, flags, named, unnamed) in &cases {
        for command_name in ["config check", "serve"] {
            let mut args: Vec<&str> = command_name.split(' ').collect();
            args.extend(flags.iter().copied());
            let finished = identity(dir.path(), &args, env).await;
            let errors = error_lines(&finished).join("\n");
            if finished.status.success() || !errors.contains(named) {
                failures.push(format!(
                    "{what} ({command_name}): does not say {named:?}:\n{}",
                    finished.stderr
                ));
            }
            for other in unnamed {
                if errors.contains(other) {
                    failures.push(format!("{what} ({command_name}): says {other:?}: {errors}"));
                }
            }
        }
    }

    // A value that is not UTF-8, by variable and by flag.
    let not_utf8 = OsStr::from_bytes(b"\xff7q");
    let mut by_env = crate::support::binary::identity_command(&format!(
        "sqlite:{}",
        dir.path().join("identity.db").display()
    ));
    by_env
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .env("IDENTITY_CACHE_TTL", not_utf8)
        .args(["config", "check"]);
    let mut by_flag = crate::support::binary::identity_command(&format!(
        "sqlite:{}",
        dir.path().join("identity.db").display()
    ));
    by_flag.env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0").args([
        OsStr::new("config"),
        OsStr::new("check"),
        OsStr::new("--cache-ttl"),
        not_utf8,
    ]);
    for (named, command) in [("IDENTITY_CACHE_TTL", by_env), ("--cache-ttl", by_flag)] {
        let finished = run(command).await;
        let errors = error_lines(&finished).join("\n");
        let expected = format!("{named}: the value is not valid UTF-8");
        if finished.status.success() || !errors.contains(&expected) {
            failures.push(format!(
                "not UTF-8 by {named}: does not say {expected:?}:\n{}",
                finished.stderr
            ));
        }
    }

    // A listener that cannot be bound is named by where it was given.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let taken_addr = taken.local_addr().expect("local address").to_string();
    let served = identity(dir.path(), &["serve", "--listen-addr", &taken_addr], &[]).await;
    let errors = error_lines(&served).join("\n");
    let expected = format!("cannot serve gRPC on {taken_addr} (--listen-addr)");
    if served.status.success() || !errors.contains(&expected) {
        failures.push(format!(
            "a taken port: does not say {expected:?}:\n{}",
            served.stderr
        ));
    }
    drop(taken);
    assert!(
        failures.is_empty(),
        "{} message(s) wrong:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_addresses_may_be_host_names() {
    let (_dir, _path, url) = sqlite_file();
    let mut command = identity_command(&url);
    command.args([
        "serve",
        "--listen-addr",
        "localhost:0",
        "--metrics-addr",
        "localhost:0",
        "--health-listen-addr",
        "localhost:0",
    ]);
    let server = Server::start_command(command).await;
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    let metrics = server.metrics_addr.expect("metrics on");
    assert!(metrics.ip().is_loopback(), "{metrics}");
    let mut health = HealthClient::new(server.channel().await);
    health
        .check(HealthCheckRequest::default())
        .await
        .expect("a health check on the address localhost resolved to");
    drop(health);
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
    let health_addr = finished
        .stderr
        .lines()
        .find_map(|line| serving_field(line, "health_addr"))
        .expect("the serving line names the health address");
    let health_addr: std::net::SocketAddr = health_addr.parse().expect("an address");
    assert!(health_addr.ip().is_loopback(), "{health_addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_lists_only_the_settings_it_uses() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let help = |args: &'static [&'static str]| {
        let dir = dir.path().to_owned();
        async move {
            let finished = identity(&dir, args, &[]).await;
            assert!(finished.status.success(), "{args:?}: {}", finished.stderr);
            finished.stdout
        }
    };
    let server_only = [
        "--cache-ttl",
        "--listen-addr",
        "--tls-cert",
        "--verify-auth",
    ];
    for args in [&["serve", "--help"][..], &["config", "check", "--help"][..]] {
        let text = help(args).await;
        for flag in server_only.iter().chain(&["--database-url", "--log"]) {
            assert!(
                text.contains(flag),
                "{args:?} does not list {flag}:\n{text}"
            );
        }
    }
    for (args, own) in [
        (
            &["migrate", "--help"][..],
            &["--database-url", "--migrate", "--log"][..],
        ),
        (
            &["bootstrap-operator", "--help"][..],
            &["--username", "--database-url", "--max-tokens-per-account"][..],
        ),
    ] {
        let text = help(args).await;
        for flag in own {
            assert!(
                text.contains(flag),
                "{args:?} does not list {flag}:\n{text}"
            );
        }
        for flag in server_only {
            assert!(!text.contains(flag), "{args:?} lists {flag}:\n{text}");
        }
    }
    // Settings a command does not use are not read by it either.
    let migrated = identity(dir.path(), &["migrate"], &[("IDENTITY_CACHE_TTL", "abc")]).await;
    assert!(migrated.status.success(), "{}", migrated.stderr);
    // Every command takes `--config` (before or after its name) and lists
    // it, and obeys the file's settings it uses: here, JSON logs.
    for args in [
        &["migrate", "--help"][..],
        &["bootstrap-operator", "--help"][..],
    ] {
        assert!(help(args).await.contains("--config"), "{args:?}");
    }
    let file = dir.path().join("identity.toml");
    std::fs::write(&file, "log_format = \"json\"\ncache_ttl = \"1m\"\n").expect("write");
    let file = file.to_str().expect("UTF-8 path");
    for args in [
        &["migrate", "--config", file][..],
        &["--config", file, "migrate"][..],
        // Settings before the command are the command's.
        &["--log", "info", "migrate", "--config", file][..],
        &["bootstrap-operator", "--username", "ops", "--config", file][..],
    ] {
        let finished = identity(dir.path(), args, &[]).await;
        assert!(finished.status.success(), "{args:?}: {}", finished.stderr);
        let first = finished.stderr.lines().next().unwrap_or_default();
        assert!(
            first.starts_with('{') && first.contains("\"database\""),
            "{args:?} logs JSON as its file says: {}",
            finished.stderr
        );
    }
}

/// `bootstrap-operator` on a database nobody migrated is refused, pointing
/// at `identity migrate`, and creates nothing; `migrate` and then
/// `bootstrap-operator` name the database they used, its password
/// redacted.
async fn commands_name_their_database_and_bootstrap_needs_a_schema_on(backend: Backend) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let (url, password) = match backend {
        // Relative, as in the README: resolved against the working directory.
        Backend::Sqlite => ("sqlite:identity.db".to_owned(), None),
        Backend::Postgres => {
            with_database_password(&crate::support::postgres::fresh_database_url().await)
        }
    };
    let command = |args: &[&str]| {
        let mut command = identity_command(&url);
        command.current_dir(dir.path()).args(args);
        command
    };
    let shown = identity::config::Config::with_database(url.clone()).redacted_database_url();
    let leaks = |finished: &Finished| {
        password
            .as_ref()
            .is_some_and(|p| finished.stderr.contains(p) || finished.stdout.contains(p))
    };

    let refused = run(command(&["bootstrap-operator", "--username", "ops"])).await;
    assert!(!refused.status.success(), "{}", refused.stderr);
    assert_eq!(
        refused.stdout, "",
        "no token for a database without a schema"
    );
    assert!(
        refused
            .stderr
            .contains("run `identity migrate` or start the server first"),
        "{}",
        refused.stderr
    );
    assert!(
        refused.stderr.contains(&shown),
        "{shown} in:\n{}",
        refused.stderr
    );
    assert!(!leaks(&refused), "{}", refused.stderr);
    if backend == Backend::Sqlite {
        let created: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list the directory")
            .collect();
        assert!(created.is_empty(), "files were created: {created:?}");
    }

    let migrated = run(command(&["migrate"])).await;
    assert!(migrated.status.success(), "{}", migrated.stderr);
    let text = strip_ansi(&migrated.stderr);
    assert!(
        text.contains(&format!("database={shown}")),
        "migrate does not name {shown}:\n{text}"
    );
    assert!(!leaks(&migrated), "{}", migrated.stderr);

    let issued = run(command(&["bootstrap-operator", "--username", "ops"])).await;
    assert!(issued.status.success(), "{}", issued.stderr);
    assert!(issued.stdout.starts_with("idpat_"), "{}", issued.stdout);
    let text = strip_ansi(&issued.stderr);
    assert!(
        text.contains(&format!("database={shown}")),
        "bootstrap-operator does not name {shown}:\n{text}"
    );
    assert!(!leaks(&issued), "{}", issued.stderr);

    // A disabled operator gets no token it could not use.
    let disable = "UPDATE accounts SET disable_time = 1 WHERE username = 'ops'";
    if backend == Backend::Sqlite {
        use sqlx::Connection as _;
        let path = dir.path().join("identity.db");
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite:{}", path.display()))
            .await
            .expect("open");
        sqlx::query(disable)
            .execute(&mut conn)
            .await
            .expect("disable");
    } else {
        use sqlx::Connection as _;
        let mut conn = sqlx::PgConnection::connect(&url).await.expect("connect");
        sqlx::query(disable)
            .execute(&mut conn)
            .await
            .expect("disable");
    }
    let refused = run(command(&["bootstrap-operator", "--username", "ops"])).await;
    assert!(!refused.status.success(), "{}", refused.stderr);
    assert_eq!(refused.stdout, "", "no token for a disabled operator");
    assert!(
        refused.stderr.contains("is disabled") && refused.stderr.contains("EnableAccount"),
        "{}",
        refused.stderr
    );
}

mod commands_name_their_database_and_bootstrap_needs_a_schema {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        commands_name_their_database_and_bootstrap_needs_a_schema_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        commands_name_their_database_and_bootstrap_needs_a_schema_on(Backend::Postgres).await;
    }
}

/// A setting given as `--flag value` is read like its variable, on/off
/// ones included (`--database-statement-cache off` was once refused, the
/// flag taking no value).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_off_settings_take_their_value_as_a_flag() {
    let url = "postgres://app@127.0.0.1:1/identity";
    for (value, listen, accepted) in [
        ("off", Some(url), true),
        ("on", None, true),
        ("off", None, false),
    ] {
        let mut command = identity_command(url);
        command.args(["config", "check", "--database-statement-cache", value]);
        if let Some(listen) = listen {
            command.args(["--database-listen-url", listen]);
        }
        let finished = run(command).await;
        assert_eq!(
            finished.status.success(),
            accepted,
            "--database-statement-cache {value} (listen URL {listen:?}): {}",
            finished.stderr
        );
        if !accepted {
            assert!(
                finished.stderr.contains("IDENTITY_DATABASE_LISTEN_URL")
                    || finished.stderr.contains("--database-listen-url"),
                "names what is missing: {}",
                finished.stderr
            );
        }
    }
}
