//! Reads from a hot standby (`IDENTITY_DATABASE_READ_URL`): each test runs a
//! primary of its own with a streaming standby (`support::postgres`), and
//! servers with `DATABASE_URL` on the primary and the read URL on the
//! standby. Which server answered a lookup is read from
//! `pg_stat_statements` on each (the lookups by digest each server ran). A lagging standby is made with
//! `pg_wal_replay_pause()`: a revoked credential must never be answered
//! active because of it.

use std::time::Duration;

use identity::storage::SecretUrl;
use sqlx::{Connection as _, PgConnection};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::support::{
    TestApp, TestDatabase, bearer, pb, plaintext,
    postgres::{Cluster, Standby},
};

/// A primary and its standby, with a fresh database on both, and a
/// connection to each.
struct Pair {
    _cluster: Cluster,
    standby: Standby,
    url: String,
    read_url: String,
    primary: PgConnection,
    replica: PgConnection,
}

impl Pair {
    async fn start() -> Self {
        let cluster = Cluster::start_with("shared_preload_libraries = 'pg_stat_statements'\n");
        let url = cluster.fresh_database_url().await;
        let mut primary = PgConnection::connect(&url)
            .await
            .expect("connect to the primary");
        sqlx::query("CREATE EXTENSION pg_stat_statements")
            .execute(&mut primary)
            .await
            .expect("create pg_stat_statements");
        let standby = cluster.standby();
        let read_url = standby.url_of(&url);
        let replica = connect_when_replayed(&read_url).await;
        Self {
            _cluster: cluster,
            standby,
            url,
            read_url,
            primary,
            replica,
        }
    }

    /// A server on the primary, reading from the standby.
    async fn server(&self) -> TestApp {
        let read_url = self.read_url.clone();
        TestApp::spawn_on(
            TestDatabase::at(self.url.clone()),
            None,
            move |config| config.pool.read_url = Some(SecretUrl::new(read_url)),
            plaintext,
        )
        .await
    }

    /// Another server on the same databases, sharing `app`'s operator.
    async fn another(&self, app: &TestApp) -> TestApp {
        let read_url = self.read_url.clone();
        app.replica_with(move |config| config.pool.read_url = Some(SecretUrl::new(read_url)))
            .await
    }

    /// A server as [`Self::server`] (sharing `app`'s operator, if given)
    /// whose change channel runs through a relay the test can stall.
    async fn stallable(&self, app: Option<&TestApp>) -> (TestApp, Stall) {
        let stall = Stall::to(&self.url).await;
        let read_url = self.read_url.clone();
        let listen_url = stall.url_of(&self.url);
        let adjust = move |config: &mut identity::config::Config| {
            config.pool.read_url = Some(SecretUrl::new(read_url));
            config.pool.listen_url = Some(SecretUrl::new(listen_url));
        };
        let server = match app {
            Some(app) => app.replica_with(adjust).await,
            None => {
                TestApp::spawn_on(TestDatabase::at(self.url.clone()), None, adjust, plaintext).await
            }
        };
        (server, stall)
    }

    /// Waits until the standby has replayed everything the primary has
    /// written so far.
    async fn caught_up(&mut self) {
        let written: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut self.primary)
            .await
            .expect("the primary's position");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let replayed: bool =
                sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn")
                    .bind(&written)
                    .fetch_one(&mut self.replica)
                    .await
                    .expect("the standby's position");
            if replayed {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby never caught up"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn pause_replay(&mut self) {
        sqlx::query("SELECT pg_wal_replay_pause()")
            .execute(&mut self.replica)
            .await
            .expect("pause replay");
    }

    async fn resume_replay(&mut self) {
        sqlx::query("SELECT pg_wal_replay_resume()")
            .execute(&mut self.replica)
            .await
            .expect("resume replay");
    }

    /// Lookups by digest the standby has run.
    async fn standby_lookups(&mut self) -> i64 {
        lookups(&mut self.replica, "%.digest = $1").await
    }

    /// Lookups by digest the primary has run.
    async fn primary_lookups(&mut self) -> i64 {
        lookups(&mut self.primary, "%.digest = $1").await
    }

