//! The enforcement algorithms: how many units (requests or tokens) a key may spend, and when.
//!
//! Every function takes the time explicitly (as time since the simulator started), so the
//! algorithms are tested against hand-computed patterns without a clock.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How a limit is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    /// Generic cell rate: one unit every `window / amount`, with a burst. Smooth, no edges.
    #[default]
    Gcra,
    /// At most `amount` units in each window; windows start at multiples of `window`.
    FixedWindow,
    /// At most `amount` units in any `window` ending now (an exact log of what was spent).
    SlidingWindow,
}

/// `amount` units per `window`; `burst` units back to back under GCRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    /// Units allowed per window.
    pub amount: u64,
    /// The window.
    pub window: Duration,
    /// GCRA only: how many units may go back to back (at least 1).
    pub burst: u64,
    /// GCRA only: how early a unit may arrive before its exact turn. A server that timed
    /// arrivals to the nanosecond would refuse even a perfect client on a real network.
    pub tolerance: Duration,
}

impl Limit {
    /// `per_minute` units a minute, enforced over `window` (Together enforces per-minute limits
    /// per second). When fewer than one unit falls in a window, the window grows to one unit's
    /// share of the minute.
    pub fn per_minute(per_minute: u64, window: Duration, burst: u64) -> Self {
        let minute = Duration::from_secs(60);
        let per_minute = per_minute.max(1);
        let amount = (u128::from(per_minute) * window.as_nanos() / minute.as_nanos()) as u64;
        if amount == 0 {
            return Self {
                amount: 1,
                window: minute / u32::try_from(per_minute).unwrap_or(u32::MAX),
                burst: 1,
                tolerance: Duration::ZERO,
            };
        }
        Self {
            amount,
            window,
            burst: burst.clamp(1, amount),
            tolerance: Duration::ZERO,
        }
    }

    /// The same limit, with a GCRA tolerance.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    fn interval(&self) -> Duration {
        self.window / u32::try_from(self.amount.max(1)).unwrap_or(u32::MAX)
    }
}

/// What a meter said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the units were granted (and spent).
    pub allowed: bool,
    /// The limit per window, for `x-ratelimit-limit`.
    pub limit: u64,
    /// Units left now, for `x-ratelimit-remaining`.
    pub remaining: u64,
    /// Refused: how long until the request would be granted. Granted: how long until one
    /// more unit would be (zero while some remain), or for fixed windows, until the window
    /// ends. For `x-ratelimit-reset` ("the suggested retry interval") and `Retry-After`.
    pub reset: Duration,
}

/// One limit's state for one (key, class[, model]).
#[derive(Debug, Clone)]
pub struct Meter {
    limit: Limit,
    state: State,
}

#[derive(Debug, Clone)]
enum State {
    Gcra {
        tat: Duration,
    },
    Fixed {
        index: u128,
        used: u64,
    },
    Sliding {
        log: VecDeque<(Duration, u64)>,
        used: u64,
    },
}

impl Meter {
    /// A full meter.
    pub fn new(algorithm: Algorithm, limit: Limit) -> Self {
        let state = match algorithm {
            Algorithm::Gcra => State::Gcra {
                tat: Duration::ZERO,
            },
            Algorithm::FixedWindow => State::Fixed { index: 0, used: 0 },
            Algorithm::SlidingWindow => State::Sliding {
                log: VecDeque::new(),
                used: 0,
            },
        };
        Self { limit, state }
    }

    /// The limit it enforces.
    pub fn limit(&self) -> Limit {
        self.limit
    }

    /// Spends `cost` units at `now` if the limit allows; says what is left either way.
    pub fn check(&mut self, now: Duration, cost: u64) -> Verdict {
        let limit = &self.limit;
        match &mut self.state {
            State::Gcra { tat } => gcra(limit, tat, now, cost),
            State::Fixed { index, used } => fixed_window(limit, index, used, now, cost),
            State::Sliding { log, used } => sliding_window(limit, log, used, now, cost),
        }
    }

    /// Whether this meter needs no memory any more: nothing spent is still held at `now`.
    pub fn is_full(&self, now: Duration) -> bool {
        match &self.state {
            State::Gcra { tat } => *tat <= now,
            State::Fixed { index, used } => {
                *used == 0 || now.as_nanos() / self.limit.window.as_nanos().max(1) != *index
            }
            State::Sliding { log, .. } => log
                .back()
                .is_none_or(|&(at, _)| at.saturating_add(self.limit.window) <= now),
        }
    }
}

