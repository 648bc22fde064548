//! The credentials verifiers call `VerifyToken` with, watched so that their
//! expiry is seen coming: when the token an internal service verifies with
//! expires, every service that depends on it fails at once.
//!
//! Each credential that called `VerifyToken` within the last [`RECENT`] is
//! remembered with its expiry (at most [`CAPACITY`] of them, so memory stays
//! bounded whatever callers do). The soonest of those expiries is what
//! [`VerifierCredentials::soonest_expiry`] reports (the gauge
//! [`EXPIRY_GAUGE`], read at each scrape), and a credential that expires
//! within [`WARN_AHEAD`] is logged as a warning when it calls, at most once
//! every [`WARN_EVERY`], by its id only.
//!
//! The hot path pays a shared read lock and one atomic load per call: an
//! entry is refreshed at most once every [`REFRESH`], and only a credential
//! not seen before takes the write lock. Credentials that never expire are
//! not tracked, and neither are services admitted by their client
//! certificate alone (mutual TLS `client` mode): they present no credential
//! that could expire. Only robot accounts' tokens are noted (the caller
//! checks): a person may grant a token of their own `tokens:verify`, and
//! would otherwise move the gauge, raise the warning, or fill the table so
//! that a real verifier goes untracked. Robots are made by operators.
//! Sessions never get here: they cannot call `VerifyToken` (full access
//! does not include `tokens:verify`).
//!
//! When the table is full, the credentials that aged out are forgotten at
//! most once every [`REFRESH`], not on every call that finds it full, and a
//! newcomer that still finds no room is counted in
//! [`UNTRACKED_COUNTER`] instead of tracked.

