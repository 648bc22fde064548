//! Time as the domain sees it: whole microseconds since the Unix epoch, the
//! precision both stores keep exactly, read through a [`Clock`] (the
//! domain's one port to the current time) so that tests can move it.

use std::{
    fmt,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

/// Where the domain reads the current time: every expiry, throttle window,
/// grace period and audit time the use cases judge is judged at
/// [`Clock::now`] of the clock the service was built with. (Monotonic
/// waits and timeouts use `Instant`, and retention judges ages by the
/// database's clock.)
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system's clock: the one production runs on.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock tests move: the system's time plus an offset that only
/// [`Self::advance`] and [`Self::set`] change, so that time still passes
/// (ordering, last-use intervals) and a test can jump past an expiry or a
/// throttle window instead of sleeping. It starts at the system time.
/// Share it (`Arc`) between the test and the service.
#[derive(Debug, Default)]
pub struct ManualClock {
    /// Microseconds added to the system time.
    offset: AtomicI64,
}

impl ManualClock {
    /// A clock at the system time.
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        let micros = i64::try_from(by.as_micros()).unwrap_or(i64::MAX);
        self.offset.fetch_add(micros, Ordering::SeqCst);
    }

    /// Sets the clock to `at` (it then runs on from there).
    pub fn set(&self, at: Timestamp) {
        let offset = at.as_micros().saturating_sub(Timestamp::now().as_micros());
        self.offset.store(offset, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        let now = Timestamp::now().as_micros();
        Timestamp::from_micros(now.saturating_add(self.offset.load(Ordering::SeqCst)))
    }
}

/// An instant, in microseconds since 1970-01-01T00:00:00Z.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    /// The earliest instant accepted from a client: 0001-01-01T00:00:00Z,
    /// protobuf's lower bound for `Timestamp`.
    pub const MIN: Timestamp = Timestamp(-62_135_596_800 * 1_000_000);
    /// The latest instant accepted from a client: the last microsecond of
    /// 9999-12-31, so that protobuf's upper bound for `Timestamp`
    /// (9999-12-31T23:59:59.999999999Z) is accepted too, truncated.
    pub const MAX: Timestamp = Timestamp(253_402_300_799 * 1_000_000 + 999_999);

    /// The system's current time. The domain reads the time through a
    /// [`Clock`] instead (see [`SystemClock`]).
    pub fn now() -> Self {
        let micros = match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(since) => i64::try_from(since.as_micros()).unwrap_or(i64::MAX),
            Err(before) => -i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX),
        };
        Self(micros)
    }

    /// From microseconds since the epoch (as stored).
    pub const fn from_micros(micros: i64) -> Self {
        Self(micros)
    }

    /// Microseconds since the epoch.
    pub const fn as_micros(self) -> i64 {
        self.0
    }

    /// Splits into whole seconds and nanoseconds (0..1e9), as protobuf wants.
    pub fn to_seconds_nanos(self) -> (i64, i32) {
        let seconds = self.0.div_euclid(1_000_000);
        let nanos = (self.0.rem_euclid(1_000_000) * 1_000) as i32;
        (seconds, nanos)
    }

    /// From seconds and nanoseconds; `None` outside [`Self::MIN`]..=[`Self::MAX`]
    /// or with nanoseconds outside 0..1e9. Sub-microsecond precision is
    /// truncated.
    pub fn from_seconds_nanos(seconds: i64, nanos: i32) -> Option<Self> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        let micros = seconds
            .checked_mul(1_000_000)?
            .checked_add(i64::from(nanos / 1_000))?;
        let ts = Self(micros);
        (Self::MIN..=Self::MAX).contains(&ts).then_some(ts)
    }

    /// This instant plus `duration`, saturating at the far future.
    pub fn saturating_add(self, duration: Duration) -> Self {
        let micros = i64::try_from(duration.as_micros()).unwrap_or(i64::MAX);
        Self(self.0.saturating_add(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_nanos_round_trip_before_and_after_the_epoch() {
        for micros in [0, 1, -1, 1_500_000, -1_500_000, 1_700_000_000_123_456] {
            let ts = Timestamp::from_micros(micros);
            let (s, n) = ts.to_seconds_nanos();
            assert!((0..1_000_000_000).contains(&n));
            assert_eq!(Timestamp::from_seconds_nanos(s, n), Some(ts));
        }
    }

    #[test]
    fn out_of_range_inputs_are_refused() {
        assert_eq!(Timestamp::from_seconds_nanos(0, -1), None);
        assert_eq!(Timestamp::from_seconds_nanos(0, 1_000_000_000), None);
        assert_eq!(Timestamp::from_seconds_nanos(i64::MAX, 0), None);
        assert_eq!(Timestamp::from_seconds_nanos(253_402_300_800, 0), None);
        assert_eq!(
            Timestamp::from_seconds_nanos(-62_135_596_801, 999_999_999),
            None
        );
    }

    #[test]
    fn a_manual_clock_starts_at_the_system_time_and_moves_when_told() {
        let clock = ManualClock::new();
        let before = Timestamp::now();
        let start = clock.now();
        assert!(start >= before && start <= Timestamp::now());
        clock.advance(Duration::from_secs(3600));
        assert!(clock.now() >= before.saturating_add(Duration::from_secs(3600)));
        assert!(clock.now() > Timestamp::now());
        let far = Timestamp::from_micros(4_000_000_000_000_000);
        clock.set(far);
        let now = clock.now();
        assert!(now >= far && now < far.saturating_add(Duration::from_secs(60)));
        assert!(SystemClock.now() < far);
    }

    #[test]
    fn protobufs_whole_range_is_accepted() {
        assert_eq!(
            Timestamp::from_seconds_nanos(-62_135_596_800, 0),
            Some(Timestamp::MIN)
        );
        assert_eq!(
            Timestamp::from_seconds_nanos(253_402_300_799, 999_999_999),
            Some(Timestamp::MAX)
        );
    }
}