    /// Waits until a verification on `app` (its cache emptied first) is
    /// answered by the standby alone: its watermark is known and current
    /// and the standby has replayed it.
    async fn until_standby_serves(&mut self, app: &TestApp, secret: &str) {
        self.caught_up().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (standby, primary) = (self.standby_lookups().await, self.primary_lookups().await);
            app.identity.cache().clear();
            assert!(app.verify(secret, &[]).await.active);
            if self.standby_lookups().await > standby && self.primary_lookups().await == primary {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the standby never answered a verification"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A TCP relay to the primary for a server's change channel
/// (`IDENTITY_DATABASE_LISTEN_URL`) that the test can stall: while stalled
/// it passes nothing back to the server, so the server hears no
/// announcement and its watermark moves only by its own writes.
struct Stall {
    port: u16,
    stalled: tokio::sync::watch::Sender<bool>,
}

impl Stall {
    async fn to(url: &str) -> Self {
        let target = url
            .rsplit_once(':')
            .and_then(|(_, rest)| rest.split_once('/'))
            .map(|(port, _)| port.to_owned())
            .expect("a postgres://user@127.0.0.1:port/db URL");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().expect("relay address").port();
        let (stalled, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) =
                    tokio::net::TcpStream::connect(format!("127.0.0.1:{target}")).await
                else {
                    continue;
                };
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                });
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                    let mut buffer = vec![0u8; 16 * 1024];
                    loop {
                        let Ok(n) = server_read.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 || watch.wait_for(|stalled| !*stalled).await.is_err() {
                            return;
                        }
                        if client_write.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Self { port, stalled }
    }

    /// `url` through the relay.
    fn url_of(&self, url: &str) -> String {
        let (_, rest) = url.rsplit_once(':').expect("a URL with a port");
        let (_, database) = rest.split_once('/').expect("a database in the URL");
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }
}

/// Connects to the standby once it has replayed the new database.
async fn connect_when_replayed(url: &str) -> PgConnection {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match PgConnection::connect(url).await {
            Ok(conn) => return conn,
            Err(err) => assert!(
                tokio::time::Instant::now() < deadline,
                "cannot connect to the standby: {err}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The calls of the statements like `pattern` on `conn`'s server.
async fn lookups(conn: &mut PgConnection, pattern: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT CAST(COALESCE(sum(calls), 0) AS BIGINT) FROM pg_stat_statements \
         WHERE query LIKE $1",
    )
    .bind(pattern)
    .fetch_one(conn)
    .await
    .expect("pg_stat_statements")
}

/// Revokes `token_id` as `app`'s operator.
async fn revoke(app: &TestApp, token_id: &str) {
    app.tokens()
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: token_id.into(),
            },
            &app.operator_token,
        ))
        .await
        .expect("revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verifications_are_served_by_a_fresh_standby() {
    let mut pair = Pair::start().await;
    let app = pair.server().await;
    let robot = app.robot("ci").await;
    let mut secrets = Vec::new();
    for i in 0..20 {
        let (_, secret) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("t{i}"),
                &[],
            )
            .await;
        secrets.push(secret);
    }
    // Each miss is read from the standby, once it has replayed the
    // watermark: a miss that finds it behind (a write of the last-use
    // recorder, or the heartbeats' batches moving the watermark on, on a
    // busy machine) reads the primary, and is tried again here.
    for secret in &secrets {
        pair.until_standby_serves(&app, secret).await;
    }
}

/// A revocation is honoured at once on the server that made it, with the
/// standby paused before it: the call's own write moves the watermark
/// before it returns. The server's change channel is stalled meanwhile, so
/// that its own announcement cannot do it instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_honoured_at_once_where_it_was_made_with_replay_paused() {
    let mut pair = Pair::start().await;
    let (app, stall) = pair.stallable(None).await;
    let robot = app.robot("ci").await;
    for round in 0..3 {
        let (token, secret) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("t{round}"),
                &[],
            )
            .await;
        pair.resume_replay().await;
        stall.stall(false);
        pair.until_standby_serves(&app, &secret).await;
        stall.stall(true);
        pair.pause_replay().await;
        revoke(&app, &token.token_id).await;
        let verdict = app.verify(&secret, &[]).await;
        assert!(
            !verdict.active,
            "round {round}: a revoked token answered active"
        );
        assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    }
    stall.stall(false);
}

