//! Sign-in throttling: the policy that limits password guessing.
//!
//! Two counters watch every sign-in attempt: one per account, keyed by the
//! normalised (ASCII-lowercased) username whether or not such an account
//! exists, so an unknown username is throttled exactly like a real one; and
//! one per client address (the peer the server sees, or behind a trusted
//! proxy the client it forwards for, as the wire layer resolved it; IPv6
//! clients by their /64, which one subscriber usually holds whole). Each counter allows a few free failures, then makes the
//! client wait a delay that doubles with every further failure, up to a cap.
//! After `lockout_failures` (at most 100, NIST SP 800-63B §5.2.2)
//! consecutive failures, password checks for that username stop until an
//! operator calls `EnableAccount`. (A successful password change, like a
//! successful sign-in, resets the count; but while locked, `ChangePassword`
//! is refused too, or a stolen session would be a way to keep guessing.)
//!
//! An attempt is *claimed* (counted) in the store before its password is
//! hashed, in one atomic statement per counter that refuses instead while
//! the counter is in backoff: a refused attempt costs no argon2 hash, and
//! any number of concurrent attempts get exactly as many hashes as the
//! policy allows. A correct password then clears the account's counter and
//! takes its own attempt back from the address's counter. The counters live
//! in the database, so every replica enforces the same limits.
//!
//! This module holds the arithmetic and the keys; the store applies the same
//! arithmetic in SQL (see `storage/sql/throttle.rs`), and tests check both agree.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use super::time::Timestamp;

/// The most consecutive failures any account may have (NIST SP 800-63B).
pub const MAX_LOCKOUT_FAILURES: u32 = 100;

/// How sign-in failures are limited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleSettings {
    /// Consecutive failures per username that arm no delay; each further
    /// one makes the next attempt wait.
    pub account_free_failures: u32,
    /// Failures per client address that arm no delay; each further one
    /// makes the next attempt from the address wait.
    pub address_free_failures: u32,
    /// The delay armed by the first failure beyond the free ones; each
    /// further failure doubles it.
    pub base_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// Consecutive failures after which password sign-in for a username
    /// stops until an operator enables the account
    /// (1 to [`MAX_LOCKOUT_FAILURES`]).
    pub lockout_failures: u32,
    /// How long an address's failures are remembered once it stops failing
    /// (an address is shared by many people, so its count must fade; a
    /// username's never does, it is reset only by a success).
    pub address_memory: Duration,
}

impl Default for ThrottleSettings {
    fn default() -> Self {
        Self {
            account_free_failures: 5,
            address_free_failures: 20,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(15 * 60),
            lockout_failures: MAX_LOCKOUT_FAILURES,
            address_memory: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Which kind of counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ThrottleScope {
    /// Per normalised username.
    Account,
    /// Per client address.
    Address,
}

impl ThrottleScope {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Account => "account",
            Self::Address => "address",
        }
    }
}

/// One attempt to count against one counter, with the rule the store
/// applies atomically: refuse while the counter is in backoff or locked,
/// otherwise add one failure (or start again at one if the previous attempt
/// is older than `forget_before`) and arm the delay for the new count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleClaim {
    /// Which counter.
    pub scope: ThrottleScope,
    /// Its key: a username key or an address.
    pub subject: String,
    /// The backoff curve.
    pub curve: Backoff,
    /// Counts at or above this refuse every attempt (`i64::MAX`: never).
    pub lockout: i64,
    /// An attempt older than this is forgotten (`i64::MIN`: never).
    pub forget_before: Timestamp,
}

/// The backoff curve, in the integer terms SQL computes it in: no delay for
/// fewer than `first_delayed` failures, then `base << (failures -
/// first_delayed)` microseconds, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first count that arms a delay: one more than the free failures.
    pub first_delayed: i64,
    /// The first delay, in microseconds (at least 1).
    pub base_micros: i64,
    /// The cap, in microseconds (at least `base_micros`).
    pub max_micros: i64,
    /// The smallest shift at which the delay reaches the cap: larger shifts
    /// are never computed, so they cannot overflow.
    pub max_shift: i64,
}

