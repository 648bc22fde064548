//! The real binary behind a real PgBouncer in transaction mode (README,
//! "Connection poolers"): `DATABASE_URL` at the pooler with
//! `IDENTITY_DATABASE_STATEMENT_CACHE=off`, the change channel, migrations
//! and the retention lock on `IDENTITY_DATABASE_LISTEN_URL` (direct). The
//! servers are processes of their own: the statement cache setting is the
//! process's (`storage::postgres`), and must not leak into the other tests.

use std::time::Duration;

use sqlx::Connection as _;
use tonic::{Code, Status, transport::Channel};

use crate::support::{
    PASSWORD, bearer,
    binary::{Server, bootstrap_operator, printed_token},
    pb,
    pb::{
        accounts_service_client::AccountsServiceClient, tokens_service_client::TokensServiceClient,
    },
    pgbouncer::PgBouncer,
    postgres::fresh_database_url,
};

fn accounts(channel: &Channel) -> AccountsServiceClient<Channel> {
    AccountsServiceClient::new(channel.clone())
}

fn tokens(channel: &Channel) -> TokensServiceClient<Channel> {
    TokensServiceClient::new(channel.clone())
}

async fn create_account(
    channel: &Channel,
    operator: &str,
    username: &str,
    kind: pb::AccountKind,
) -> Result<pb::Account, Status> {
    let password = if kind == pb::AccountKind::Person {
        PASSWORD.to_owned()
    } else {
        String::new()
    };
    Ok(accounts(channel)
        .create_account(bearer(
            pb::CreateAccountRequest {
                username: username.into(),
                password,
                email: format!("{username}@example.com"),
                kind: kind as i32,
                role: 0,
            },
            operator,
        ))
        .await?
        .into_inner()
        .account
        .expect("account"))
}

async fn create_token(
    channel: &Channel,
    creator: &str,
    account_id: &str,
    name: &str,
    scopes: &[&str],
    max_uses: Option<i64>,
) -> (pb::Token, String) {
    let created = tokens(channel)
        .create_token(bearer(
            pb::CreateTokenRequest {
                account_id: account_id.into(),
                name: name.into(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
                max_uses,
                ..Default::default()
            },
            creator,
        ))
        .await
        .expect("create a token")
        .into_inner();
    (created.token.expect("token"), created.secret)
}

async fn verify(channel: &Channel, verifier: &str, secret: &str) -> pb::VerifyTokenResponse {
    tokens(channel)
        .verify_token(bearer(
            pb::VerifyTokenRequest {
                token: secret.into(),
                ..Default::default()
            },
            verifier,
        ))
        .await
        .expect("verify")
        .into_inner()
}

/// Polls until `check` holds, or fails after a generous bound (a
/// correctness check, not a latency measurement).
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Two replicas, both with `DATABASE_URL` at a transaction-mode PgBouncer
/// of two server connections (so that the replicas' statements share and
/// hop between them) and the change channel direct: sign-in, tokens
/// created, verified, listed, rotated and revoked, a limited-use token
/// counted exactly under concurrent verifications on both, a revocation on
/// one reaching the other, and the retention purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_behind_a_transaction_mode_pgbouncer_serve_every_call() {
    let direct = fresh_database_url().await;
    let bouncer = PgBouncer::transaction_mode(&direct, 2).await;
    let pooled = bouncer.url_for(&direct);
    let env = [
        ("IDENTITY_DATABASE_STATEMENT_CACHE", "off"),
        ("IDENTITY_DATABASE_LISTEN_URL", direct.as_str()),
        ("IDENTITY_RETENTION", "1ms"),
        ("IDENTITY_RETENTION_INTERVAL", "50ms"),
    ];
    // Migrates (through the listen URL) and bootstraps through the pooler.
    let operator = printed_token(&bootstrap_operator(&pooled, "ops", &env).await);
    let a = Server::start(&pooled, &env).await;
    let b = Server::start(&pooled, &env).await;
    let (ca, cb) = (a.channel().await, b.channel().await);

    let ops = accounts(&ca)
        .get_account(bearer(
            pb::GetAccountRequest {
                lookup: Some(pb::get_account_request::Lookup::Username("ops".into())),
            },
            &operator,
        ))
        .await
        .expect("look up the operator")
        .into_inner()
        .account
        .expect("account");
    let (_, verifier) = create_token(
        &ca,
        &operator,
        &ops.account_id,
        "verifier",
        &["tokens:verify"],
        None,
    )
    .await;

    // Sign-in, and the session's own listing.
    let alice = create_account(&ca, &operator, "alice", pb::AccountKind::Person)
        .await
        .expect("create alice");
    let session = accounts(&cb)
        .sign_in(pb::SignInRequest {
            username: "alice".into(),
            password: PASSWORD.into(),
        })
        .await
        .expect("sign in through the pooler")
        .into_inner()
        .session_token;
    let (token, secret) = create_token(
        &ca,
        &operator,
        &alice.account_id,
        "ci",
        &["repo:read"],
        None,
    )
    .await;
    for channel in [&ca, &cb] {
        assert!(verify(channel, &verifier, &secret).await.active);
    }
    let listed = tokens(&cb)
        .list_tokens(bearer(
            pb::ListTokensRequest {
                account_id: alice.account_id.clone(),
                page_size: 10,
                ..Default::default()
            },
            &session,
        ))
        .await
        .expect("list tokens through the pooler")
        .into_inner()
        .tokens;
    assert_eq!(
        listed
            .iter()
            .map(|t| t.token_id.as_str())
            .collect::<Vec<_>>(),
        [token.token_id.as_str()]
    );

    // Rotation: the new secret works.
    let rotated = tokens(&ca)
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: token.token_id.clone(),
            },
            &session,
        ))
        .await
        .expect("rotate through the pooler")
        .into_inner();
    let new = rotated.token.expect("the new token");
    assert!(verify(&cb, &verifier, &rotated.secret).await.active);

    // A limited-use token, verified concurrently on both replicas: exactly
    // its uses are granted.
    let uses = 5;
    let (_, limited) = create_token(
        &ca,
        &operator,
        &alice.account_id,
        "limited",
        &[],
        Some(uses),
    )
    .await;
    let mut calls = Vec::new();
    for i in 0..4 * uses {
        let channel = if i % 2 == 0 { ca.clone() } else { cb.clone() };
        let (verifier, limited) = (verifier.clone(), limited.clone());
        calls.push(tokio::spawn(async move {
            verify(&channel, &verifier, &limited).await.active
        }));
    }
    let mut granted = 0;
    for call in calls {
        if call.await.expect("a verification") {
            granted += 1;
        }
    }
    assert_eq!(granted, uses, "a limited-use token counted inexactly");

    // B holds the new token's verdict (it verified it above); a revocation
    // on A reaches it over the direct change channel.
    assert!(verify(&cb, &verifier, &rotated.secret).await.active);
    tokens(&ca)
        .revoke_token(bearer(
            pb::RevokeTokenRequest {
                token_id: new.token_id.clone(),
            },
            &operator,
        ))
        .await
        .expect("revoke through the pooler");
    until("the revocation reaches the other replica", || {
        let (cb, verifier, secret) = (cb.clone(), verifier.clone(), rotated.secret.clone());
        async move { !verify(&cb, &verifier, &secret).await.active }
    })
    .await;
    assert!(!verify(&ca, &verifier, &rotated.secret).await.active);

    // The retention purge (its lock on the listen URL) deletes the revoked
    // token's row.
    until("the revoked token is purged", || {
        let (direct, id) = (direct.clone(), new.token_id.clone());
        async move {
            let mut conn = sqlx::PgConnection::connect(&direct).await.expect("connect");
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM tokens WHERE token_id = $1")
                .bind(id)
                .fetch_one(&mut conn)
                .await
                .expect("count");
            left == 0
        }
    })
    .await;

    for server in [a, b] {
        let finished = server.terminate().await;
        assert!(finished.status.success(), "{}", finished.stderr);
        assert!(
            !finished.stderr.contains("prepared statement"),
            "a statement met a server connection that lacked it:\n{}",
            finished.stderr
        );
    }
}

