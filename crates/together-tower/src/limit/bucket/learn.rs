//! What an answer teaches its bucket.
//!
//! - A 429 closes the bucket for the server's hint (the precise one:
//!   [`headers::retry_hint`]); without a hint, for the default pause in static mode.
//! - `x-ratelimit-remaining: 0` closes it until `x-ratelimit-reset`, when that is later than the
//!   bucket's own pace would send the next request anyway.
//! - In adaptive mode, a stated limit (`x-ratelimit-limit`, `x-tokenlimit-limit`, and their
//!   `-dynamic` forms) moves the target, and a 429 or 503 that the bucket's own pace did not
//!   expect cuts the rate (see [`adapt`](crate::limit::learn::adapt)). A refusal is expected
//!   when the request was sent before the bucket's last cut or closure: the bucket already
//!   acted on it.
//! - A token charge is corrected from the answer's `usage` once its body has been read, and
//!   given back whole when the server did not serve the request.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::Bucket;
use crate::headers;
use crate::limit::backend::gcra::nanos;
use crate::limit::backend::{Backend, Cost};
use crate::limit::jobs::Slots;
use crate::limit::learn::Feedback;
use crate::limit::learn::adapt::Mode;
use crate::telemetry::{self, Closure, RateChange};

impl<L: Backend> Bucket<L> {
    /// Closes the bucket for `pause` from `now`, on the server's word, and says so.
    fn close_for(&self, now: Duration, pause: Duration, why: Closure) {
        self.close_until(now.saturating_add(pause));
        telemetry::closed(self.key, &self.group, self.model.as_deref(), pause, why);
    }

    /// The usage an answer reported, as far as it can be believed.
    ///
    /// No request larger than the token burst is admitted, so an answer that reports more
    /// than the burst (or than its own charge, if that is larger) is wrong or hostile. Its
    /// charge is cut to that bound, so one answer costs the bucket at most one burst of
    /// debt, however large its number: believed whole, `u64::MAX` would close the bucket, and
    /// with a shared backend every replica's, for decades.
    fn believable_usage(&self, charged: u64, used: u64) -> u64 {
        let Some(capacity) = self.token_capacity() else {
            return used;
        };
        let bound = capacity.max(charged);
        if used > bound {
            telemetry::usage_not_believed(
                self.key,
                &self.group,
                self.model.as_deref(),
                used,
                bound,
            );
            return bound;
        }
        used
    }

    /// Closes the bucket when the server said to stop: a 429 for its hint (in static mode, for
    /// the default pause without one), or a used-up limit until its reset. Returns whether it
    /// closed.
    fn close_on_the_servers_word(
        &self,
        refused: bool,
        headers: &HeaderMap,
        found: &headers::RateLimitHeaders<'_>,
        now: Duration,
    ) -> bool {
        let context = &self.context;
        if refused {
            let pause = match headers::retry_hint(headers, SystemTime::now()) {
                Some(hint) => Some(hint),
                None if context.adaptation.mode() == Mode::Adaptive => None,
                None => Some(context.default_pause),
            };
            let Some(pause) = pause else {
                return false;
            };
            self.close_for(now, pause.min(context.max_pause), Closure::Refused);
            return true;
        }
        // A used-up limit says something the bucket's own pacing does not know only when it
        // resets later than the bucket's next turn may come: another client shares the key, or
        // a window is full. A reset before then is our own pacing, seen from the server.
        if found.remaining() != Some(0) {
            return false;
        }
        match found.reset(SystemTime::now()) {
            Some(reset) if reset > self.earliest_next() => {
                self.close_for(now, reset.min(context.max_pause), Closure::UsedUp);
                true
            }
            _ => false,
        }
    }

    /// Moves the rates by what an answer says: a stated limit moves the target, and
    /// `trouble` (a refusal the pace did not expect: `Some(true)` for a 429, `Some(false)` for
    /// a 503) cuts. Returns whether it cut.
    fn adapt(
        &self,
        found: &headers::RateLimitHeaders<'_>,
        trouble: Option<bool>,
        now: Duration,
    ) -> bool {
        let stated_requests = found.request_limit();
        let stated_tokens = found.token_limit();
        if stated_requests.is_none() && stated_tokens.is_none() && trouble.is_none() {
            return false;
        }
        let mut controllers = self.controllers();
        let mut changed = false;
        if let (Some(limit), Some(controller)) = (
            stated_requests,
            controllers.requests(self.group_quota(), self.context.adaptation),
        ) {
            changed |= controller.stated_limit(limit as f64);
        }
        if let (Some(limit), Some(controller)) = (
            stated_tokens,
            controllers.tokens(self.group_quota(), self.context.adaptation),
        ) {
            changed |= controller.stated_limit(limit as f64);
        }
        let cut = trouble.is_some_and(|refused| {
            // A 429 that says the tokens ran out, and not the requests, is about tokens.
            let tokens_out =
                refused && found.token_remaining() == Some(0) && found.remaining() != Some(0);
            let controller = if tokens_out {
                controllers.tokens(self.group_quota(), self.context.adaptation)
            } else {
                controllers.requests(self.group_quota(), self.context.adaptation)
            };
            controller.is_some_and(|controller| controller.trouble(nanos(now)))
        });
        if changed || cut {
            let before = self.interval();
            self.apply(&mut controllers, now);
            let after = self.interval();
            if before != after && !after.is_zero() && !before.is_zero() {
                let why = if cut {
                    RateChange::Cut
                } else {
                    RateChange::Stated
                };
                telemetry::rate_changed(
                    self.key,
                    &self.group,
                    self.model.as_deref(),
                    1.0 / before.as_secs_f64(),
                    1.0 / after.as_secs_f64(),
                    why,
                );
            }
        }
        cut
    }
}

impl<L: Backend> Feedback for Bucket<L> {
    fn epoch(&self) -> u64 {
        Bucket::epoch(self)
    }

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn learn(&self, status: StatusCode, headers: &HeaderMap, sent_epoch: u64, cost: Cost) {
        let refused = status == StatusCode::TOO_MANY_REQUESTS;
        let slow_down = status == StatusCode::SERVICE_UNAVAILABLE;
        if cost.tokens > 0 && !status.is_success() {
            // Not served: the tokens were not spent.
            Feedback::correct_tokens(self, cost.tokens, 0);
        }
        let found = headers::RateLimitHeaders::scan(headers);
        // Most answers: a success that says nothing about the limits.
        if !refused && !slow_down && !found.any() {
            return;
        }
        let now = self.context.clock.elapsed();
        let mut closed = self.close_on_the_servers_word(refused, headers, &found, now);
        if self.context.adaptation.mode() == Mode::Adaptive {
            // Sent before the last cut or closure: the bucket already acted on what this says.
            let expected = sent_epoch != self.epoch();
            let trouble = (refused || slow_down) && !expected;
            closed |= self.adapt(&found, trouble.then_some(refused), now);
        }
        if closed {
            self.next_epoch();
        }
    }

    fn slots(&self) -> Option<&Arc<Slots>> {
        Bucket::slots(self)
    }

    fn correct_tokens(&self, charged: u64, used: u64) {
        let now = self.context.clock.elapsed();
        let used = self.believable_usage(charged, used);
        self.context
            .backend
            .correct_tokens(&self.state, charged, used, now);
    }
}
