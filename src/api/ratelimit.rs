//! A per-address rate limit for the anonymous endpoints (leak reports): a
//! token bucket per client address (IPv6 by its /64, which one subscriber
//! usually holds whole, as the sign-in throttle counts it), in memory on
//! each replica. Bounded: when the table is full, the least recently used
//! bucket is dropped for the new one (see [`KeyedBuckets`]), so no number of
//! addresses can switch the endpoint off for others.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::domain::{rate::KeyedBuckets, throttle::ip_key};

/// Requests allowed per address per minute, with bursts up to that many.
#[derive(Debug)]
pub struct RateLimiter {
    per_minute: u32,
    buckets: KeyedBuckets,
}

impl RateLimiter {
    /// Addresses tracked at most.
    const CAPACITY: usize = 10_000;

    /// A limiter allowing `per_minute` requests per address per minute.
    pub fn new(per_minute: u32) -> Self {
        Self {
            per_minute: per_minute.max(1),
            buckets: KeyedBuckets::new(Self::CAPACITY),
        }
    }

    /// Takes one request from `address`'s bucket, or says how long to wait.
    /// Requests whose address is unknown share one bucket.
    pub fn check(&self, address: Option<IpAddr>) -> Result<(), Duration> {
        self.check_at(address, Instant::now())
    }

    fn check_at(&self, address: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let key = address.map_or_else(|| "unknown".to_owned(), ip_key);
        self.buckets.take(&[(&key, self.per_minute)], now)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

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

    #[test]
    fn ipv6_addresses_of_one_64_share_a_bucket() {
        let limiter = RateLimiter::new(2);
        let v6 = |s: &str| Some(IpAddr::V6(s.parse::<Ipv6Addr>().expect("ipv6")));
        assert!(limiter.check(v6("2001:db8:1:2::1")).is_ok());
        assert!(
            limiter
                .check(v6("2001:db8:1:2:ffff:ffff:ffff:ffff"))
                .is_ok()
        );
        assert!(
            limiter.check(v6("2001:db8:1:2:abcd::9")).is_err(),
            "a third address of the same /64 shares its bucket"
        );
        assert!(limiter.check(v6("2001:db8:1:3::1")).is_ok(), "the next /64");
    }

    #[test]
    fn a_full_table_admits_a_new_address() {
        let limiter = RateLimiter::new(1);
        let now = Instant::now();
        for i in 0..=RateLimiter::CAPACITY as u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limiter.check_at(Some(ip), now).is_ok(), "address {i}");
        }
        let newcomer = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        assert!(
            limiter.check_at(newcomer, now).is_ok(),
            "10,001 tracked addresses must not refuse a new one"
        );
        assert!(
            limiter.check_at(newcomer, now).is_err(),
            "and the newcomer is limited like any other"
        );
    }
}
