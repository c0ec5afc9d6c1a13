//! The GCRA decision, as governor makes it, plus what governor cannot do: change the rate of a
//! live bucket without handing out a burst, give back a turn, and charge or refund a
//! correction after the fact.
//!
//! A bucket is one number, its theoretical arrival time (TAT): the time at which it would be
//! empty again if nothing more were sent. A unit costs one `interval`; a cost of `n` units
//! may go when `tat + (n - 1) * interval - tau <= now`, where `tau` is what the bucket holds
//! beyond one unit (the burst less one, plus the pacing tolerance). Times are nanoseconds on
//! the limiter's clock. A property test checks that, for a fixed rate, every decision is the
//! one governor's `RateLimiter` makes.

use std::num::NonZeroU64;
use std::time::Duration;

use crate::quota::Rate;

/// A rate as GCRA uses it: the cost of one unit and the tolerance, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    /// Nanoseconds per unit; never zero, which lets an `Option<Gcra>` cost no more than a
    /// `Gcra` (each bucket holds two).
    pub(crate) interval: NonZeroU64,
    /// Nanoseconds the bucket holds beyond one unit.
    pub(crate) tau: u64,
}

impl Params {
    /// The pace of a configured rate: its interval, and its burst less one plus its tolerance.
    pub(crate) fn of(rate: &Rate) -> Self {
        let interval = nanos(rate.interval()).max(1);
        Self {
            interval: at_least_one(interval),
            tau: interval
                .saturating_mul(u64::from(rate.burst().max(1) - 1))
                .saturating_add(nanos(rate.tolerance())),
        }
    }

    /// `per_second` units a second, with a burst and a tolerance (kept below one interval).
    pub(crate) fn at_rate(per_second: f64, burst: u32, tolerance: Duration) -> Self {
        let interval = (1e9 / per_second.max(1e-9)).clamp(1.0, u64::MAX as f64) as u64;
        Self {
            interval: at_least_one(interval),
            tau: interval
                .saturating_mul(u64::from(burst.max(1) - 1))
                .saturating_add(nanos(tolerance).min(interval.saturating_sub(1))),
        }
    }

    /// The most units one decision may take: the whole bucket.
    pub(crate) fn capacity(&self) -> u64 {
        1 + self.tau / self.interval.get()
    }
}

/// An interval of `nanos`, or one nanosecond if that is zero.
pub(crate) fn at_least_one(nanos: u64) -> NonZeroU64 {
    NonZeroU64::new(nanos).unwrap_or(NonZeroU64::MIN)
}

/// Nanoseconds of a duration, saturating.
pub(crate) fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// One GCRA bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    tat: u64,
    pace: Params,
}

impl Gcra {
    /// A full bucket.
    pub(crate) fn new(pace: Params) -> Self {
        Self { tat: 0, pace }
    }

    /// How long until `cost` units may go: zero if now. `None` if `cost` is more than the
    /// whole bucket holds, so that no wait would ever be enough.
    pub(crate) fn wait(&self, cost: u64, now: u64) -> Option<u64> {
        if cost == 0 {
            return Some(0);
        }
        // The whole bucket always holds one unit: only a larger cost pays for the division.
        if cost > 1 && cost > self.pace.capacity() {
            return None;
        }
        let extra = (cost - 1).saturating_mul(self.pace.interval.get());
        let earliest = self.tat.saturating_add(extra).saturating_sub(self.pace.tau);
        Some(earliest.saturating_sub(now))
    }

    /// Takes `cost` units, which [`Gcra::wait`] said may go now.
    pub(crate) fn take(&mut self, cost: u64, now: u64) {
        self.tat = self
            .tat
            .max(now)
            .saturating_add(cost.saturating_mul(self.pace.interval.get()));
    }

    /// Gives back `cost` units taken earlier and not used (or charged too much): the bucket
    /// refills by that much, never beyond full.
    pub(crate) fn give_back(&mut self, cost: u64, now: u64) {
        let refund = cost.saturating_mul(self.pace.interval.get());
        // Below `now` the bucket is full whatever the number says; keep it at `now`, so a later
        // rate change does not rescale a debt that is not there.
        self.tat = self.tat.saturating_sub(refund).max(now.min(self.tat));
    }

    /// Charges `cost` more units after the fact (a correction): the bucket may go into debt,
    /// so later requests wait longer.
    pub(crate) fn charge(&mut self, cost: u64, now: u64) {
        self.take(cost, now);
    }

    /// Changes the rate of a live bucket. What it holds is kept as a share of the bucket, so a
    /// drained bucket stays drained and no change hands out a fresh burst.
    pub(crate) fn set_pace(&mut self, pace: Params, now: u64) {
        let debt = self.tat.saturating_sub(now);
        if debt > 0 && pace.interval != self.pace.interval {
            let scaled = u128::from(debt) * u128::from(pace.interval.get())
                / u128::from(self.pace.interval.get());
            self.tat = now.saturating_add(u64::try_from(scaled).unwrap_or(u64::MAX));
        }
        self.pace = pace;
    }

