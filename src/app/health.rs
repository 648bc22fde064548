//! The health watcher: keeps the health service and the readiness gate in
//! step with the database (and this replica's clock against it).

use std::{sync::Arc, time::Duration};

use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    api::{
        layers::ready::Readiness,
        pb::{
            accounts_service_server::AccountsServiceServer,
            audit_service_server::AuditServiceServer, tokens_service_server::TokensServiceServer,
        },
        services::{accounts::AccountsApi, audit::AuditApi, tokens::TokensApi},
    },
    config::Config,
    storage::{self, Database, StorageError, Store},
};

/// The health service name whose status says only whether the process is
/// up and not shutting down, whatever the database's state: what a liveness
/// probe should ask, so that an orchestrator does not restart every replica
/// during a database outage (readiness asks for `""`, which follows the
/// database).
pub const LIVENESS_SERVICE: &str = "liveness";

/// What the health watcher keeps in step with the database.
pub(super) struct Watched {
    /// The database, to migrate or check it once it answers.
    pub(super) database: Database,
    /// Whether to migrate it (`IDENTITY_MIGRATE`) or only check its schema.
    pub(super) migrate: bool,
    /// Whether `build` has already migrated or checked it.
    pub(super) prepared: bool,
    /// The store, to probe.
    pub(super) store: Arc<dyn Store>,
    /// Set to whether the database answers and the clock is within bound.
    pub(super) readiness: Readiness,
    /// For redacting the database's secrets from logged errors.
    pub(super) config: Config,
}

/// Probes the store every `interval` and keeps the health service (and the
/// [`Readiness`] that makes calls fail fast) in step: SERVING while it
/// answers, NOT_SERVING while it does not. A probe that takes longer than
/// `patience` (the time a query may wait for a connection) counts as
/// unanswered, so a database that accepts connections but never replies, or
/// a pool whose connections are all stuck, cannot hold the status at
/// SERVING. Each probe also measures this replica's clock against the
/// database's (PostgreSQL): beyond `IDENTITY_MAX_CLOCK_SKEW` the status is
/// NOT_SERVING too, until the clock is back (see [`clock_skewed`]).
///
/// If the database could not be reached at start-up, it is first migrated
/// (or its schema checked) here, retried with back-off (from 100 ms,
/// doubling up to `interval`) until that succeeds; the status stays
/// NOT_SERVING until then. A schema this build cannot serve is logged as an
/// error and retried too, so that a replica started before `identity
/// migrate` ran becomes ready once it has.
pub(super) async fn watch_store(
    mut watched: Watched,
    health: HealthReporter,
    interval: Duration,
    patience: Duration,
) {
    let mut last = if watched.readiness.is_ready() {
        ServingStatus::Serving
    } else {
        ServingStatus::NotServing
    };
    // `build` has logged a clock out of bound already.
    let mut skewed = watched.prepared && !watched.readiness.is_ready();
    let bound = watched.config.max_clock_skew;
    let mut retry = interval.min(Duration::from_millis(100));
    let mut last_problem = String::new();
    loop {
        if watched.prepared {
            // Or sooner: at once when the database drops this replica's
            // connections (a failover), and more often while it is away,
            // so that health (and the readiness gate) follow it within
            // moments rather than a whole interval.
            let pause = if last == ServingStatus::NotServing {
                interval.min(RECHECK_WHILE_DOWN)
            } else {
                interval
            };
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = connection_lost(&watched.database) => {}
            }
        } else {
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(interval);
            match watched.database.prepare(watched.migrate).await {
                Ok(()) => {
                    watched.prepared = true;
                    tracing::info!(
                        migrate = watched.migrate,
                        "the database answers: schema ready"
                    );
                }
                Err(err) => {
                    let problem = watched.config.redact_database_secrets(&error_chain(&err));
                    if problem != last_problem {
                        if matches!(err, StorageError::Unavailable(_)) {
                            tracing::warn!(error = %problem, "the database still cannot be reached");
                        } else {
                            tracing::error!(
                                error = %problem,
                                "the database cannot be served yet; trying again"
                            );
                        }
                        last_problem = problem;
                    }
                    continue;
                }
            }
        }
        let answer = tokio::time::timeout(patience, async {
            watched.store.ping().await?;
            watched.database.clock_offset().await
        })
        .await
        .unwrap_or_else(|_| {
            Err(StorageError::Unavailable(
                format!("no answer to a ping within {patience:?}").into(),
            ))
        });
        let status = match answer {
            Ok(offset) => {
                skewed = clock_skewed(offset, bound, skewed);
                if skewed {
                    ServingStatus::NotServing
                } else {
                    ServingStatus::Serving
                }
            }
            Err(err) => {
                if last != ServingStatus::NotServing {
                    tracing::warn!(
                        error = %watched.config.redact_database_secrets(&error_chain(&err)),
                        "database unreachable: reporting NOT_SERVING"
                    );
                }
                ServingStatus::NotServing
            }
        };
        if last != status {
            // Calls are admitted before probes hear SERVING, and refused
            // before they hear NOT_SERVING.
            watched.readiness.set(status == ServingStatus::Serving);
            set_all(&health, status).await;
            if status == ServingStatus::Serving {
                tracing::info!("database reachable: reporting SERVING");
            }
            last = status;
        }
    }
}

/// How often a replica reporting NOT_SERVING probes the database: a
/// failover or a restart is over within a few seconds, and each interval
/// waited beyond it is time every call is refused.
const RECHECK_WHILE_DOWN: Duration = Duration::from_millis(50);

/// Returns when `database` reports a lost connection (PostgreSQL's change
/// channel); never on SQLite, a file that drops no connections.
async fn connection_lost(database: &Database) {
    match database {
        Database::Postgres(store) => store.connection_lost().await,
        Database::Sqlite(_) => std::future::pending().await,
    }
}

/// Whether a clock `offset` from the database's (`None`: there is only one
/// clock, SQLite's machine's) is certainly beyond `bound`: exports the
/// offset as `identity_clock_offset_seconds`, and logs an error naming the
/// setting when the clock goes out of bound (`was` says whether it already
/// was) and a notice when it comes back. Revocations hold whatever the
/// clocks say, but expiry, rotation grace periods and session lifetimes
/// are judged on this replica's clock, so a replica whose clock is off by
/// more than the bound must not judge them.
pub(super) fn clock_skewed(
    offset: Option<storage::ClockOffset>,
    bound: Duration,
    was: bool,
) -> bool {
    let Some(offset) = offset else {
        return false;
    };
    metrics::gauge!("identity_clock_offset_seconds").set(offset.seconds());
    let skewed = offset.exceeds(bound);
    if skewed && !was {
        tracing::error!(
            offset_seconds = offset.seconds(),
            uncertainty_micros = offset.uncertainty_micros,
            max_clock_skew = ?bound,
            "this replica's clock is off the database's by more than IDENTITY_MAX_CLOCK_SKEW: \
             reporting NOT_SERVING until it is back within the bound (keep the hosts on NTP)"
        );
    } else if !skewed && was {
        tracing::info!(
            offset_seconds = offset.seconds(),
            "this replica's clock is back within IDENTITY_MAX_CLOCK_SKEW of the database's"
        );
    }
    skewed
}

/// An error and its sources, joined, for one log field.
pub(super) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut message = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        let text = inner.to_string();
        if !message.ends_with(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        cause = inner.source();
    }
    message
}

/// Sets the overall status and each service's.
pub(super) async fn set_all(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <AccountsServiceServer<AccountsApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <TokensServiceServer<TokensApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
    health
        .set_service_status(
            <AuditServiceServer<AuditApi> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
