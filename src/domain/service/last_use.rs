use std::{
    collections::HashMap,
    hash::{BuildHasher, RandomState},
    sync::Arc,
    time::Duration,
};

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
///
/// An entry older than `LAST_USE_INTERVAL` says nothing any more (the next
/// use is due anyway), so the map is pruned by age once per interval: it
/// holds the tokens written during the last one or two intervals, however
/// many tokens were used before (a soak that creates and uses 400,000
/// tokens does not grow it). `CAPACITY` bounds it against a burst of more
/// distinct tokens than that within one interval: past it, uses are still
/// written (the store's condition keeps them to one per interval) but not
/// remembered.
#[derive(Debug, Default)]
pub(super) struct UseRecorder {
    written: std::sync::Mutex<Written>,
    pending: std::sync::Mutex<Vec<TokenUse>>,
}

/// When each token's last use was written, and when the map is next pruned.
///
/// Tokens are named by a keyed 64-bit hash of their id, not a copy of it (at
/// 100,000 tokens, 5 MB less). Two ids that share one (about one pair in
/// 2^64, with a per-process key no client can learn) share an entry: a use
/// of one within a minute of the other's write is then not written, which
/// delays a last-use time, a convenience, by at most one interval.
#[derive(Debug, Default)]
struct Written {
    hasher: RandomState,
    at: HashMap<u64, Timestamp>,
    /// Microseconds; 0 (never pruned): at the first use.
    next_prune: i64,
}

impl UseRecorder {
    /// Entries kept at most.
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
        let id = written.hasher.hash_one(id.as_str());
        if written.at.get(&id).copied().is_some_and(fresh) {
            return false;
        }
        if now.as_micros() >= written.next_prune {
            written.at.retain(|_, t| fresh(*t));
            written.next_prune = now.as_micros().saturating_add(interval);
        }
        if written.at.len() < Self::CAPACITY || written.at.contains_key(&id) {
            written.at.insert(id, now);
        }
        true
    }

    /// How many tokens' last writes are remembered.
    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.written
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .at
            .len()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::time::{Clock as _, ManualClock};

    #[test]
    fn a_use_within_the_interval_is_not_due_again() {
        let clock = ManualClock::new();
        let recorder = UseRecorder::default();
        let id = TokenId::generate();
        assert!(recorder.due(&id, None, clock.now()));
        clock.advance(LAST_USE_INTERVAL / 2);
        assert!(!recorder.due(&id, None, clock.now()));
        clock.advance(LAST_USE_INTERVAL);
        assert!(recorder.due(&id, None, clock.now()));
    }

    #[test]
    fn the_map_holds_only_the_tokens_used_in_the_last_intervals() {
        let clock = ManualClock::new();
        let recorder = UseRecorder::default();
        // Ten intervals, a thousand new tokens in each (a soak creating
        // tokens all along): far fewer than the capacity in all.
        for _ in 0..10 {
            for _ in 0..1_000 {
                assert!(recorder.due(&TokenId::generate(), None, clock.now()));
            }
            clock.advance(LAST_USE_INTERVAL + Duration::from_millis(1));
        }
        let last = TokenId::generate();
        assert!(recorder.due(&last, None, clock.now()));
        // Pruned by age: only the last interval's tokens (and the one just
        // used) are left, not the 10,001 seen.
        assert!(recorder.remembered() <= 1_001, "{}", recorder.remembered());
        // What was pruned was due anyway; what is kept still counts.
        assert!(!recorder.due(&last, None, clock.now()));
    }

    #[test]
    fn the_map_never_exceeds_its_capacity() {
        let clock = ManualClock::new();
        let recorder = UseRecorder::default();
        for _ in 0..UseRecorder::CAPACITY + 10 {
            assert!(recorder.due(&TokenId::generate(), None, clock.now()));
        }
        assert_eq!(recorder.remembered(), UseRecorder::CAPACITY);
    }
}