impl Backoff {
    /// The curve of `free` free failures (failures that arm no delay: the
    /// attempt after them may follow at once) and `settings`' delays.
    pub fn new(free: u32, settings: &ThrottleSettings) -> Self {
        let micros = |d: Duration| i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let base_micros = micros(settings.base_delay).max(1);
        // Keep the cap well below i64::MAX so `base << shift` cannot overflow.
        let max_micros = micros(settings.max_delay).clamp(base_micros, i64::MAX / 4);
        let mut max_shift = 0;
        while (base_micros << max_shift) < max_micros {
            max_shift += 1;
        }
        Self {
            first_delayed: i64::from(free) + 1,
            base_micros,
            max_micros,
            max_shift,
        }
    }

    /// The delay armed by the `failures`-th failure, in microseconds.
    pub fn delay_micros(&self, failures: i64) -> i64 {
        if failures < self.first_delayed {
            0
        } else if failures - self.first_delayed >= self.max_shift {
            self.max_micros
        } else {
            (self.base_micros << (failures - self.first_delayed)).min(self.max_micros)
        }
    }
}

/// A counter as the store holds it, read back when an attempt was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThrottleCounter {
    /// Which counter.
    pub scope: ThrottleScope,
    /// Failures counted.
    pub failures: i64,
    /// No attempt is allowed before this instant.
    pub blocked_until: Timestamp,
    /// Whether this counter refuses attempts now.
    pub refusing: bool,
    /// Whether this is the first refusal of the current block (so that an
    /// audit event is written once per block, not once per attempt).
    pub first_refusal: bool,
}

/// Why an attempt may not proceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many recent failures: retry after this long.
    Backoff(Duration),
    /// Too many consecutive failures for this username: password sign-in
    /// is off until an operator enables the account.
    Locked,
}

impl ThrottleSettings {
    /// The two claims of an attempt on `username_key` from `address`, at
    /// `now`.
    pub fn claims(&self, username_key: &str, address: &str, now: Timestamp) -> [ThrottleClaim; 2] {
        let memory = i64::try_from(self.address_memory.as_micros()).unwrap_or(i64::MAX);
        [
            ThrottleClaim {
                scope: ThrottleScope::Account,
                subject: username_key.to_owned(),
                curve: Backoff::new(self.account_free_failures, self),
                lockout: i64::from(self.lockout_failures.clamp(1, MAX_LOCKOUT_FAILURES)),
                forget_before: Timestamp::from_micros(i64::MIN),
            },
            ThrottleClaim {
                scope: ThrottleScope::Address,
                subject: address_key(address),
                curve: Backoff::new(self.address_free_failures, self),
                lockout: i64::MAX,
                forget_before: Timestamp::from_micros(now.as_micros().saturating_sub(memory)),
            },
        ]
    }

    /// Why the attempt was refused, from the counters the store read back.
    /// A lock wins over a delay; among delays, the longest.
    pub fn refusal(&self, counters: &[ThrottleCounter], now: Timestamp) -> Refusal {
        let lockout = i64::from(self.lockout_failures.clamp(1, MAX_LOCKOUT_FAILURES));
        let refusing = counters.iter().filter(|c| c.refusing);
        let mut wait = 0;
        for counter in refusing {
            if counter.scope == ThrottleScope::Account && counter.failures >= lockout {
                return Refusal::Locked;
            }
            wait = wait.max(counter.blocked_until.as_micros() - now.as_micros());
        }
        // A counter that unblocked between the claim and the read still
        // refused this attempt: ask for the shortest sensible wait.
        Refusal::Backoff(Duration::from_micros(wait.max(1_000).unsigned_abs()))
    }
}

/// The address counter's key for a peer address as the wire layer reports
/// it (`ip:port`, or empty when unknown): the IP, or its /64 for IPv6
/// (IPv4-mapped addresses count as IPv4).
pub fn address_key(address: &str) -> String {
    let ip = address
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .or_else(|_| address.parse::<IpAddr>());
    match ip {
        Ok(ip) => ip_key(ip),
        Err(_) => "unknown".to_owned(),
    }
}

/// The key of an IP address for every per-address limit: the IP, or its
/// /64 for IPv6 (IPv4-mapped addresses count as IPv4).
pub fn ip_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
        IpAddr::V4(v4) => v4.to_string(),
    }
}

/// How many password checks (`SignIn`, and `ChangePassword`'s check of the
/// current password) each replica starts per minute, right or wrong, per
/// username and per client address: the bound on the argon2 hashing that
/// anyone, even the account's holder with the right password, can make a
/// replica do. Each is a token bucket (bursts up to the rate); a check
/// beyond it is refused before the throttle's claim and before any hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignInRates {
    /// Password checks per username per minute.
    pub account_per_minute: u32,
    /// Password checks per client address (IPv6: per /64) per minute.
    pub address_per_minute: u32,
}

