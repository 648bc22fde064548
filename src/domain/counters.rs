//! The hot path's counters: `identity_verify_token_verdicts_total` (by
//! verdict) and `identity_verification_cache_lookups_total` (by result),
//! counted by the domain itself rather than through the `metrics` facade.
//!
//! Every `VerifyToken` and every authentication counts into them, on every
//! core at once. A facade counter is one atomic on a cache line that every
//! core writes, so the cores take turns owning it; these are sharded by
//! thread instead, each shard on cache lines of its own (as the observe
//! layer's call histograms are, `crate::api::layers::observe`), so that
//! counting is one relaxed atomic addition on a line no other core writes
//! (while there are no more threads than shards), with no lock, no lookup
//! and nothing buffered. Reading sums the shards.
//!
//! The counters are the process's, like a `metrics` recorder: every
//! [`crate::domain::Identity`] of a process (tests run many) counts into the
//! same ones. This module never sees the exporter: whoever serves the
//! metrics reads [`families`] and renders them.

use std::sync::{
    OnceLock,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use crate::domain::verdict::{InactiveReason, Verification};

/// A counter family's series, read for exposition: its name, help text,
/// the one label's key, and each series' label value and count, in a fixed
/// order (every series, counted or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    /// The metric's name, such as `identity_verify_token_verdicts_total`.
    pub name: &'static str,
    /// Its help text.
    pub help: &'static str,
    /// The label's key, such as `verdict`.
    pub label: &'static str,
    /// Each series' label value (a closed set) and its count so far.
    pub series: Vec<(&'static str, u64)>,
}

/// The domain's counter families as they stand now: the verdicts, then the
/// cache lookups.
pub fn families() -> Vec<Family> {
    let verdicts = verdicts();
    let lookups = lookups();
    vec![
        Family {
            name: VERDICTS,
            help: "VerifyToken answers, by verdict: active, or the reason a credential is inactive",
            label: "verdict",
            series: verdict_labels()
                .iter()
                .copied()
                .zip(verdicts.read())
                .collect(),
        },
        Family {
            name: LOOKUPS,
            help: "Credential lookups in the verification cache (VerifyToken and every \
                   authentication), by result: hit, miss, or bypassed (cache off, or its change \
                   channel down)",
            label: "result",
            series: LOOKUP_LABELS.iter().copied().zip(lookups.read()).collect(),
        },
    ]
}

const VERDICTS: &str = "identity_verify_token_verdicts_total";
const LOOKUPS: &str = "identity_verification_cache_lookups_total";

/// The verdict series: `active`, then each reason in
/// [`InactiveReason::ALL`] order.
const VERDICT_COUNT: usize = 1 + InactiveReason::ALL.len();

fn verdict_labels() -> &'static [&'static str; VERDICT_COUNT] {
    static LABELS: OnceLock<[&'static str; VERDICT_COUNT]> = OnceLock::new();
    LABELS.get_or_init(|| {
        let mut labels = ["active"; VERDICT_COUNT];
        for reason in InactiveReason::ALL {
            labels[1 + reason.index()] = reason.label();
        }
        labels
    })
}

/// Counts one `VerifyToken` answer.
pub(crate) fn count_verdict(verification: &Verification) {
    verdicts().add(verification.reason().map_or(0, |reason| 1 + reason.index()));
}

/// A cache lookup's result, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    Hit = 0,
    Miss = 1,
    Bypassed = 2,
}

const LOOKUP_LABELS: [&str; 3] = ["hit", "miss", "bypassed"];

/// Counts one cache lookup.
pub(crate) fn count_lookup(result: Lookup) {
    lookups().add(result as usize);
}

fn verdicts() -> &'static Sharded<VERDICT_COUNT> {
    static COUNTERS: OnceLock<Sharded<VERDICT_COUNT>> = OnceLock::new();
    COUNTERS.get_or_init(Sharded::new)
}

fn lookups() -> &'static Sharded<3> {
    static COUNTERS: OnceLock<Sharded<3>> = OnceLock::new();
    COUNTERS.get_or_init(Sharded::new)
}

/// `N` counters sharded by thread: adding is one relaxed atomic addition
/// into this thread's shard; reading sums the shards (exact once the
/// additions it races with are done).
#[derive(Debug)]
pub(crate) struct Sharded<const N: usize> {
    shards: Box<[Shard<N>]>,
}

/// One thread group's counts, aligned to two cache lines (what adjacent
/// line prefetching pulls in together) so that shards share none.
#[derive(Debug)]
#[repr(align(128))]
struct Shard<const N: usize>([AtomicU64; N]);

impl<const N: usize> Sharded<N> {
    /// `N` counters at zero.
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..shard_count())
                .map(|_| Shard(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        }
    }

    /// Adds one to counter `i` (an `i` past the last counts into the last).
    pub(crate) fn add(&self, i: usize) {
        let shard = &self.shards[shard_number() & (self.shards.len() - 1)];
        shard.0[i.min(N - 1)].fetch_add(1, Ordering::Relaxed);
    }

    /// Every counter, summed over the shards.
    pub(crate) fn read(&self) -> [u64; N] {
        let mut totals = [0u64; N];
        for shard in &self.shards {
            for (total, n) in totals.iter_mut().zip(&shard.0) {
                *total = total.wrapping_add(n.load(Ordering::Relaxed));
            }
        }
        totals
    }
}

/// Shards per counter set (and per histogram, `api::layers::observe`): a
/// power of two, at least twice the cores (tokio's workers are one per core,
/// and other threads count rarely), at most 64.
pub fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        (cores * 2).next_power_of_two().min(64)
    })
}

/// This thread's shard number (taken in turn by the threads as they first
/// count), before the mask.
pub fn shard_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_additions_from_several_threads_sum_exactly() {
        let counters = Sharded::<3>::new();
        let (threads, per_thread) = (8usize, 10_000usize);
        std::thread::scope(|scope| {
            for t in 0..threads {
                let counters = &counters;
                scope.spawn(move || {
                    for i in 0..per_thread {
                        counters.add((t + i) % 4);
                    }
                });
            }
        });
        let [a, b, c] = counters.read();
        let n = u64::try_from(threads * per_thread / 4).unwrap();
        // Index 3 is past the last and counts into it.
        assert_eq!((a, b, c), (n, n, 2 * n));
    }

    #[test]
    fn every_verdict_and_lookup_result_has_its_own_series() {
        let families = families();
        let names: Vec<_> = families.iter().map(|f| f.name).collect();
        assert_eq!(names, [VERDICTS, LOOKUPS]);
        let verdicts: Vec<_> = families[0].series.iter().map(|(label, _)| *label).collect();
        assert_eq!(verdicts.len(), 1 + InactiveReason::ALL.len());
        assert_eq!(verdicts[0], "active");
        for reason in InactiveReason::ALL {
            assert_eq!(verdicts[1 + reason.index()], reason.label());
        }
        let lookups: Vec<_> = families[1].series.iter().map(|(label, _)| *label).collect();
        assert_eq!(lookups, ["hit", "miss", "bypassed"]);
    }

    #[test]
    fn a_count_shows_in_its_series() {
        let before = lookups().read();
        count_lookup(Lookup::Bypassed);
        let after = lookups().read();
        // Other tests count concurrently: at least ours.
        assert!(after[2] > before[2]);
        let revoked = 1 + InactiveReason::Revoked.index();
        let before = verdicts().read()[revoked];
        count_verdict(&Verification::Inactive(InactiveReason::Revoked));
        assert!(verdicts().read()[revoked] > before);
    }
}