/// Makes a replica's one pooled connection meet a second server connection:
/// a call on the server (parsing its statements on the pooler's only server
/// connection), then an outside client holding that server connection in an
/// open transaction, then the same call again, which the pooler must serve
/// on another. Returns the second call's outcome and the server's log.
async fn call_after_the_server_connection_changes(
    statement_cache: &str,
) -> (Result<(), Status>, String) {
    let direct = fresh_database_url().await;
    let operator = printed_token(&bootstrap_operator(&direct, "ops", &[]).await);
    let bouncer = PgBouncer::transaction_mode(&direct, 2).await;
    let pooled = bouncer.url_for(&direct);
    let env = [
        ("IDENTITY_DATABASE_STATEMENT_CACHE", statement_cache),
        ("IDENTITY_DATABASE_LISTEN_URL", direct.as_str()),
        ("IDENTITY_DB_MAX_CONNECTIONS", "1"),
        // One client connection in all: the lookups' held connections
        // would meet the pool's prepared statements on the pooler's server
        // connections before the sequence below arranges it.
        ("IDENTITY_DB_LOOKUP_CONNECTIONS", "0"),
    ];
    let server = Server::start(&pooled, &env).await;
    let channel = server.channel().await;
    create_account(&channel, &operator, "robot-1", pb::AccountKind::Robot)
        .await
        .expect("the first call");
    // The pooler's one server connection so far (the readiness probe's,
    // then the replica's) is idle: this transaction takes it and keeps it.
    let mut holder = sqlx::PgConnection::connect(&pooled).await.expect("connect");
    sqlx::raw_sql("BEGIN; SELECT 1")
        .execute(&mut holder)
        .await
        .expect("hold the server connection");
    let second = create_account(&channel, &operator, "robot-2", pb::AccountKind::Robot)
        .await
        .map(drop);
    sqlx::raw_sql("COMMIT")
        .execute(&mut holder)
        .await
        .expect("release it");
    let finished = server.terminate().await;
    (second, finished.stderr)
}

/// Without the fix: the statement cache on, through a transaction-mode
/// pooler, a call whose statements were prepared on one server connection
/// fails on the next, with the documented hint in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_cache_through_a_transaction_mode_pooler_fails_as_documented() {
    let (second, log) = call_after_the_server_connection_changes("on").await;
    let status = second.expect_err("a cached statement passed to another server connection");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert!(
        log.contains("IDENTITY_DATABASE_STATEMENT_CACHE=off"),
        "no hint in the log:\n{log}"
    );
}

/// With the statement cache off, the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_statement_cache_a_call_survives_a_change_of_server_connection() {
    let (second, log) = call_after_the_server_connection_changes("off").await;
    assert!(second.is_ok(), "{second:?}\n{log}");
}

/// The statement cache off without a listen URL is refused: LISTEN would go
/// through the pooler, and revocations would not reach this replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_statement_cache_off_requires_a_listen_url() {
    let direct = fresh_database_url().await;
    let mut command = crate::support::binary::identity_command(&direct);
    command
        .arg("migrate")
        .env("IDENTITY_DATABASE_STATEMENT_CACHE", "off");
    let finished = crate::support::binary::run(command).await;
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains("IDENTITY_DATABASE_LISTEN_URL"),
        "{}",
        finished.stderr
    );
}