    /// How long until the bucket is full again.
    pub(crate) fn until_rest(&self, now: u64) -> u64 {
        self.tat.saturating_sub(now)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use governor::clock::Clock;
    use governor::nanos::Nanos;
    use governor::{Quota, RateLimiter};
    use proptest::prelude::*;

    use super::*;

    const MS: u64 = 1_000_000;

    /// A clock the test moves by hand, for governor.
    #[derive(Debug, Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl Clock for ManualClock {
        type Instant = Nanos;

        fn now(&self) -> Nanos {
            Nanos::from(self.0.load(Ordering::SeqCst))
        }
    }

    fn pace(per_second: u32, burst: u32) -> Params {
        Params::of(
            &Rate::per_second(per_second)
                .with_burst(burst)
                .with_tolerance(Duration::ZERO),
        )
    }

    proptest! {
        /// For a fixed rate, every decision is governor's: same yes or no, same wait.
        #[test]
        fn decisions_are_governors(
            per_second in 1u32..1_000,
            burst_fraction in 0.0f64..1.0,
            steps in proptest::collection::vec((0u64..300 * MS, 1u32..4), 1..200),
        ) {
            let burst = 1 + ((f64::from(per_second) - 1.0) * burst_fraction) as u32;
            let clock = ManualClock::default();
            let quota = Quota::per_second(NonZeroU32::new(per_second).unwrap())
                .allow_burst(NonZeroU32::new(burst).unwrap());
            let governor = RateLimiter::direct_with_clock(quota, clock.clone());
            let mut ours = Gcra::new(Params::of(&Rate::from_quota(quota).with_tolerance(Duration::ZERO)));
            let mut now = 0;
            for (gap, cost) in steps {
                now += gap;
                clock.0.store(now, Ordering::SeqCst);
                let theirs = governor.check_n(NonZeroU32::new(cost).unwrap());
                match (ours.wait(u64::from(cost), now), theirs) {
                    (None, Err(_)) => {}
                    (Some(0), Ok(Ok(()))) => ours.take(u64::from(cost), now),
                    (Some(wait), Ok(Err(not_until))) => {
                        let their_wait = not_until.wait_time_from(Nanos::from(now));
                        prop_assert_eq!(Duration::from_nanos(wait), their_wait);
                    }
                    (mine, theirs) => prop_assert!(false, "at {now}: ours {mine:?}, governor {theirs:?}"),
                }
            }
        }

        /// Giving back what was taken leaves the bucket as if it had not been taken.
        #[test]
        fn a_turn_given_back_is_as_if_never_taken(
            per_second in 1u32..1_000,
            burst in 1u32..10,
            before in proptest::collection::vec(0u64..50 * MS, 0..20),
            gap in 0u64..100 * MS,
        ) {
            let mut bucket = Gcra::new(pace(per_second.max(burst), burst));
            let mut now = 0;
            for step in before {
                now += step;
                if bucket.wait(1, now) == Some(0) {
                    bucket.take(1, now);
                }
            }
            let untouched = bucket;
            if bucket.wait(1, now) == Some(0) {
                bucket.take(1, now);
                now += gap;
                bucket.give_back(1, now);
                prop_assert_eq!(bucket.wait(1, now), untouched.wait(1, now));
            }
        }
    }

    #[test]
    fn a_rate_change_keeps_the_share_of_the_bucket_so_no_burst_is_handed_out() {
        // 10/s, burst 1: drained at 0, next turn at 100 ms.
        let mut bucket = Gcra::new(pace(10, 1));
        bucket.take(1, 0);
        assert_eq!(bucket.wait(1, 0), Some(100 * MS));
        // Halved at 40 ms: the 60 ms still owed become 120 ms.
        bucket.set_pace(pace(5, 1), 40 * MS);
        assert_eq!(bucket.wait(1, 40 * MS), Some(120 * MS));
        // Doubled: what is owed halves, and no more goes at once than before.
        let mut bucket = Gcra::new(pace(10, 5));
        for _ in 0..5 {
            bucket.take(1, 0);
        }
        assert_eq!(bucket.wait(1, 0), Some(100 * MS));
        bucket.set_pace(pace(20, 5), 0);
        assert_eq!(bucket.wait(1, 0), Some(50 * MS));
        // A full bucket stays full, holding the new burst.
        let mut rested = Gcra::new(pace(10, 5));
        rested.set_pace(pace(1, 5), 0);
        assert_eq!(rested.wait(5, 0), Some(0));
    }

    #[test]
    fn costs_beyond_the_bucket_never_fit_and_corrections_move_the_bucket() {
        let mut tokens = Gcra::new(Params::of(
            &Rate::per_second(1_000)
                .with_burst(1_000)
                .with_tolerance(Duration::ZERO),
        ));
        assert_eq!(tokens.wait(1_001, 0), None);
        assert_eq!(tokens.wait(1_000, 0), Some(0));
        tokens.take(800, 0);
        assert_eq!(tokens.wait(300, 0), Some(100 * MS));
        // 500 of the 800 were not used: they come back.
        tokens.give_back(500, 0);
        assert_eq!(tokens.wait(700, 0), Some(0));
        // 900 more were used than charged: later requests wait for them.
        tokens.charge(900, 0);
        assert_eq!(tokens.wait(1, 0), Some(201 * MS));
        assert_eq!(tokens.until_rest(0), 1_200 * MS);
        assert_eq!(tokens.until_rest(1_200 * MS), 0);
    }
}
