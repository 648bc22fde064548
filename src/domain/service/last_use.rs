use std::{collections::HashMap, sync::Arc, time::Duration};

use crate::domain::store::TokenUse;
use crate::domain::{time::Timestamp, token::TokenId};

use super::Identity;

/// How often buffered token uses are written.
const LAST_USE_FLUSH: Duration = Duration::from_secs(1);

/// How often a token's last use is written: at most once per interval.
const LAST_USE_INTERVAL: Duration = Duration::from_secs(60);

impl Identity {
    /// Writes buffered token uses to the store every `LAST_USE_FLUSH`, from a
    /// background task (for as long as the runtime lives).
    pub fn record_uses_in_background(&self) {
        let uses = Arc::clone(&self.uses);
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(LAST_USE_FLUSH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let batch = uses.take();
                if let Err(err) = store.record_uses(&batch, LAST_USE_INTERVAL).await {
                    tracing::debug!(error = %err, dropped = batch.len(), "could not record token uses");
                }
            }
        });
    }
}

/// Remembers when each token's last use was last written, so that a busy
/// token costs one write a minute, not one per verification; and buffers the
/// uses to write, so that verification never waits for a write and a burst
/// of first uses costs one statement a second.
#[derive(Debug, Default)]
pub(super) struct UseRecorder {
    written: std::sync::Mutex<HashMap<TokenId, Timestamp>>,
    pending: std::sync::Mutex<Vec<TokenUse>>,
}

impl UseRecorder {
    /// Entries kept before old ones are dropped.
    const CAPACITY: usize = 100_000;

    /// Whether a use at `now` should be written, given the last one the
    /// store knew of; if so, notes it as written.
    pub(super) fn due(&self, id: &TokenId, stored: Option<Timestamp>, now: Timestamp) -> bool {
        let interval = LAST_USE_INTERVAL.as_micros() as i64;
        let fresh = |t: Timestamp| now.as_micros() - t.as_micros() < interval;
        if stored.is_some_and(fresh) {
            return false;
        }
        let mut written = self
            .written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if written.get(id).copied().is_some_and(fresh) {
            return false;
        }
        if written.len() >= Self::CAPACITY {
            written.retain(|_, t| fresh(*t));
        }
        written.insert(id.clone(), now);
        true
    }

    /// Queues a use for the next flush. Bounded: past the capacity, uses are
    /// dropped (they are a convenience, not a record of security events).
    pub(super) fn push(&self, token_use: TokenUse) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() < Self::CAPACITY {
            pending.push(token_use);
        }
    }

    pub(super) fn take(&self) -> Vec<TokenUse> {
        std::mem::take(
            &mut *self
                .pending
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
}
