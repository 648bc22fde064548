//! The retention job: purges what is past retention (see
//! [`crate::domain::retention`]) every interval, from a background task, and
//! counts what it deleted (`identity_retention_purged_total{kind}`) and how
//! each run went (`identity_retention_runs_total{outcome}`).

use std::time::Duration;

use super::Identity;
use crate::domain::{
    DomainError,
    retention::{PurgeCutoffs, Purged, RetentionSettings},
    throttle::MAX_LOCKOUT_FAILURES,
    time::Timestamp,
};

/// The longest wait before the first purge after start-up.
const FIRST_RUN_WITHIN: Duration = Duration::from_secs(60);

impl Identity {
    /// Purges once, judging ages at `now`. `None` if another replica holds
    /// the retention lock (and is purging).
    pub async fn purge(
        &self,
        settings: &RetentionSettings,
        now: Timestamp,
    ) -> Result<Option<Purged>, DomainError> {
        let throttle = &self.settings.sign_in_throttle;
        let cutoffs = PurgeCutoffs::at(
            now,
            settings,
            throttle.address_memory,
            throttle.lockout_failures.clamp(1, MAX_LOCKOUT_FAILURES),
        );
        Ok(self.store.purge(&cutoffs).await?)
    }

    /// Purges every `settings.interval` (the first time after an interval,
    /// or a minute if that is shorter) until the returned task is aborted,
    /// logging one line per run.
    pub fn purge_periodically(&self, settings: RetentionSettings) -> tokio::task::JoinHandle<()> {
        let identity = self.clone();
        tokio::spawn(async move {
            let runs = |outcome: &'static str| metrics::counter!("identity_retention_runs_total", "outcome" => outcome);
            tokio::time::sleep(settings.interval.min(FIRST_RUN_WITHIN)).await;
            let mut tick = tokio::time::interval(settings.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // Ages are judged by the database's clock, not this
                // replica's: a replica whose clock runs ahead would
                // otherwise delete tokens and sessions still alive.
                let purged = match identity.store.database_time().await {
                    Ok(now) => identity.purge(&settings, now).await,
                    Err(err) => Err(err.into()),
                };
                match purged {
                    Ok(Some(purged)) => {
                        runs("done").increment(1);
                        for (kind, count) in purged.by_kind() {
                            metrics::counter!("identity_retention_purged_total", "kind" => kind)
                                .increment(count);
                        }
                        tracing::info!(
                            sessions = purged.sessions,
                            tokens = purged.tokens,
                            sign_in_throttle = purged.sign_in_throttle,
                            audit_events = purged.audit_events,
                            changes = purged.changes,
                            "retention: purged what was past retention"
                        );
                    }
                    Ok(None) => {
                        runs("skipped").increment(1);
                        tracing::info!("retention: another replica is purging; skipped");
                    }
                    Err(err) => {
                        runs("failed").increment(1);
                        tracing::warn!(error = %err, "retention: the purge failed; trying again next interval");
                    }
                }
            }
        })
    }
}
