//! Retention: the background job deletes what has been dead longer than its
//! retention (sessions, tokens whose whole rotation family is dead, idle
//! sign-in counters, old audit events) and keeps everything that still
//! works; on PostgreSQL one replica at a time purges, under an advisory
//! lock.
//!
//! No test waits for time to pass: the retention is a millisecond and the
//! job runs every few milliseconds, so a test polls, with a bounded
//! deadline, until the rows it expects gone are gone.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    time::{Duration, Instant},
};

use identity::domain::retention::RetentionSettings;
use sqlx::Connection as _;
use tonic::Code;

use crate::{
    observability::scrape,
    support::binary::{Server, bootstrap_operator, printed_token},
    support::{Backend, PASSWORD, TestApp, bearer, pb, sign_in},
};

/// How long a purge the test waits for may take to happen.
const PURGED_WITHIN: Duration = Duration::from_secs(30);

/// Rows of a one-column text query on the database at `url`.
pub(crate) async fn column(url: &str, query: &str) -> BTreeSet<String> {
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query_scalar(query)
            .fetch_all(&mut conn)
            .await
            .expect(query)
            .into_iter()
            .collect()
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_scalar(query)
            .fetch_all(&mut conn)
            .await
            .expect(query)
            .into_iter()
            .collect()
    }
}

/// `SELECT count(*) FROM <table>` on the database at `url`.
pub(crate) async fn count(url: &str, table: &str) -> i64 {
    let query = format!("SELECT count(*) FROM {table}");
    if url.starts_with("sqlite:") {
        let mut conn = sqlx::SqliteConnection::connect(url).await.expect("open");
        sqlx::query_scalar(&query)
            .fetch_one(&mut conn)
            .await
            .expect("count")
    } else {
        let mut conn = sqlx::PgConnection::connect(url).await.expect("connect");
        sqlx::query_scalar(&query)
            .fetch_one(&mut conn)
            .await
            .expect("count")
    }
}

