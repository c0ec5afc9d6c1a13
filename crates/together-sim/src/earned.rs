//! Together's earned rate: a key's limit follows its own recent success.
//!
//! Since 2026 Together's limits are dynamic: about twice the key's recent successful rate,
//! between a base and a cap. Sustained, growing traffic raises the limit; a spike far above
//! what was earned is refused with a 429 whose body says `dynamic_request_limited`, and
//! successes carry no rate-limit headers. With [`Earned`] set, every limited class of the
//! simulator counts that way, on top of its table limits: a request is refused when the
//! requests served in the last second reach the earned rate.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::meter::Verdict;

/// The earned-rate rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Earned {
    /// Where every key starts, and the least it ever allows, requests a minute.
    pub base_rpm: u64,
    /// The most it ever allows, requests a minute.
    pub cap_rpm: u64,
    /// The span successes are counted over, in milliseconds.
    #[serde(default = "default_window_ms")]
    pub window_ms: u64,
    /// The limit as a multiple of the successful rate over that span.
    #[serde(default = "default_factor")]
    pub factor: f64,
}

fn default_window_ms() -> u64 {
    10_000
}

fn default_factor() -> f64 {
    2.0
}

impl Earned {
    /// Base and cap in requests a minute, successes counted over ten seconds, twice.
    pub fn new(base_rpm: u64, cap_rpm: u64) -> Self {
        Self {
            base_rpm,
            cap_rpm,
            window_ms: default_window_ms(),
            factor: default_factor(),
        }
    }

    /// Whether the rule makes sense.
    pub fn validate(&self) -> Result<(), String> {
        if self.base_rpm == 0 || self.cap_rpm < self.base_rpm {
            return Err(
                "earned: base_rpm must be at least 1, and cap_rpm at least base_rpm".into(),
            );
        }
        if self.window_ms == 0 || !(self.factor.is_finite() && self.factor > 0.0) {
            return Err("earned: window_ms and factor must be above 0".into());
        }
        Ok(())
    }

    fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }
}

/// One key's (and class's, and model's) successes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Ledger {
    /// Requests served within the rule's window.
    served: VecDeque<Duration>,
    /// How many of them in the last second.
    last_second: usize,
}

impl Ledger {
    /// The rate earned at `now`, requests a second.
    pub(crate) fn earned(&mut self, rule: &Earned, now: Duration) -> f64 {
        self.forget(rule, now);
        let successful = self.served.len() as f64 / rule.window().as_secs_f64();
        (rule.factor * successful).clamp(rule.base_rpm as f64 / 60.0, rule.cap_rpm as f64 / 60.0)
    }

    /// Whether one more request may be served at `now`, as a verdict for the headers.
    pub(crate) fn check(&mut self, rule: &Earned, now: Duration) -> Verdict {
        let earned = self.earned(rule, now);
        let limit = earned.floor().max(1.0) as u64;
        let used = self.last_second as u64;
        let allowed = used < limit;
        let reset = if allowed {
            Duration::ZERO
        } else {
            // When the oldest success of the last second leaves it.
            let oldest = self.served[self.served.len() - self.last_second];
            (oldest + Duration::from_secs(1)).saturating_sub(now)
        };
        Verdict {
            allowed,
            limit,
            remaining: limit.saturating_sub(used + u64::from(allowed)),
            reset,
        }
    }

    /// Notes a request served at `now`.
    pub(crate) fn served(&mut self, now: Duration) {
        self.served.push_back(now);
        self.last_second += 1;
    }

    fn forget(&mut self, rule: &Earned, now: Duration) {
        while self
            .served
            .front()
            .is_some_and(|at| now.saturating_sub(*at) >= rule.window())
        {
            self.served.pop_front();
        }
        self.last_second = self
            .served
            .iter()
            .rev()
            .take_while(|at| now.saturating_sub(**at) < Duration::from_secs(1))
            .count();
    }

    /// Whether it holds nothing worth keeping.
    pub(crate) fn is_empty(&self) -> bool {
        self.served.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn a_cold_key_gets_the_base_and_earns_more_by_success() {
        let rule = Earned::new(300, 6_000);
        let mut ledger = Ledger::default();
        // 5 a second at first.
        let allowed = (0..10)
            .filter(|i| {
                let verdict = ledger.check(&rule, ms(i * 10));
                if verdict.allowed {
                    ledger.served(ms(i * 10));
                }
                verdict.allowed
            })
            .count();
        assert_eq!(allowed, 5);
        // Serve 50 over ten seconds: twice 5 a second is 10 a second.
        let mut ledger = Ledger::default();
        for i in 0..50 {
            ledger.served(ms(i * 200));
        }
        assert!((ledger.earned(&rule, ms(10_000)) - 10.0).abs() < 0.3);
        // Never above the cap.
        for i in 0..10_000 {
            ledger.served(ms(10_000 + i));
        }
        assert_eq!(ledger.earned(&rule, ms(20_000)), 100.0);
    }

    #[test]
    fn a_refusal_says_when_a_turn_comes_back() {
        let rule = Earned::new(60, 60);
        let mut ledger = Ledger::default();
        ledger.served(ms(0));
        let verdict = ledger.check(&rule, ms(400));
        assert!(!verdict.allowed);
        assert_eq!(verdict.reset, ms(600));
    }
}
