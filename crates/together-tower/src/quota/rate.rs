use std::fmt;
use std::num::NonZeroU32;
use std::time::Duration;

use super::error::{Problem, QuotaError};

/// So many units (requests, or tokens for a token quota) per period, with a burst: one GCRA
/// quota.
///
/// A rate of `n` per `period` lets one unit through every `period / n`; the burst is how many
/// may go back to back after a quiet spell. The default burst is 1: Together enforces
/// per-minute limits per second and recommends steady traffic, so the safe default is to
/// spread requests evenly.
///
/// It converts to and from governor's [`Quota`](governor::Quota) ([`Rate::to_quota`],
/// [`Rate::from_quota`]), so a quota written for governor works here unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    amount: u32,
    period: Duration,
    burst: u32,
    tolerance: Option<Duration>,
}

impl Rate {
    /// `amount` per `period`, with a burst of 1.
    pub const fn new(amount: u32, period: Duration) -> Self {
        Self {
            amount,
            period,
            burst: 1,
            tolerance: None,
        }
    }

    /// `amount` per second.
    pub const fn per_second(amount: u32) -> Self {
        Self::new(amount, Duration::from_secs(1))
    }

    /// `amount` per minute.
    pub const fn per_minute(amount: u32) -> Self {
        Self::new(amount, Duration::from_secs(60))
    }

    /// `amount` per hour.
    pub const fn per_hour(amount: u32) -> Self {
        Self::new(amount, Duration::from_secs(3_600))
    }

    /// The rate of a governor quota: one unit per replenish interval, with its burst.
    pub fn from_quota(quota: governor::Quota) -> Self {
        Self::new(1, quota.replenish_interval()).with_burst_unchecked(quota.burst_size().get())
    }

    /// The same rate as a governor quota, if it is valid.
    pub fn to_quota(&self) -> Option<governor::Quota> {
        let burst = NonZeroU32::new(self.burst)?;
        (self.amount > 0)
            .then(|| governor::Quota::with_period(self.interval()))
            .flatten()
            .map(|quota| quota.allow_burst(burst))
    }

    /// The same rate with another burst. It must be between 1 and the amount per period.
    pub const fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    // A governor quota may allow a burst above one period's amount.
    const fn with_burst_unchecked(mut self, burst: u32) -> Self {
        self.burst = burst;
        self.amount = if burst > self.amount {
            burst
        } else {
            self.amount
        };
        self.period = match self.period.checked_mul(self.amount) {
            Some(period) => period,
            None => Duration::MAX,
        };
        self
    }

    /// Units per period.
    pub const fn amount(&self) -> u32 {
        self.amount
    }

    /// The period.
    pub const fn period(&self) -> Duration {
        self.period
    }

    /// How many units may go back to back.
    pub const fn burst(&self) -> u32 {
        self.burst
    }

    /// The steady spacing between units: `period / amount`.
    pub fn interval(&self) -> Duration {
        self.period / self.amount.max(1)
    }

    /// Units per second, as a float (for adapting and reporting rates).
    pub fn per_second_f64(&self) -> f64 {
        f64::from(self.amount) / self.period.as_secs_f64().max(f64::MIN_POSITIVE)
    }

    /// How long a bucket of this rate takes to refill completely after being emptied.
    pub fn refill_time(&self) -> Duration {
        self.interval()
            .saturating_mul(self.burst)
            .saturating_add(self.tolerance())
    }