/// Polls `check` until it holds, failing with `what` after [`PURGED_WITHIN`].
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(()) => return,
            Err(state) => assert!(
                start.elapsed() < PURGED_WITHIN,
                "{what} within {PURGED_WITHIN:?}; now: {state}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rotates the token `id` with its own secret: the successor's id and
/// secret.
async fn rotate(app: &TestApp, id: &str, secret: &str) -> Result<(String, String), tonic::Status> {
    app.tokens()
        .rotate_token(bearer(
            pb::RotateTokenRequest {
                token_id: id.to_owned(),
            },
            secret,
        ))
        .await
        .map(|answer| {
            let answer = answer.into_inner();
            (answer.token.expect("token").token_id, answer.secret)
        })
}

async fn dead_rows_are_purged_and_live_ones_kept_on(backend: Backend) {
    let app = TestApp::spawn_with(backend, |config| {
        config.retention = RetentionSettings {
            credentials: Some(Duration::from_millis(1)),
            audit: Some(Duration::from_millis(1)),
            interval: Duration::from_millis(20),
            // Several batches per kind.
            batch: 2,
        };
        config.identity.sign_in_throttle.address_memory = Duration::from_millis(1);
    })
    .await;
    let url = app.db.url.clone();

    // Sessions: one live, two signed out.
    let (_alice, live_session) = app.person("alice").await;
    for _ in 0..2 {
        let session = sign_in(&app, "alice", PASSWORD).await.expect("sign in");
        app.accounts()
            .sign_out(bearer(pb::SignOutRequest {}, &session))
            .await
            .expect("sign out");
    }
    // Tokens: one live, three revoked, and a rotation family whose first
    // token is revoked (rotated out) but whose successor is live.
    let robot = app.robot("bot").await;
    let (live, live_secret) = app
        .token(&app.operator_token, &robot.account_id, "live", &[])
        .await;
    for n in 0..3 {
        let (dead, _) = app
            .token(
                &app.operator_token,
                &robot.account_id,
                &format!("dead{n}"),
                &[],
            )
            .await;
        app.tokens()
            .revoke_token(bearer(
                pb::RevokeTokenRequest {
                    token_id: dead.token_id,
                },
                &app.operator_token,
            ))
            .await
            .expect("revoke");
    }
    let (first, first_secret) = app
        .token(
            &app.operator_token,
            &robot.account_id,
            "rotating",
            &["tokens:write"],
        )
        .await;
    let (second, _second_secret) = rotate(&app, &first.token_id, &first_secret)
        .await
        .expect("rotate");
    // Sign-in counters: a made-up username and the test's address.
    let refused = sign_in(&app, "nobody-at-all", "not the password").await;
    assert_eq!(
        refused.expect_err("no such account").code(),
        Code::Unauthenticated
    );
    // (Whether these rows were written is not checked here: the job may
    // already have purged them. The metrics at the end show it purged each
    // kind.)

    let kept: BTreeSet<String> = [
        live.token_id.clone(),
        first.token_id.clone(),
        second.clone(),
        // The operator's own token, from the harness.
    ]
    .into_iter()
    .collect();
    eventually("dead sessions, tokens, counters and events are purged", || {
        let url = url.clone();
        let kept = kept.clone();
        async move {
            let tokens = column(&url, "SELECT token_id FROM tokens").await;
            let sessions = count(&url, "sessions").await;
            let counters = count(&url, "sign_in_throttle").await;
            let events = count(&url, "audit_events").await;
            // The operator's token is live too: one more than `kept`.
            if tokens.len() == kept.len() + 1
                && kept.is_subset(&tokens)
                && sessions == 1
                && counters == 0
                && events == 0
            {
                Ok(())
            } else {
                Err(format!(
                    "tokens {tokens:?}, sessions {sessions}, counters {counters}, events {events}"
                ))
            }
        }
    })
    .await;

    // What is kept still works.
    assert!(app.verify(&live_secret, &[]).await.active, "the live token");
    app.accounts()
        .list_accounts(bearer(pb::ListAccountsRequest::default(), &live_session))
        .await
        .map(drop)
        .or_else(|status| {
            // A person may not list accounts: what matters is that the
            // session authenticated.
            if status.code() == Code::PermissionDenied {
                Ok(())
            } else {
                Err(status)
            }
        })
        .expect("the live session still authenticates");
    // The rotated-out token was kept because its family lives: presenting
    // it is still detected as reuse, and revokes the family.
    let reused = rotate(&app, &first.token_id, &first_secret)
        .await
        .expect_err("a rotated-out secret");
    assert_eq!(reused.code(), Code::Unauthenticated, "{reused:?}");
    // Now the whole family is dead, and goes.
    eventually("a dead family is purged", || {
        let url = url.clone();
        let family = [first.token_id.clone(), second.clone()];
        async move {
            let tokens = column(&url, "SELECT token_id FROM tokens").await;
            if family.iter().any(|id| tokens.contains(id)) {
                Err(format!("tokens {tokens:?}"))
            } else {
                Ok(())
            }
        }
    })
    .await;
    assert!(app.verify(&live_secret, &[]).await.active, "the live token");

    let metrics = scrape(app.metrics_addr.expect("metrics are on")).await;
    for kind in ["sessions", "tokens", "sign_in_throttle", "audit_events"] {
        let series = format!("identity_retention_purged_total{{kind=\"{kind}\"}}");
        assert!(
            metric(&metrics, &series) > 0.0,
            "{series} not counted:\n{metrics}"
        );
    }
    app.stop().await;
}

mod dead_rows_are_purged_and_live_ones_kept {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        dead_rows_are_purged_and_live_ones_kept_on(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        dead_rows_are_purged_and_live_ones_kept_on(Backend::Postgres).await;
    }
}

/// The value of the series `series` (name and labels, as printed) in a
/// Prometheus text scrape; 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The advisory lock key of the retention job (`storage::postgres`).
const RETENTION_LOCK: i64 = 0x6964_5f72_6574_6e31;

/// Two replicas of the real binary on one PostgreSQL database: while the
/// retention lock is held elsewhere, neither purges (each run is skipped);
/// once it is free, the rows go, each deleted once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_purge_one_at_a_time_under_an_advisory_lock() {
    let url = crate::support::postgres::fresh_database_url().await;
    // Migrates, and writes audit events (the operator and its token).
    let _token = printed_token(&bootstrap_operator(&url, "ops", &[]).await);
    let events = count(&url, "audit_events").await;
    assert!(events > 0);

    let mut holder = sqlx::PgConnection::connect(&url).await.expect("connect");
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut holder)
        .await
        .expect("take the retention lock");
    let env = [
        ("IDENTITY_RETENTION", "1ms"),
        ("IDENTITY_AUDIT_RETENTION", "1ms"),
        ("IDENTITY_RETENTION_INTERVAL", "50ms"),
    ];
    let first = Server::start(&url, &env).await;
    let second = Server::start(&url, &env).await;
    let replicas: Vec<SocketAddr> = [&first, &second]
        .iter()
        .map(|server| server.metrics_addr.expect("metrics are on"))
        .collect();
    let skipped = "identity_retention_runs_total{outcome=\"skipped\"}";
    let purged = "identity_retention_purged_total{kind=\"audit_events\"}";
    eventually("both replicas skip runs while the lock is held", || {
        let replicas = replicas.clone();
        async move {
            let mut seen = Vec::new();
            for addr in replicas {
                seen.push(metric(&scrape(addr).await, skipped));
            }
            if seen.iter().all(|&n| n >= 2.0) {
                Ok(())
            } else {
                Err(format!("skipped runs {seen:?}"))
            }
        }
    })
    .await;
    assert_eq!(
        count(&url, "audit_events").await,
        events,
        "a replica purged while another session held the retention lock"
    );
    for &addr in &replicas {
        assert_eq!(metric(&scrape(addr).await, purged), 0.0);
    }

    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(RETENTION_LOCK)
        .execute(&mut holder)
        .await
        .expect("release the retention lock");
    eventually("the events are purged once the lock is free", || {
        let url = url.clone();
        async move {
            match count(&url, "audit_events").await {
                0 => Ok(()),
                left => Err(format!("{left} events left")),
            }
        }
    })
    .await;
    let mut total = 0.0;
    for &addr in &replicas {
        total += metric(&scrape(addr).await, purged);
    }
    assert_eq!(total, events as f64, "each event is deleted exactly once");
    for server in [first, second] {
        let finished = server.terminate().await;
        assert!(finished.status.success(), "{}", finished.stderr);
        assert!(
            finished.stderr.contains("retention: "),
            "no log line per run:\n{}",
            finished.stderr
        );
    }
}