/// A revocation made on another server: once its announcement has
/// arrived, the standby (paused before it) is never trusted with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_by_another_server_is_never_undone_by_a_paused_standby() {
    let mut pair = Pair::start().await;
    let a = pair.server().await;
    let b = pair.another(&a).await;
    let robot = a.robot("ci").await;
    let (token, secret) = a
        .token(&a.operator_token, &robot.account_id, "t", &[])
        .await;
    pair.until_standby_serves(&b, &secret).await;
    pair.pause_replay().await;
    revoke(&a, &token.token_id).await;
    // Until the announcement arrives b may answer from its cache; after,
    // never active again, however often its cache is emptied.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b.verify(&secret, &[]).await.active {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revocation never reached the other server"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for _ in 0..20 {
        b.identity.cache().clear();
        let verdict = b.verify(&secret, &[]).await;
        assert!(!verdict.active, "the paused standby undid a revocation");
        assert_eq!(verdict.reason, pb::InactiveReason::Revoked as i32);
    }
}

/// A server started after a revocation, with the standby paused before
/// it: its watermark starts at the primary's position, never behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_after_a_revocation_is_never_fooled_by_a_paused_standby() {
    let mut pair = Pair::start().await;
    let a = pair.server().await;
    let robot = a.robot("ci").await;
    let (token, secret) = a
        .token(&a.operator_token, &robot.account_id, "t", &[])
        .await;
    pair.until_standby_serves(&a, &secret).await;
    pair.pause_replay().await;
    revoke(&a, &token.token_id).await;
    let c = pair.another(&a).await;
    for _ in 0..20 {
        c.identity.cache().clear();
        let verdict = c.verify(&secret, &[]).await;
        assert!(!verdict.active, "a new server trusted a paused standby");
    }
}

/// A token the standby does not know yet (created while it is paused) is
/// looked up on the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_created_while_the_standby_is_paused_is_verifiable() {
    let mut pair = Pair::start().await;
    let a = pair.server().await;
    // b's change channel is stalled once the standby serves it: its
    // watermark then stays where the paused standby is, and only the
    // standby's "unknown" sends the lookup to the primary.
    let (b, stall) = pair.stallable(Some(&a)).await;
    let robot = a.robot("ci").await;
    let (_, probe) = a
        .token(&a.operator_token, &robot.account_id, "probe", &[])
        .await;
    pair.until_standby_serves(&b, &probe).await;
    stall.stall(true);
    pair.pause_replay().await;
    let (_, secret) = a
        .token(&a.operator_token, &robot.account_id, "new", &[])
        .await;
    b.identity.cache().clear();
    assert!(b.verify(&secret, &[]).await.active);
    stall.stall(false);
}

/// A limited-use token is read from the primary on every use, whatever the
/// standby knows, and counts exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limited_use_tokens_are_read_from_the_primary_and_count_exactly() {
    let mut pair = Pair::start().await;
    let app = pair.server().await;
    let robot = app.robot("ci").await;
    let (_, probe) = app
        .token(&app.operator_token, &robot.account_id, "probe", &[])
        .await;
    let limited = app
        .tokens()
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: robot.account_id.clone(),
                name: "three".into(),
                max_uses: Some(3),
                ..Default::default()
            },
            &app.operator_token,
        ))
        .await
        .expect("create")
        .into_inner()
        .secret;
    pair.until_standby_serves(&app, &probe).await;
    let primary = pair.primary_lookups().await;
    let mut active = 0;
    // Three uses, then exhausted (a verdict that is cached: no fifth read).
    for _ in 0..4 {
        if app.verify(&limited, &[]).await.active {
            active += 1;
        }
    }
    assert_eq!(active, 3, "a token with 3 uses was active {active} times");
    assert_eq!(
        pair.primary_lookups().await - primary,
        4,
        "a limited-use token was not read from the primary on every use"
    );
}

/// With the standby down every call is answered from the primary, and the
/// server stays SERVING.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standby_down_costs_no_call() {
    let mut pair = Pair::start().await;
    let app = pair.server().await;
    let robot = app.robot("ci").await;
    let (_, secret) = app
        .token(&app.operator_token, &robot.account_id, "t", &[])
        .await;
    pair.until_standby_serves(&app, &secret).await;
    pair.standby.stop();
    for _ in 0..5 {
        app.identity.cache().clear();
        assert!(app.verify(&secret, &[]).await.active);
    }
    let status = HealthClient::new(app.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("health")
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

/// SQLite has no replicas: a read URL beside it is refused at start-up,
/// by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_url_beside_sqlite_is_refused() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let url = format!("sqlite:{}", dir.path().join("identity.db").display());
    let mut command = crate::support::binary::identity_command(&url);
    command.arg("serve").env(
        "IDENTITY_DATABASE_READ_URL",
        "postgres://identity@standby.internal/identity",
    );
    let finished = crate::support::binary::run(command).await;
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains("IDENTITY_DATABASE_READ_URL")
            && finished.stderr.contains("PostgreSQL"),
        "{}",
        finished.stderr
    );
}

