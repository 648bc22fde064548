//! A per-address rate limit for the anonymous endpoints (leak reports): a
//! token bucket per client IP, in memory on each replica. Bounded: when the
//! table is full, idle buckets are dropped, and if none are idle the request
//! is refused rather than letting the table grow.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Requests allowed per address per minute, with bursts up to that many.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

impl RateLimiter {
    /// Addresses tracked at most.
    const CAPACITY: usize = 10_000;

    /// A limiter allowing `per_minute` requests per address per minute.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one request from `address`'s bucket, or says how long to wait.
    /// Requests whose address is unknown share one bucket.
    pub fn check(&self, address: Option<IpAddr>) -> Result<(), Duration> {
        let key = address.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let capacity = f64::from(self.per_minute);
        let per_second = capacity / 60.0;
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= Self::CAPACITY && !buckets.contains_key(&key) {
            let idle = Duration::from_secs(60);
            buckets.retain(|_, b| now.duration_since(b.updated) < idle);
            if buckets.len() >= Self::CAPACITY {
                return Err(idle);
            }
        }
        let bucket = buckets.entry(key).or_insert(Bucket {
            tokens: capacity,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * per_second;
        bucket.tokens = (bucket.tokens + refill).min(capacity);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / per_second))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_burst_then_waits() {
        let limiter = RateLimiter::new(3);
        let a = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
        let b = Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
        for _ in 0..3 {
            assert!(limiter.check(a).is_ok());
        }
        let wait = limiter.check(a).expect_err("the fourth request waits");
        assert!(
            wait > Duration::from_secs(10) && wait <= Duration::from_secs(20),
            "{wait:?}"
        );
        assert!(limiter.check(b).is_ok(), "another address is unaffected");
    }
}
