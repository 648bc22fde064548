//! A database that is down when a replica starts, or goes down while it
//! serves: the replica starts anyway and reports NOT_SERVING, keeps trying
//! (migrating once the database answers), and meanwhile refuses calls at
//! once with UNAVAILABLE instead of letting each wait out the pool's
//! acquire timeout. Both run on a PostgreSQL [`Cluster`] of their own.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use identity::app::LIVENESS_SERVICE;
use tonic::{Code, Request, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    support::binary::{Server, bootstrap_operator, printed_token},
    support::{
        TestApp, TestDatabase, bearer,
        pb::{self, accounts_service_client::AccountsServiceClient},
        postgres::{Cluster, StopMode},
    },
};

/// How long health may take to follow the database.
const HEALTH_FOLLOWS_WITHIN: Duration = Duration::from_secs(30);

/// The status `service` reports.
async fn health_of(channel: &Channel, service: &str) -> ServingStatus {
    let mut request = Request::new(HealthCheckRequest {
        service: service.into(),
    });
    request.set_timeout(Duration::from_secs(5));
    let status = HealthClient::new(channel.clone())
        .check(request)
        .await
        .unwrap_or_else(|e| panic!("health check of {service:?}: {e:?}"))
        .into_inner()
        .status;
    ServingStatus::try_from(status).expect("a known serving status")
}

/// Waits until the overall status is `expected`.
async fn await_health(channel: &Channel, expected: ServingStatus) {
    let started = Instant::now();
    while health_of(channel, "").await != expected {
        assert!(
            started.elapsed() < HEALTH_FOLLOWS_WITHIN,
            "health did not become {expected:?} within {HEALTH_FOLLOWS_WITHIN:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `f` on `cluster` off the runtime's worker threads (`pg_ctl` blocks).
async fn on_cluster(cluster: &Arc<Cluster>, f: impl FnOnce(&Cluster) + Send + 'static) {
    let cluster = Arc::clone(cluster);
    tokio::task::spawn_blocking(move || f(&cluster))
        .await
        .expect("a cluster operation panicked");
}

/// `ListAccounts` as `token`: its outcome.
async fn list_accounts(channel: &Channel, token: &str) -> Result<(), tonic::Status> {
    AccountsServiceClient::new(channel.clone())
        .list_accounts(bearer(pb::ListAccountsRequest::default(), token))
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_postgres_is_down_serves_once_it_is_up() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("start a cluster"),
    );
    // An empty database: the replica must migrate it once it can.
    let url = cluster.fresh_database_url().await;
    on_cluster(&cluster, |c| c.stop(StopMode::Fast)).await;

    let server = Server::start(&url, &[("IDENTITY_DB_ACQUIRE_TIMEOUT", "1s")]).await;
    let channel = server.channel().await;
    assert_eq!(health_of(&channel, "").await, ServingStatus::NotServing);
    assert_eq!(
        health_of(&channel, LIVENESS_SERVICE).await,
        ServingStatus::Serving,
        "liveness must not follow the database"
    );
    let refused = list_accounts(&channel, "idpat_not_even_checked")
        .await
        .expect_err("no database");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    on_cluster(&cluster, Cluster::resume).await;
    await_health(&channel, ServingStatus::Serving).await;
    // The schema is there (the replica migrated it), and calls work.
    let operator =
        printed_token(&bootstrap_operator(&url, "ops", &[("IDENTITY_MIGRATE", "false")]).await);
    list_accounts(&channel, &operator)
        .await
        .expect("calls work once the database is up");
    let finished = server.terminate().await;
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("starting NOT_SERVING"),
        "{}",
        finished.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_fail_fast_while_the_database_is_unreachable() {
    let cluster = Arc::new(
        tokio::task::spawn_blocking(Cluster::start)
            .await
            .expect("start a cluster"),
    );
    let url = cluster.fresh_database_url().await;
    // A long acquire timeout: without failing fast, each call would wait
    // all of it for a connection that cannot be opened.
    let acquire_timeout = Duration::from_secs(10);
    let app = TestApp::spawn_on(
        TestDatabase::at(url),
        None,
        |config| {
            config.health_interval = Duration::from_millis(100);
            config.pool.acquire_timeout = acquire_timeout;
            config.request_timeout = Duration::from_secs(60);
        },
        crate::support::plaintext,
    )
    .await;
    list_accounts(&app.channel, &app.operator_token)
        .await
        .expect("calls work while the database is up");

    on_cluster(&cluster, |c| c.stop(StopMode::Fast)).await;
    await_health(&app.channel, ServingStatus::NotServing).await;
    for _ in 0..3 {
        let started = Instant::now();
        let refused = list_accounts(&app.channel, &app.operator_token)
            .await
            .expect_err("the database is down");
        let took = started.elapsed();
        assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
        assert!(
            took < acquire_timeout,
            "the call waited {took:?}, the acquire timeout is {acquire_timeout:?}"
        );
    }
    // Health checks are still answered.
    assert_eq!(
        health_of(&app.channel, LIVENESS_SERVICE).await,
        ServingStatus::Serving
    );

    on_cluster(&cluster, Cluster::resume).await;
    await_health(&app.channel, ServingStatus::Serving).await;
    let started = Instant::now();
    loop {
        match list_accounts(&app.channel, &app.operator_token).await {
            Ok(()) => break,
            Err(status) => assert!(
                started.elapsed() < HEALTH_FOLLOWS_WITHIN,
                "calls still fail after the database came back: {status:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    app.stop().await;
}
