//! Token buckets by key, in memory, bounded: the rate limits that protect
//! this replica's own resources (its argon2 threads, its database writes),
//! so they are per replica by design.
//!
//! Each key has a bucket holding up to `per_minute` tokens, refilled at
//! `per_minute` a minute; a request takes one token or is refused with the
//! time until one is back. The table holds at most a fixed number of keys:
//! a new key beyond that evicts the least recently used one (in O(log n),
//! under the mutex), it is never refused for want of room. Evicting a
//! bucket forgets its debt, so its key may start again with a full bucket;
//! that grants nothing an attacker who can make that many keys does not
//! already have (a fresh key is a full bucket), and an idle full bucket,
//! the usual victim, loses nothing at all.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Token buckets keyed by string, at most `capacity` of them.
#[derive(Debug)]
pub struct KeyedBuckets {
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    buckets: HashMap<String, Bucket>,
    /// The keys by last use (a counter, so every stamp is distinct): the
    /// first is the least recently used.
    by_use: BTreeMap<u64, String>,
    clock: u64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
    stamp: u64,
}

impl KeyedBuckets {
    /// An empty table of at most `capacity` keys (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            table: Mutex::default(),
        }
    }

    /// How many keys are tracked.
    pub fn len(&self) -> usize {
        self.lock().buckets.len()
    }

    /// Whether no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes one token from the bucket of every `(key, per_minute)` at
    /// `now`, all or none: if one bucket is empty nothing is taken, and the
    /// longest wait until every one has a token again is returned.
    pub fn take(&self, keys: &[(&str, u32)], now: Instant) -> Result<(), Duration> {
        let mut table = self.lock();
        let mut wait = Duration::ZERO;
        for &(key, per_minute) in keys {
            let tokens = table
                .buckets
                .get(key)
                .map_or(f64::from(per_minute.max(1)), |b| {
                    refilled(b, per_minute, now)
                });
            if tokens < 1.0 {
                wait = wait.max(Duration::from_secs_f64(
                    (1.0 - tokens) / per_second(per_minute),
                ));
            }
        }
        if !wait.is_zero() {
            return Err(wait);
        }
        for &(key, per_minute) in keys {
            table.clock += 1;
            let stamp = table.clock;
            let tokens = match table.buckets.get(key) {
                Some(bucket) => {
                    let tokens = refilled(bucket, per_minute, now);
                    let old = bucket.stamp;
                    table.by_use.remove(&old);
                    tokens
                }
                None => f64::from(per_minute.max(1)),
            };
            table.buckets.insert(
                key.to_owned(),
                Bucket {
                    tokens: tokens - 1.0,
                    updated: now,
                    stamp,
                },
            );
            table.by_use.insert(stamp, key.to_owned());
        }
        while table.buckets.len() > self.capacity {
            let Some((_, oldest)) = table.by_use.pop_first() else {
                break;
            };
            table.buckets.remove(&oldest);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn per_second(per_minute: u32) -> f64 {
    f64::from(per_minute.max(1)) / 60.0
}

/// A bucket's tokens at `now`: refilled since its last use, up to the burst.
fn refilled(bucket: &Bucket, per_minute: u32, now: Instant) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
    (bucket.tokens + elapsed * per_second(per_minute)).min(f64::from(per_minute.max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let buckets = KeyedBuckets::new(10);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(buckets.take(&[("a", 3)], start).is_ok());
        }
        let wait = buckets.take(&[("a", 3)], start).expect_err("empty");
        assert_eq!(wait, Duration::from_secs(20));
        assert!(buckets.take(&[("b", 3)], start).is_ok(), "another key");
        let later = start + Duration::from_secs(20);
        assert!(buckets.take(&[("a", 3)], later).is_ok(), "one token back");
        assert!(buckets.take(&[("a", 3)], later).is_err());
    }

    #[test]
    fn several_buckets_are_taken_all_or_none() {
        let buckets = KeyedBuckets::new(10);
        let now = Instant::now();
        assert!(buckets.take(&[("small", 1)], now).is_ok());
        let wait = buckets
            .take(&[("big", 100), ("small", 1)], now)
            .expect_err("small is empty");
        assert_eq!(wait, Duration::from_secs(60));
        // Nothing was taken from `big`: it still has its whole burst.
        for _ in 0..100 {
            assert!(buckets.take(&[("big", 100)], now).is_ok());
        }
        assert!(buckets.take(&[("big", 100)], now).is_err());
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_used_key_instead_of_refusing() {
        let buckets = KeyedBuckets::new(10_000);
        let now = Instant::now();
        assert!(buckets.take(&[("first", 1)], now).is_ok());
        assert!(buckets.take(&[("busy", 1_000_000)], now).is_ok());
        for i in 0..10_000 {
            if i % 1000 == 0 {
                // Kept in use, so never the least recently used.
                assert!(buckets.take(&[("busy", 1_000_000)], now).is_ok());
            }
            assert!(buckets.take(&[(&format!("k{i}"), 1)], now).is_ok(), "{i}");
        }
        assert_eq!(buckets.len(), 10_000);
        assert!(
            buckets.take(&[("newcomer", 1)], now).is_ok(),
            "a new key is admitted"
        );
        assert_eq!(buckets.len(), 10_000);
        // "first" was the least recently used: evicted, so it starts again
        // with a full bucket; "busy" kept its place.
        assert!(buckets.take(&[("first", 1)], now).is_ok());
        let table = buckets.lock();
        assert!(table.buckets.contains_key("busy"));
        assert_eq!(table.by_use.len(), table.buckets.len());
    }
}
