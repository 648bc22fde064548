//! A database password in the URL's query (`?password=…`, and the client
//! key's `sslpassword=…`) is a secret like the userinfo password: `config
//! check`, the start-up log and database errors show `***` in its place.

use crate::support::binary::{Server, identity_command, random_hex, run};

/// The URL with both query secrets appended.
fn with_query_secrets(url: &str, password: &str, key_password: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=disable&password={password}&sslpassword={key_password}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_password_in_the_url_query_is_never_shown() {
    let password = format!("qpw{}", random_hex());
    let key_password = format!("kpw{}", random_hex());
    let leaks = |what: &str, text: &str| -> Vec<String> {
        [&password, &key_password]
            .into_iter()
            .filter(|secret| text.contains(secret.as_str()))
            .map(|secret| format!("{what} shows {secret}:\n{text}"))
            .collect()
    };
    let mut failures = Vec::new();

    // `config check` prints the effective settings.
    let url = with_query_secrets(
        "postgres://identity@db.internal/identity",
        &password,
        &key_password,
    );
    let mut command = identity_command(&url);
    command.args(["config", "check"]);
    let checked = run(command).await;
    assert!(checked.status.success(), "{}", checked.stderr);
    assert!(
        checked.stdout.contains("password=***&sslpassword=***"),
        "{}",
        checked.stdout
    );
    failures.extend(leaks("config check (stdout)", &checked.stdout));
    failures.extend(leaks("config check (stderr)", &checked.stderr));

    // The start-up log, on a real database (which trusts the connection,
    // so the password is not needed, only carried).
    let db = crate::support::postgres::fresh_database_url().await;
    let server = Server::start(&with_query_secrets(&db, &password, &key_password), &[]).await;
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
    failures.extend(leaks("the server's log", &finished.stderr));

    // A database that cannot be reached: the error names the URL.
    let unreachable = with_query_secrets(
        "postgres://identity@127.0.0.1:1/identity",
        &password,
        &key_password,
    );
    let mut command = identity_command(&unreachable);
    command
        .arg("migrate")
        .env("IDENTITY_DB_ACQUIRE_TIMEOUT", "1s");
    let failed = run(command).await;
    assert!(
        !failed.status.success(),
        "migrate without a database succeeded"
    );
    assert!(failed.stderr.contains("password=***"), "{}", failed.stderr);
    failures.extend(leaks("a connection error", &failed.stderr));
    failures.extend(leaks("a connection error (stdout)", &failed.stdout));

    // A userinfo password holding an unescaped '#', '/' or '?': the URL is
    // invalid, and both `config check` and the refusal show it redacted.
    for odd in ['#', '/', '?'] {
        let url = format!("postgres://identity:{password}{odd}{key_password}@127.0.0.1:1/identity");
        for args in [&["config", "check"][..], &["migrate"][..]] {
            let mut command = identity_command(&url);
            command.args(args).env("IDENTITY_DB_ACQUIRE_TIMEOUT", "1s");
            let output = run(command).await;
            failures.extend(leaks(
                &format!("{args:?} with '{odd}' (stdout)"),
                &output.stdout,
            ));
            failures.extend(leaks(
                &format!("{args:?} with '{odd}' (stderr)"),
                &output.stderr,
            ));
        }
    }

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The change channel's own URL (`IDENTITY_DATABASE_LISTEN_URL`, for a
/// transaction-mode pooler) is a database URL like `DATABASE_URL`: its
/// passwords, in the userinfo and in the query, never reach `config check`,
/// the start-up log, or the error of a listen database that cannot be
/// reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_url_password_is_never_shown() {
    let password = format!("lpw{}", random_hex());
    let key_password = format!("lkpw{}", random_hex());
    let leaks = |what: &str, text: &str| -> Vec<String> {
        [&password, &key_password]
            .into_iter()
            .filter(|secret| text.contains(secret.as_str()))
            .map(|secret| format!("{what} shows {secret}:\n{text}"))
            .collect()
    };
    let mut failures = Vec::new();

    let listen = with_query_secrets(
        &format!("postgres://identity:{password}@db.internal/identity"),
        &password,
        &key_password,
    );
    let mut command = identity_command("postgres://identity@db.internal/identity");
    command
        .args(["config", "check"])
        .env("IDENTITY_DATABASE_LISTEN_URL", &listen);
    let checked = run(command).await;
    assert!(checked.status.success(), "{}", checked.stderr);
    assert!(
        checked.stdout.contains("IDENTITY_DATABASE_LISTEN_URL"),
        "config check does not show the listen URL at all:\n{}",
        checked.stdout
    );
    failures.extend(leaks("config check (stdout)", &checked.stdout));
    failures.extend(leaks("config check (stderr)", &checked.stderr));

    // A real database, listened to through a URL that carries passwords
    // (the cluster trusts the connection: they are carried, not needed).
    let db = crate::support::postgres::fresh_database_url().await;
    let listen = with_query_secrets(&db, &password, &key_password);
    let server = Server::start(&db, &[("IDENTITY_DATABASE_LISTEN_URL", listen.as_str())]).await;
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
    failures.extend(leaks("the server's log", &finished.stderr));

    // A listen database that cannot be reached, for the migrations'
    // session (which runs on the listen URL).
    let unreachable = with_query_secrets(
        &format!("postgres://identity:{password}@127.0.0.1:1/identity"),
        &password,
        &key_password,
    );
    let mut command = identity_command(&db);
    command
        .arg("migrate")
        .env("IDENTITY_DATABASE_LISTEN_URL", &unreachable)
        .env("IDENTITY_DB_ACQUIRE_TIMEOUT", "1s");
    let failed = run(command).await;
    assert!(
        !failed.status.success(),
        "migrate through an unreachable listen URL succeeded"
    );
    failures.extend(leaks("a connection error", &failed.stderr));
    failures.extend(leaks("a connection error (stdout)", &failed.stdout));

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The read replica's URL (`IDENTITY_DATABASE_READ_URL`) is a database URL
/// like `DATABASE_URL`: its passwords never reach `config check`, the
/// start-up log, or the log of a server whose standby cannot be reached
/// (its reads then go to the primary).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_url_password_is_never_shown() {
    let password = format!("rpw{}", random_hex());
    let key_password = format!("rkpw{}", random_hex());
    let leaks = |what: &str, text: &str| -> Vec<String> {
        [&password, &key_password]
            .into_iter()
            .filter(|secret| text.contains(secret.as_str()))
            .map(|secret| format!("{what} shows {secret}:\n{text}"))
            .collect()
    };
    let mut failures = Vec::new();

    let read = with_query_secrets(
        &format!("postgres://identity:{password}@standby.internal/identity"),
        &password,
        &key_password,
    );
    let mut command = identity_command("postgres://identity@db.internal/identity");
    command
        .args(["config", "check"])
        .env("IDENTITY_DATABASE_READ_URL", &read);
    let checked = run(command).await;
    assert!(checked.status.success(), "{}", checked.stderr);
    assert!(
        checked.stdout.contains("IDENTITY_DATABASE_READ_URL"),
        "config check does not show the read URL at all:\n{}",
        checked.stdout
    );
    failures.extend(leaks("config check (stdout)", &checked.stdout));
    failures.extend(leaks("config check (stderr)", &checked.stderr));

    // A server whose standby cannot be reached, verbose.
    let db = crate::support::postgres::fresh_database_url().await;
    let unreachable = with_query_secrets(
        &format!("postgres://identity:{password}@127.0.0.1:1/identity"),
        &password,
        &key_password,
    );
    let server = Server::start(
        &db,
        &[
            ("IDENTITY_DATABASE_READ_URL", unreachable.as_str()),
            ("IDENTITY_LOG", "debug"),
        ],
    )
    .await;
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
    failures.extend(leaks("the server's log", &finished.stderr));

    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