use std::{
    collections::HashMap,
    sync::{
        PoisonError, RwLock,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
};

use crate::domain::{time::Timestamp, token::TokenId};

/// The gauge of the soonest expiry, in Unix seconds, among the credentials
/// that called `VerifyToken` recently; `+Inf` when none of them expires.
pub const EXPIRY_GAUGE: &str = "identity_verifier_credential_expiry_timestamp_seconds";

/// How long after its last call a credential still counts as a verifier's.
pub const RECENT: i64 = 60 * 60;
/// How often a credential's entry is refreshed at most (its expiry read
/// again, a warning considered), in seconds.
pub const REFRESH: i64 = 10;
/// How long before its expiry a verifier's credential is warned about.
pub const WARN_AHEAD: i64 = 7 * 24 * 60 * 60;
/// How often the same credential is warned about at most.
pub const WARN_EVERY: i64 = 24 * 60 * 60;
/// Most credentials remembered at once; past it, new ones are not tracked
/// until old ones age out.
pub const CAPACITY: usize = 10_000;
/// Calls from verifier credentials that found the table full, and were not
/// tracked.
pub const UNTRACKED_COUNTER: &str = "identity_verifier_credentials_untracked_total";

const MICROS: i64 = 1_000_000;

/// The credentials that called `VerifyToken` recently, with their expiry.
#[derive(Debug, Default)]
pub struct VerifierCredentials {
    seen: RwLock<HashMap<TokenId, Seen>>,
    /// When the full table was last pruned, in Unix seconds.
    pruned: AtomicI64,
}

/// One credential's entry. Atomics, so that a refresh needs only the read
/// lock.
#[derive(Debug)]
struct Seen {
    /// When the entry was last refreshed, in Unix seconds.
    refreshed: AtomicI64,
    /// The credential's expiry as last seen, in microseconds since the
    /// epoch.
    expires: AtomicI64,
    /// When its coming expiry was last logged, in Unix seconds
    /// (`i64::MIN`: never).
    warned: AtomicI64,
}

impl VerifierCredentials {
    /// Notes that credential `id`, expiring at `expire_time` (`None`:
    /// never), called `VerifyToken` at `now`.
    pub fn note(&self, id: &TokenId, expire_time: Option<Timestamp>, now: Timestamp) {
        let Some(expires) = expire_time else {
            return;
        };
        let secs = now.as_micros().div_euclid(MICROS);
        {
            let seen = self.seen.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(entry) = seen.get(id) {
                let last = entry.refreshed.load(Relaxed);
                // One caller per interval refreshes; the others return.
                if secs - last >= REFRESH
                    && entry
                        .refreshed
                        .compare_exchange(last, secs, Relaxed, Relaxed)
                        .is_ok()
                {
                    entry.expires.store(expires.as_micros(), Relaxed);
                    entry.consider_warning(id, expires, now);
                }
                return;
            }
        }
        let last_prune = self.pruned.load(Relaxed);
        if self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
            >= CAPACITY
            && secs - last_prune < REFRESH
        {
            // Full, and pruned moments ago: no write lock, no scan.
            metrics::counter!(UNTRACKED_COUNTER).increment(1);
            return;
        }
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        if seen.len() >= CAPACITY && !seen.contains_key(id) {
            if self
                .pruned
                .compare_exchange(last_prune, secs, Relaxed, Relaxed)
                .is_ok()
            {
                seen.retain(|_, entry| secs - entry.refreshed.load(Relaxed) < RECENT);
            }
            if seen.len() >= CAPACITY {
                metrics::counter!(UNTRACKED_COUNTER).increment(1);
                return;
            }
        }
        let entry = seen.entry(id.clone()).or_insert_with(|| Seen {
            refreshed: AtomicI64::new(secs),
            expires: AtomicI64::new(expires.as_micros()),
            warned: AtomicI64::new(i64::MIN),
        });
        entry.consider_warning(id, expires, now);
    }

    /// The soonest expiry among the credentials that called within
    /// [`RECENT`] of `now`, forgetting the others; `None` if there are none.
    pub fn soonest_expiry(&self, now: Timestamp) -> Option<Timestamp> {
        let secs = now.as_micros().div_euclid(MICROS);
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        seen.retain(|_, entry| secs - entry.refreshed.load(Relaxed) < RECENT);
        seen.values()
            .map(|entry| entry.expires.load(Relaxed))
            .min()
            .map(Timestamp::from_micros)
    }

    /// Sets [`EXPIRY_GAUGE`] from [`Self::soonest_expiry`] at `now`: whole
    /// Unix seconds, or `+Inf` when no recent verifier credential expires.
    pub fn publish(&self, now: Timestamp) {
        let value = self.soonest_expiry(now).map_or(f64::INFINITY, |expiry| {
            expiry.as_micros().div_euclid(MICROS) as f64
        });
        metrics::gauge!(EXPIRY_GAUGE).set(value);
    }
}

impl Seen {
    /// Logs a warning if the credential expires within [`WARN_AHEAD`] of
    /// `now` and was not warned about within [`WARN_EVERY`].
    fn consider_warning(&self, id: &TokenId, expires: Timestamp, now: Timestamp) {
        let left = expires.as_micros().saturating_sub(now.as_micros()) / MICROS;
        if left > WARN_AHEAD {
            return;
        }
        let secs = now.as_micros().div_euclid(MICROS);
        let last = self.warned.load(Relaxed);
        if last != i64::MIN && secs - last < WARN_EVERY {
            return;
        }
        if self
            .warned
            .compare_exchange(last, secs, Relaxed, Relaxed)
            .is_ok()
        {
            tracing::warn!(
                token_id = id.as_str(),
                expire_time = expires.as_micros().div_euclid(MICROS),
                hours_left = left / 3600,
                "a credential that calls VerifyToken expires within a week: renew it, or rotate \
                 to a new token, before every service that verifies with it fails"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 60 * 60 * MICROS;

    fn at(micros: i64) -> Timestamp {
        Timestamp::from_micros(micros)
    }

    fn warned(credentials: &VerifierCredentials, id: &TokenId) -> i64 {
        credentials.seen.read().expect("lock")[id]
            .warned
            .load(Relaxed)
    }

    #[test]
    fn the_soonest_expiry_of_recent_callers_is_reported() {
        let credentials = VerifierCredentials::default();
        let now = 1_000 * DAY;
        let (soon, later, never) = (
            TokenId::generate(),
            TokenId::generate(),
            TokenId::generate(),
        );
        credentials.note(&later, Some(at(now + 30 * DAY)), at(now));
        credentials.note(&never, None, at(now));
        assert_eq!(
            credentials.soonest_expiry(at(now)),
            Some(at(now + 30 * DAY))
        );
        credentials.note(&soon, Some(at(now + 3 * DAY)), at(now + MICROS));
        assert_eq!(credentials.soonest_expiry(at(now)), Some(at(now + 3 * DAY)));
        // An hour after its last call, a credential no longer counts.
        credentials.note(&later, Some(at(now + 30 * DAY)), at(now + 1800 * MICROS));
        let later_on = now + MICROS + RECENT * MICROS;
        assert_eq!(
            credentials.soonest_expiry(at(later_on)),
            Some(at(now + 30 * DAY))
        );
        assert_eq!(
            credentials.soonest_expiry(at(now + 3 * RECENT * MICROS)),
            None
        );
    }

    #[test]
    fn a_renewal_is_seen_at_the_next_refresh() {
        let credentials = VerifierCredentials::default();
        let now = 1_000 * DAY;
        let id = TokenId::generate();
        credentials.note(&id, Some(at(now + DAY)), at(now));
        credentials.note(&id, Some(at(now + 90 * DAY)), at(now + MICROS));
        assert_eq!(credentials.soonest_expiry(at(now)), Some(at(now + DAY)));
        credentials.note(&id, Some(at(now + 90 * DAY)), at(now + REFRESH * MICROS));
        assert_eq!(
            credentials.soonest_expiry(at(now)),
            Some(at(now + 90 * DAY))
        );
    }

    #[test]
    fn a_credential_expiring_within_a_week_is_warned_about_once_a_day() {
        let credentials = VerifierCredentials::default();
        let now = 1_000 * DAY;
        let (soon, later) = (TokenId::generate(), TokenId::generate());
        credentials.note(&later, Some(at(now + 30 * DAY)), at(now));
        assert_eq!(
            warned(&credentials, &later),
            i64::MIN,
            "30 days left: no warning"
        );
        credentials.note(&soon, Some(at(now + 3 * DAY)), at(now));
        let first = warned(&credentials, &soon);
        assert_eq!(first, now / MICROS);
        credentials.note(&soon, Some(at(now + 3 * DAY)), at(now + 3600 * MICROS));
        assert_eq!(warned(&credentials, &soon), first, "not again within a day");
        credentials.note(&soon, Some(at(now + 3 * DAY)), at(now + DAY));
        assert_eq!(
            warned(&credentials, &soon),
            (now + DAY) / MICROS,
            "again a day later"
        );
        // The 30-day credential is warned about once it is a week away.
        credentials.note(&later, Some(at(now + 30 * DAY)), at(now + 23 * DAY));
        assert_eq!(warned(&credentials, &later), (now + 23 * DAY) / MICROS);
    }

    #[test]
    fn memory_is_bounded() {
        let credentials = VerifierCredentials::default();
        let now = 1_000 * DAY;
        for _ in 0..CAPACITY + 10 {
            credentials.note(&TokenId::generate(), Some(at(now + DAY)), at(now));
        }
        assert_eq!(credentials.seen.read().expect("lock").len(), CAPACITY);
        // Once the old ones have aged out, new ones are tracked again.
        let fresh = TokenId::generate();
        credentials.note(
            &fresh,
            Some(at(now + 2 * DAY)),
            at(now + 2 * RECENT * MICROS),
        );
        let seen = credentials.seen.read().expect("lock");
        assert_eq!(seen.len(), 1);
        assert!(seen.contains_key(&fresh));
    }
}