impl SignInRates {
    /// Usernames and addresses tracked at most per replica (the least
    /// recently used is forgotten first).
    pub const TRACKED: usize = 50_000;
}

impl Default for SignInRates {
    fn default() -> Self {
        Self {
            account_per_minute: 10,
            address_per_minute: 60,
        }
    }
}

/// The longest an attempt waits for the attempts in flight before it (see
/// [`InFlight`]) before it is refused as the throttle says. Longer than any
/// call lives (`IDENTITY_REQUEST_TIMEOUT`, 10 s by default, drops it
/// first): a right password queued behind a loaded replica's hashes must
/// not be refused for the queue's length. A waiting attempt holds no hash,
/// no connection and no claim, and the listeners' stream limits bound how
/// many can wait.
pub const MAX_IN_FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// The password checks in flight on this replica, per username key.
///
/// An attempt's claim counts as a failure from the moment it is made, so
/// that concurrent wrong guesses get no more checks than sequential ones:
/// with 5 free failures, the 6th concurrent attempt arms the first delay and
/// the 7th is refused, even if every one of them carries the right password
/// and would have reset the count on success. That refused a right password
/// only because other attempts were still in flight (the soak of
/// 2026-12-01 saw 3 in 16,526 when hashes queued).
///
/// So an attempt the throttle refuses while attempts for the same username
/// are in flight on this replica does not give up: it waits (at most
/// [`MAX_IN_FLIGHT_WAIT`], and never past its call's deadline, which drops
/// it) until one of them resolves, and claims again. A waiting attempt does
/// not count as in flight, so waiters never wait for one another. The argument that this
/// keeps the guarantee: waiting adds no check. Every password check still
/// follows a claim the store admitted under the same atomic rule, and a
/// claim is admitted only if the counter, with every earlier claim counted
/// as a failure, is not in backoff; so N concurrent attempts get at most
/// the checks N sequential failures would get. What changes is only when a
/// refused attempt is answered: if an attempt in flight succeeds, it resets
/// the count and the waiting attempt's new claim is admitted (the right
/// password is then checked, as it would have been had it come a moment
/// later); if they all fail, the count stands, the new claim is refused, and
/// with nothing left in flight the attempt is refused as before. Wrong
/// guesses made one after another find nothing in flight and are refused at
/// once, as before. Attempts in flight on another replica are not seen:
/// there the refusal stands (the client's RetryInfo says when to retry).
#[derive(Debug, Default)]
pub struct InFlight {
    keys: std::sync::Mutex<std::collections::HashMap<String, Key>>,
}

/// The attempts on one username key: how many are active (claiming, or
/// checking a password), how many have resolved so far, and what waiters
/// wait on.
#[derive(Debug, Default)]
struct Key {
    active: usize,
    resolved: u64,
    notify: std::sync::Arc<tokio::sync::Notify>,
}

/// One attempt in flight; resolving (dropping) it wakes the waiters.
#[derive(Debug)]
pub struct InFlightAttempt {
    registry: std::sync::Arc<InFlight>,
    key: String,
    /// Waiting for others, and so not counted as active.
    paused: bool,
}

/// What a refused attempt does next (see [`InFlightAttempt::pause`]).
pub enum Next {
    /// Nothing else is in flight: the refusal stands.
    Refuse,
    /// An attempt resolved since this one claimed: claim again at once.
    Retry,
    /// Others are in flight: wait for one to resolve, then claim again.
    Wait(std::pin::Pin<Box<tokio::sync::futures::OwnedNotified>>),
}

impl InFlight {
    /// Registers an attempt on `key` as active, from before its claim until
    /// the returned guard is dropped (after its success or failure has been
    /// recorded, or its refusal).
    pub fn enter(registry: &std::sync::Arc<Self>, key: &str) -> InFlightAttempt {
        registry.lock().entry(key.to_owned()).or_default().active += 1;
        InFlightAttempt {
            registry: std::sync::Arc::clone(registry),
            key: key.to_owned(),
            paused: false,
        }
    }