    /// The same rate with another pacing tolerance: how much before its exact turn a request
    /// may go. It must be below one interval; use the burst for whole requests.
    pub const fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = Some(tolerance);
        self
    }

    /// How much before its exact turn a request may go. By default the smaller of 2 ms and
    /// half an interval.
    ///
    /// Timers fire late (tokio's by up to about a millisecond), and a GCRA bucket that is
    /// asked late starts its next interval from the late moment: over a run, a pacing of 10
    /// requests a second would lose about 1% of the quota. With a tolerance the waiting
    /// request wakes that much early, so a late timer lands on its exact turn and the
    /// schedule keeps to the quota. A request can thus go at most `tolerance` early, which
    /// any server that counts per second (as Together does) allows.
    pub fn tolerance(&self) -> Duration {
        self.tolerance
            .unwrap_or_else(|| Duration::from_millis(2).min(self.interval() / 2))
    }

    pub(super) fn validate(&self, group: &str) -> Result<(), QuotaError> {
        let error = |problem| QuotaError::new(group, problem);
        if self.amount == 0 || self.period.is_zero() {
            return Err(error(Problem::ZeroRate));
        }
        if self.burst == 0 {
            return Err(error(Problem::ZeroBurst));
        }
        if self.burst > self.amount {
            return Err(error(Problem::BurstExceedsRate {
                burst: self.burst,
                amount: self.amount,
                period: self.period,
            }));
        }
        if self
            .tolerance
            .is_some_and(|tolerance| tolerance >= self.interval())
        {
            return Err(error(Problem::ToleranceTooLarge {
                tolerance: self.tolerance(),
                interval: self.interval(),
            }));
        }
        if self.interval().is_zero() {
            return Err(error(Problem::RateTooFine {
                amount: self.amount,
                period: self.period,
            }));
        }
        Ok(())
    }

    /// `N/s`, `N/min` or `N/h` (also `sec`, `second`, `m`, `minute`, `hour`).
    pub(super) fn parse(text: &str) -> Option<Rate> {
        let (count, unit) = text.split_once('/')?;
        let amount = count.trim().parse().ok()?;
        let period = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3_600),
            _ => return None,
        };
        Some(Rate::new(amount, period))
    }
}

/// Reads a rate as the quota file writes it: `N/s`, `N/min` or `N/h` (also `sec`, `second`,
/// `m`, `minute`, `hour`), with a burst of 1.
///
/// ```
/// use together_tower::quota::Rate;
///
/// let rate: Rate = "600/min".parse().unwrap();
/// assert_eq!(rate, Rate::per_minute(600));
/// assert!("600 a minute".parse::<Rate>().is_err());
/// ```
impl std::str::FromStr for Rate {
    type Err = InvalidRate;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Rate::parse(text).ok_or_else(|| InvalidRate(super::error::excerpt(text)))
    }
}

/// A rate that does not read as `N/s`, `N/min` or `N/h`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidRate(String);

impl fmt::Display for InvalidRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} is not a rate; write it as requests per s, min or h, such as \"600/min\"",
            self.0
        )
    }
}

impl std::error::Error for InvalidRate {}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.period.as_secs() {
            1 if self.period.subsec_nanos() == 0 => write!(f, "{}/s", self.amount)?,
            60 if self.period.subsec_nanos() == 0 => write!(f, "{}/min", self.amount)?,
            3_600 if self.period.subsec_nanos() == 0 => write!(f, "{}/h", self.amount)?,
            _ => write!(f, "{} per {:?}", self.amount, self.period)?,
        }
        write!(f, " (burst {})", self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn governor_quotas_convert_both_ways() {
        let quota = governor::Quota::per_second(NonZeroU32::new(10).unwrap())
            .allow_burst(NonZeroU32::new(3).unwrap());
        let rate = Rate::from_quota(quota);
        assert_eq!(rate.interval(), Duration::from_millis(100));
        assert_eq!(rate.burst(), 3);
        assert_eq!(rate.to_quota(), Some(quota));
        assert_eq!(
            Rate::per_minute(600)
                .to_quota()
                .unwrap()
                .replenish_interval(),
            Duration::from_millis(100)
        );
        assert_eq!(Rate::per_minute(0).to_quota(), None);
        // A governor quota's burst may be larger than one period's amount.
        let bursty = governor::Quota::per_second(NonZeroU32::new(1).unwrap())
            .allow_burst(NonZeroU32::new(5).unwrap());
        let rate = Rate::from_quota(bursty);
        assert!(rate.validate("g").is_ok());
        assert_eq!(rate.interval(), Duration::from_secs(1));
    }
}