/// GCRA: the theoretical arrival time `tat` moves by one interval a unit.
fn gcra(limit: &Limit, tat: &mut Duration, now: Duration, cost: u64) -> Verdict {
    let interval = limit.interval();
    // The bucket holds `burst` intervals; a request adds `cost` of them.
    let capacity = interval.saturating_mul(u32::try_from(limit.burst).unwrap_or(u32::MAX));
    let start = (*tat).max(now);
    let new_tat =
        start.saturating_add(interval.saturating_mul(u32::try_from(cost).unwrap_or(u32::MAX)));
    let fill = new_tat - now;
    let allowed = fill <= capacity.saturating_add(limit.tolerance);
    if allowed {
        *tat = new_tat;
    }
    let held = (*tat).max(now) - now;
    let remaining = capacity.saturating_sub(held).as_nanos() / interval.as_nanos().max(1);
    // When one more unit would fit: the bucket must drain to `capacity + tolerance` less one
    // interval.
    let room = capacity.saturating_add(limit.tolerance);
    let reset = if allowed {
        held.saturating_add(interval).saturating_sub(room)
    } else {
        fill - room
    };
    Verdict {
        allowed,
        limit: limit.amount,
        remaining: remaining as u64,
        reset,
    }
}

/// A fixed window: `used` units in the window numbered `index`.
fn fixed_window(
    limit: &Limit,
    index: &mut u128,
    used: &mut u64,
    now: Duration,
    cost: u64,
) -> Verdict {
    let current = now.as_nanos() / limit.window.as_nanos().max(1);
    if current != *index {
        *index = current;
        *used = 0;
    }
    let allowed = used.saturating_add(cost) <= limit.amount;
    if allowed {
        *used += cost;
    }
    let window_end = limit.window.as_nanos() * (current + 1);
    let reset = Duration::from_nanos((window_end - now.as_nanos()) as u64);
    Verdict {
        allowed,
        limit: limit.amount,
        remaining: limit.amount.saturating_sub(*used),
        reset,
    }
}

