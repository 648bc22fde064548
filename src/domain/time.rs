//! Time as the domain sees it: whole microseconds since the Unix epoch, the
//! precision both stores keep exactly.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

    /// The current time.
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