/// The standby's lookups carry the digest in their text: a trace-logging
/// server that reads from the standby writes no digest (nor secret) to
/// its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_digest_read_on_the_standby_reaches_the_logs() {
    use crate::support::binary::{Secrets, Server, bootstrap_operator, printed_token};
    use crate::support::pb::{
        accounts_service_client::AccountsServiceClient, tokens_service_client::TokensServiceClient,
    };
    let mut pair = Pair::start().await;
    let trace = [("IDENTITY_LOG", "trace")];
    let operator = printed_token(&bootstrap_operator(&pair.url, "ops", &trace).await);
    let server = Server::start(
        &pair.url,
        &[
            ("IDENTITY_LOG", "trace"),
            ("IDENTITY_CACHE_ENTRIES", "0"),
            ("IDENTITY_DATABASE_READ_URL", pair.read_url.as_str()),
        ],
    )
    .await;
    let channel = server.channel().await;
    let ops = AccountsServiceClient::new(channel.clone())
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &operator,
        ))
        .await
        .expect("get ops")
        .into_inner()
        .account
        .expect("account");
    let mut tokens = TokensServiceClient::new(channel);
    let verifier = tokens
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: ops.account_id.clone(),
                name: "verifier".into(),
                scopes: vec!["tokens:verify".into()],
                ..Default::default()
            },
            &operator,
        ))
        .await
        .expect("create a verifier")
        .into_inner()
        .secret;
    pair.caught_up().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while pair.standby_lookups().await == 0 {
        let verdict = tokens
            .verify_token(bearer(
                pb::VerifyTokenRequest {
                    token: operator.clone(),
                    ..Default::default()
                },
                &verifier,
            ))
            .await
            .expect("verify")
            .into_inner();
        assert!(verdict.active);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never ran a lookup"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finished = server.terminate().await;
    let mut secrets = Secrets::default();
    secrets.token("operator token", &operator);
    secrets.token("verifier token", &verifier);
    secrets.assert_absent_from(&[("the server's log", &finished.stderr)]);
}

/// A server whose DATABASE_URL reaches a standby (a mistake, or a demoted
/// primary behind a proxy that has not moved yet) says NOT_SERVING: every
/// write would fail there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_as_the_database_url_is_not_serving() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mut pair = Pair::start().await;
    // Migrated on the primary, replayed on the standby.
    let app = pair.server().await;
    pair.caught_up().await;
    let mut command = crate::support::binary::identity_command(&pair.read_url);
    command
        .env("IDENTITY_LISTEN_ADDR", "127.0.0.1:0")
        .env("IDENTITY_MIGRATE", "false")
        .env("IDENTITY_WEB_ADDR", "off")
        .arg("serve");
    let server = crate::support::binary::Server::start_command(command).await;
    let mut health = HealthClient::new(server.channel().await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = health
            .check(HealthCheckRequest::default())
            .await
            .map(|r| r.into_inner().status);
        if matches!(status, Ok(s) if s == ServingStatus::NotServing as i32) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a server on a standby still says {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(health);
    server.terminate().await;
    app.stop().await;
}

/// A standby that stops streaming from the primary (its WAL receiver off,
/// as one left on the old timeline after a failover is) is not used, even
/// with everything replayed: after a failover its positions, from another
/// timeline, prove nothing about the new primary's changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_that_does_not_stream_the_primarys_timeline_is_not_used() {
    let mut pair = Pair::start().await;
    let app = pair.server().await;
    let robot = app.robot("ci").await;
    let (_, secret) = app
        .token(&app.operator_token, &robot.account_id, "ci", &[])
        .await;
    pair.until_standby_serves(&app, &secret).await;
    for statement in [
        "ALTER SYSTEM SET primary_conninfo = ''",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(statement)
            .execute(&mut pair.replica)
            .await
            .expect(statement);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let streaming: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
        )
        .fetch_one(&mut pair.replica)
        .await
        .expect("read pg_stat_wal_receiver");
        if streaming == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby kept streaming"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..5 {
        let (standby, primary) = (pair.standby_lookups().await, pair.primary_lookups().await);
        app.identity.cache().clear();
        assert!(app.verify(&secret, &[]).await.active);
        assert_eq!(
            pair.standby_lookups().await,
            standby,
            "a standby not streaming served a verification"
        );
        assert!(
            pair.primary_lookups().await > primary,
            "the primary answered"
        );
    }
    app.stop().await;
}