    /// How many attempts on `key` have resolved so far: read before a
    /// claim, and given to [`InFlightAttempt::pause`] after a refusal.
    pub fn resolved(&self, key: &str) -> u64 {
        self.lock().get(key).map_or(0, |k| k.resolved)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Key>> {
        self.keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl InFlightAttempt {
    /// After a refused claim (which began when `resolved_before` attempts
    /// had resolved): stops counting as active and says what to do. Decided
    /// under the registry's lock, so of several refused attempts pausing
    /// together the last one finds nothing active, is refused, and its
    /// resolution wakes the others: no two waiters wait for each other.
    pub fn pause(&mut self, resolved_before: u64) -> Next {
        let mut keys = self.registry.lock();
        let key = keys.entry(self.key.clone()).or_default();
        if key.resolved != resolved_before {
            // Something resolved during the claim (a success may have reset
            // the count): claim again rather than trust the refusal.
            return Next::Retry;
        }
        if !self.paused {
            key.active -= 1;
            self.paused = true;
        }
        if key.active == 0 {
            return Next::Refuse;
        }
        let mut woken = Box::pin(std::sync::Arc::clone(&key.notify).notified_owned());
        woken.as_mut().enable();
        Next::Wait(woken)
    }

    /// Counts as active again, before claiming again.
    pub fn resume(&mut self) {
        if self.paused {
            self.registry
                .lock()
                .entry(self.key.clone())
                .or_default()
                .active += 1;
            self.paused = false;
        }
    }
}

impl Drop for InFlightAttempt {
    fn drop(&mut self) {
        let mut keys = self.registry.lock();
        if let Some(key) = keys.get_mut(&self.key) {
            if !self.paused {
                key.active -= 1;
            }
            key.resolved += 1;
            key.notify.notify_waiters();
            if key.active == 0 {
                keys.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_after_the_free_failures_up_to_the_cap() {
        let settings = ThrottleSettings::default();
        let curve = Backoff::new(5, &settings);
        let secs = |n| curve.delay_micros(n) / 1_000_000;
        assert_eq!((secs(1), secs(5)), (0, 0), "free failures");
        assert_eq!((secs(6), secs(7), secs(8), secs(15)), (1, 2, 4, 512));
        assert_eq!(secs(16), 900, "capped at 15 minutes");
        assert_eq!(secs(100), 900);
        assert_eq!(curve.delay_micros(i64::MAX), 900_000_000);
    }

    #[test]
    fn extreme_settings_neither_overflow_nor_stall() {
        let settings = ThrottleSettings {
            base_delay: Duration::ZERO,
            max_delay: Duration::MAX,
            ..ThrottleSettings::default()
        };
        let curve = Backoff::new(0, &settings);
        assert_eq!(curve.delay_micros(1), 1);
        assert_eq!(curve.delay_micros(i64::MAX), i64::MAX / 4);
        assert!(curve.max_shift < 63);
    }

    #[test]
    fn addresses_are_keyed_by_ip_and_ipv6_by_its_64() {
        assert_eq!(address_key("10.1.2.3:4567"), "10.1.2.3");
        assert_eq!(
            address_key("[2001:db8:1:2:3:4:5:6]:443"),
            "2001:db8:1:2::/64"
        );
        assert_eq!(address_key("[2001:db8:1:2:ffff::1]:1"), "2001:db8:1:2::/64");
        assert_eq!(address_key("[::ffff:10.1.2.3]:80"), "10.1.2.3");
        assert_eq!(address_key(""), "unknown");
    }

    #[test]
    fn a_lock_wins_and_the_longest_delay_is_reported() {
        let settings = ThrottleSettings {
            lockout_failures: 10,
            ..ThrottleSettings::default()
        };
        let now = Timestamp::from_micros(1_000_000_000);
        let counter = |scope, failures, wait: i64, refusing| ThrottleCounter {
            scope,
            failures,
            blocked_until: Timestamp::from_micros(now.as_micros() + wait),
            refusing,
            first_refusal: false,
        };
        let account = counter(ThrottleScope::Account, 7, 2_000_000, true);
        let address = counter(ThrottleScope::Address, 30, 8_000_000, true);
        assert_eq!(
            settings.refusal(&[account.clone(), address], now),
            Refusal::Backoff(Duration::from_secs(8))
        );
        let idle = counter(ThrottleScope::Address, 1, 0, false);
        assert_eq!(
            settings.refusal(&[account, idle.clone()], now),
            Refusal::Backoff(Duration::from_secs(2))
        );
        let locked = counter(ThrottleScope::Account, 10, -5, true);
        assert_eq!(settings.refusal(&[locked, idle], now), Refusal::Locked);
    }
}