/// A sliding window: an exact `log` of what was spent in the last window, `used` in all.
fn sliding_window(
    limit: &Limit,
    log: &mut VecDeque<(Duration, u64)>,
    used: &mut u64,
    now: Duration,
    cost: u64,
) -> Verdict {
    while let Some(&(at, spent)) = log.front() {
        if at.saturating_add(limit.window) > now {
            break;
        }
        log.pop_front();
        *used -= spent;
    }
    let allowed = used.saturating_add(cost) <= limit.amount;
    if allowed {
        log.push_back((now, cost));
        *used += cost;
    }
    // Until enough of the oldest spending leaves the window to fit `cost` (or, when granted,
    // one more unit; zero while some remain).
    let cost = if allowed { 1 } else { cost };
    let mut need = used.saturating_add(cost).saturating_sub(limit.amount);
    let mut reset = Duration::ZERO;
    for &(at, spent) in log.iter() {
        if need == 0 {
            break;
        }
        reset = at.saturating_add(limit.window).saturating_sub(now);
        need = need.saturating_sub(spent);
    }
    Verdict {
        allowed,
        limit: limit.amount,
        remaining: limit.amount.saturating_sub(*used),
        reset,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    /// Sends one unit at each time; returns which were granted.
    fn pattern(algorithm: Algorithm, limit: Limit, times_ms: &[u64]) -> Vec<bool> {
        let mut meter = Meter::new(algorithm, limit);
        times_ms
            .iter()
            .map(|&at| meter.check(ms(at), 1).allowed)
            .collect()
    }

    // 600 a minute enforced per second: 10 a second.
    fn ten_a_second(burst: u64) -> Limit {
        Limit::per_minute(600, Duration::from_secs(1), burst)
    }

    #[test]
    fn per_minute_limits_become_per_window_limits() {
        assert_eq!(
            ten_a_second(1),
            Limit {
                amount: 10,
                window: ms(1_000),
                burst: 1,
                tolerance: Duration::ZERO,
            }
        );
        assert_eq!(
            Limit::per_minute(30, ms(1_000), 5),
            Limit {
                amount: 1,
                window: ms(2_000),
                burst: 1,
                tolerance: Duration::ZERO,
            }
        );
        assert_eq!(Limit::per_minute(600, ms(1_000), 50).burst, 10);
    }

    #[test]
    fn gcra_spaces_requests_evenly_and_allows_its_burst() {
        // Burst 1: one every 100 ms; a request 50 ms early is refused.
        let times = [0, 100, 150, 200, 250, 299, 300];
        assert_eq!(
            pattern(Algorithm::Gcra, ten_a_second(1), &times),
            [true, true, false, true, false, false, true]
        );
        // A tolerance of 5 ms lets a unit come up to 5 ms before its turn, and no earlier.
        let tolerant = ten_a_second(1).with_tolerance(ms(5));
        assert_eq!(
            pattern(Algorithm::Gcra, tolerant, &[0, 95, 189, 195]),
            [true, true, false, true]
        );
        // Burst 3: three at once, the fourth must wait for the first interval.
        let times = [0, 0, 0, 0, 100, 100];
        assert_eq!(
            pattern(Algorithm::Gcra, ten_a_second(3), &times),
            [true, true, true, false, true, false]
        );
    }

    #[test]
    fn fixed_windows_allow_their_amount_in_each_window_even_at_the_edge() {
        // Ten at 990 ms and ten more at 1,000 ms: twenty in 10 ms, all allowed (the edge burst).
        let mut times = vec![990; 11];
        times.extend([1_000; 11]);
        let expected: Vec<bool> = (0..22).map(|i| i % 11 != 10).collect();
        assert_eq!(
            pattern(Algorithm::FixedWindow, ten_a_second(1), &times),
            expected
        );
    }

    #[test]
    fn sliding_windows_count_every_window_that_ends_now() {
        // Ten at 990 ms; at 1,000 ms the window (0, 1000] still holds them: refused until 1,990.
        let mut times = vec![990; 10];
        times.extend([1_000, 1_989, 1_990, 1_990]);
        let mut expected = vec![true; 10];
        expected.extend([false, false, true, true]);
        assert_eq!(
            pattern(Algorithm::SlidingWindow, ten_a_second(1), &times),
            expected
        );
    }

    #[test]
    fn verdicts_say_what_remains_and_when_to_come_back() {
        let mut gcra = Meter::new(Algorithm::Gcra, ten_a_second(1));
        assert_eq!(
            gcra.check(ms(0), 1),
            Verdict {
                allowed: true,
                limit: 10,
                remaining: 0,
                reset: ms(100)
            }
        );
        assert_eq!(
            gcra.check(ms(30), 1),
            Verdict {
                allowed: false,
                limit: 10,
                remaining: 0,
                reset: ms(70)
            }
        );

        let mut fixed = Meter::new(Algorithm::FixedWindow, ten_a_second(1));
        assert_eq!(fixed.check(ms(250), 4).remaining, 6);
        let refused = fixed.check(ms(400), 7);
        assert_eq!(
            (refused.allowed, refused.remaining, refused.reset),
            (false, 6, ms(600))
        );

        let mut sliding = Meter::new(Algorithm::SlidingWindow, ten_a_second(1));
        sliding.check(ms(100), 6);
        sliding.check(ms(300), 4);
        let refused = sliding.check(ms(500), 5);
        // Five units must leave: the six spent at 100 ms leave at 1,100 ms.
        assert_eq!(
            (refused.allowed, refused.remaining, refused.reset),
            (false, 0, ms(600))
        );
    }

    #[test]
    fn tokens_are_spent_by_weight() {
        // 180,000 tokens a minute: 3,000 a second.
        let limit = Limit::per_minute(180_000, ms(1_000), 3_000);
        for algorithm in [
            Algorithm::Gcra,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let mut meter = Meter::new(algorithm, limit);
            assert!(meter.check(ms(0), 2_000).allowed, "{algorithm:?}");
            assert!(!meter.check(ms(10), 1_500).allowed, "{algorithm:?}");
            assert!(meter.check(ms(20), 1_000).allowed, "{algorithm:?}");
            assert!(meter.check(ms(1_500), 2_500).allowed, "{algorithm:?}");
        }
    }

    #[test]
    fn meters_know_when_they_hold_nothing() {
        for algorithm in [
            Algorithm::Gcra,
            Algorithm::FixedWindow,
            Algorithm::SlidingWindow,
        ] {
            let mut meter = Meter::new(algorithm, ten_a_second(1));
            assert!(meter.is_full(ms(0)));
            meter.check(ms(0), 1);
            assert!(!meter.is_full(ms(50)), "{algorithm:?}");
            assert!(meter.is_full(ms(1_000)), "{algorithm:?}");
        }
    }
}
