//! Injected time: a [`Clock`] trait with the system clock and a manual clock for tests.
//!
//! Everything time-dependent (consent timestamps, retention, caps, buckets, releases) asks a
//! `Clock` for "now" instead of calling `SystemTime::now()`, so tests of "two hours later"
//! advance a [`ManualClock`] and never sleep.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time as milliseconds since the Unix epoch (UTC).
///
/// Milliseconds are enough for every rule hexveil applies and keep stored times one `i64`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Seconds since the Unix epoch, rounded down.
    pub fn seconds(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// `self + d`, saturating.
    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(duration_millis(d)))
    }

    /// `self - d`, saturating.
    pub fn minus(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(duration_millis(d)))
    }

    /// A time from outside (seconds and nanoseconds since the Unix epoch, as on the wire),
    /// if it is valid and within [`ACCEPTED`]: the one bound every API applies (a field
    /// may narrow it further, e.g. a report cannot come from the future).
    pub fn from_unix(seconds: i64, nanos: i32) -> Option<Timestamp> {
        if !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        let ms = seconds
            .checked_mul(1000)?
            .checked_add(i64::from(nanos / 1_000_000))?;
        Timestamp::from_unix_millis(ms)
    }

    /// A time from outside in milliseconds since the Unix epoch, if within [`ACCEPTED`].
    pub fn from_unix_millis(ms: i64) -> Option<Timestamp> {
        ACCEPTED.contains(&ms).then_some(Timestamp(ms))
    }
}

/// Times accepted from outside, in milliseconds: 1970-01-01 up to 3000-01-01.
pub const ACCEPTED: std::ops::RangeInclusive<i64> = 0..=32_503_680_000_000;

/// A duration in whole milliseconds, saturating at `i64::MAX`.
pub fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO);
        Timestamp(duration_millis(since))
    }
}

/// A clock that only moves when told to; cheap to clone, all clones share one time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: Timestamp) -> Self {
        ManualClock {
            now: Arc::new(AtomicI64::new(start.0)),
        }
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.now.fetch_add(duration_millis(d), Ordering::SeqCst);
    }

    /// Sets the clock to `t` (which may be in the past).
    pub fn set(&self, t: Timestamp) {
        self.now.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.now.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_from_outside_share_one_bound() {
        assert_eq!(Timestamp::from_unix(1, 500_000_000), Some(Timestamp(1500)));
        assert_eq!(Timestamp::from_unix(-1, 0), None);
        assert_eq!(Timestamp::from_unix(0, -1), None);
        assert_eq!(Timestamp::from_unix(0, 1_000_000_000), None);
        assert_eq!(Timestamp::from_unix(i64::MAX, 0), None, "no overflow");
        assert!(Timestamp::from_unix(32_503_680_000, 0).is_some());
        assert_eq!(Timestamp::from_unix(32_503_680_001, 0), None);
        assert_eq!(Timestamp::from_unix_millis(32_503_680_000_001), None);
    }

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_time() {
        let clock = ManualClock::new(Timestamp(1_000));
        let other = clock.clone();
        assert_eq!(clock.now(), Timestamp(1_000));
        other.advance(Duration::from_secs(2 * 3600));
        assert_eq!(clock.now(), Timestamp(1_000 + 7_200_000));
        clock.set(Timestamp(5));
        assert_eq!(other.now(), Timestamp(5));
    }

    #[test]
    fn system_clock_is_after_2020() {
        assert!(SystemClock.now().seconds() > 1_577_836_800);
    }
}
