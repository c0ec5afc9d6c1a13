//! What an answer teaches its bucket.
//!
//! - A 429 closes the bucket for the server's hint: in static mode the most precise one
//!   ([`headers::retry_hint`]), or the default pause without one; in adaptive mode only a
//!   precise hint ([`headers::precise_retry_hint`]).
//! - `x-ratelimit-remaining: 0` closes it until `x-ratelimit-reset`, when that is later than the
//!   bucket's own pace would send the next request anyway.
//! - In adaptive mode, a stated limit (`x-ratelimit-limit`, `x-tokenlimit-limit`, and their
//!   `-dynamic` forms) moves the target, and a 429 that the bucket's own pace did not expect
//!   cuts the rate of the limit that ran out (see [`adapt`](crate::limit::learn::adapt)). A
//!   refusal is expected when the request was sent before the bucket's last cut or closure:
//!   the bucket already acted on it. 503s are counted against the answers served, and move
//!   the rate only when a trial shows they follow it (see
//!   [`pressure`](crate::limit::learn::pressure)).
//! - A token charge is corrected from the answer's `usage` once its body has been read, and
//!   given back whole when the server did not serve the request.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode};

use super::Bucket;
use crate::headers;
use crate::limit::backend::Backend;
use crate::limit::backend::gcra::nanos;
use crate::limit::jobs::Slots;
use crate::limit::learn::adapt::Mode;
use crate::limit::learn::{Answer, Dimension, Feedback, Sent};
use crate::telemetry::{self, Closure, RateChange};

/// Doubling a hold more often than this cannot matter: it is capped at a server window, and
/// 2<sup>16</sup> turns are longer than any.
const MOST_DOUBLINGS: u32 = 16;

impl<L: Backend> Bucket<L> {
    /// Closes the bucket for `pause` from `now`, on the server's word, and says so.
    fn close_for(&self, now: Duration, pause: Duration, why: Closure) {
        self.close_until(now.saturating_add(pause));
        telemetry::closed(self.key, self.group(), self.model.as_deref(), pause, why);
    }

    /// A refusal without a precise hint, in adaptive mode: the bucket holds back a turn at
    /// the rate in force, twice as long for each refusal since an answer was last served,
    /// added to any hold still running. A lone refusal costs a turn besides its own (a
    /// server that counts the last window has room again about a turn later, if the rate
    /// is right; holding two cost an earned limit's ramp 1% of its time, in turns at its
    /// base that the limit is earned from, for three fewer refusals in 200 at a fixed wall
    /// far below); a flood of them (a rate far above the limit, while the cut waits a
    /// window to show) stops the sending after a few, until one server window after the
    /// first: by then a server that counts the last window counts none of what it refused
    /// for. A row of refusals longer than a window (a server refusing everything) holds a
    /// window from the latest at most.
    fn hold_a_turn(&self, now: Duration) {
        let in_a_row = self.refused_in_a_row.fetch_add(1, Ordering::Relaxed);
        if in_a_row == 0 {
            self.refused_from.store(nanos(now), Ordering::Relaxed);
        }
        let first = Duration::from_nanos(self.refused_from.load(Ordering::Relaxed));
        let turns = 1u32 << in_a_row.min(MOST_DOUBLINGS);
        let hold = self.interval().saturating_mul(turns);
        let most = first.max(now.saturating_sub(self.context.adaptation.window()));
        self.extend_closure(
            now,
            hold,
            most.saturating_add(self.context.adaptation.window()),
        );
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
                self.group(),
                self.model.as_deref(),
                used,
                bound,
            );
            return bound;
        }
        used
    }

    /// Closes the bucket when the server said to stop: a 429 for its hint (see below), or a
    /// used-up limit until its reset. Returns whether it closed.
    ///
    /// In static mode a 429 closes the bucket for its hint, or the default pause without one.
    /// In adaptive mode only a precise hint closes it ([`headers::precise_retry_hint`]): a
    /// whole-second `Retry-After` is an upper bound for the request it answers, which the
    /// retry layer waits out; the bucket as a whole is governed by the rate's cut.
    fn close_on_the_servers_word(
        &self,
        refused: bool,
        headers: &HeaderMap,
        found: &headers::RateLimitHeaders<'_>,
        now: Duration,
    ) -> bool {
        let context = &self.context;
        if refused {
            let pause = match context.adaptation.mode() {
                Mode::Adaptive => headers::precise_retry_hint(headers, SystemTime::now()),
                Mode::Static => Some(
                    headers::retry_hint(headers, SystemTime::now())
                        .unwrap_or(context.default_pause),
                ),
            };
            let Some(pause) = pause else {
                self.hold_a_turn(now);
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

    /// Moves the rates by what an answer says: a stated limit moves the target, an unexpected
    /// 429 cuts the dimension that ran out, and every answer counts for the 503 evidence while
    /// it is watched. Returns whether it cut.
    fn adapt(
        &self,
        found: &headers::RateLimitHeaders<'_>,
        evidence: Evidence,
        now: Duration,
    ) -> bool {
        let (group, adaptation) = (self.group_quota(), self.context.adaptation);
        let now_nanos = nanos(now);
        let mut controllers = self.controllers();
        let mut why = None;
        if let (Some(limit), Some(controller)) = (
            found.request_limit(),
            controllers.requests(group, adaptation),
        ) {
            why = why.or(controller
                .stated_limit(limit as f64, now_nanos)
                .then_some(RateChange::Stated));
        }
        if let (Some(limit), Some(controller)) =
            (found.token_limit(), controllers.tokens(group, adaptation))
        {
            why = why.or(controller
                .stated_limit(limit as f64, now_nanos)
                .then_some(RateChange::Stated));
        }
        if evidence.refused {
            let controller = match evidence.ran_out(found) {
                Dimension::Tokens => controllers.tokens(group, adaptation),
                Dimension::Requests => controllers.requests(group, adaptation),
            };
            if controller.is_some_and(|controller| controller.trouble(evidence.sent_at, now_nanos))
            {
                why = Some(RateChange::Refused);
            }
        }
        if evidence.counts_for_pressure() {
            if let Some(controller) = controllers.requests(group, adaptation) {
                let (sent_at, unavailable) = (evidence.sent_at, evidence.unavailable);
                why = controller.answered(sent_at, unavailable, now_nanos).or(why);
            }
        }
        self.watching
            .store(controllers.watching(now_nanos), Ordering::Relaxed);
        let Some(why) = why else {
            return false;
        };
        let before = self.interval();
        self.apply(&mut controllers, now);
        let after = self.interval();
        if before != after && !after.is_zero() && !before.is_zero() {
            telemetry::rate_changed(
                self.key,
                self.group(),
                self.model.as_deref(),
                1.0 / before.as_secs_f64(),
                1.0 / after.as_secs_f64(),
                why,
            );
        }
        matches!(why, RateChange::Refused | RateChange::Unavailable)
    }
}

/// What one answer says to the rate controllers.
#[derive(Debug, Clone, Copy)]
struct Evidence {
    /// A 429 the bucket's pace did not expect.
    refused: bool,
    /// A 429's body said which limit ran out.
    ran_out: Option<Dimension>,
    /// A 503.
    unavailable: bool,
    /// Served (2xx): counts against the 503s.
    served: bool,
    /// When the request was sent, on the bucket's clock.
    sent_at: u64,
}

impl Evidence {
    /// The limit a refusal is about: what its body said, else the tokens when the headers
    /// say only they ran out, else the requests.
    fn ran_out(&self, found: &headers::RateLimitHeaders<'_>) -> Dimension {
        self.ran_out.unwrap_or(
            if found.token_remaining() == Some(0) && found.remaining() != Some(0) {
                Dimension::Tokens
            } else {
                Dimension::Requests
            },
        )
    }

    fn counts_for_pressure(&self) -> bool {
        self.unavailable || self.served
    }
}

impl<L: Backend> Feedback for Bucket<L> {
    fn sent_now(&self) -> Sent {
        self.sent_at(self.context.clock.elapsed())
    }

    fn sent_at(&self, at: Duration) -> Sent {
        Sent {
            epoch: self.epoch(),
            at,
        }
    }

    fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }

    fn reads_refusals(&self) -> bool {
        self.context.adaptation.mode() == Mode::Adaptive
            && self.token_capacity().is_some()
            && self.group_quota().rate().is_some()
    }

    fn learn(&self, answer: Answer<'_>) {
        let Answer {
            status,
            headers,
            sent,
            cost,
            ran_out,
        } = answer;
        let refused = status == StatusCode::TOO_MANY_REQUESTS;
        let unavailable = status == StatusCode::SERVICE_UNAVAILABLE;
        if status.is_success() && self.refused_in_a_row.load(Ordering::Relaxed) != 0 {
            self.refused_in_a_row.store(0, Ordering::Relaxed);
        }
        if cost.tokens > 0 && !status.is_success() {
            // Not served: the tokens were not spent.
            Feedback::correct_tokens(self, cost.tokens, 0);
        }
        let found = headers::RateLimitHeaders::scan(headers);
        let adaptive = self.context.adaptation.mode() == Mode::Adaptive;
        // Most answers: a success that says nothing about the limits, to a bucket that is not
        // judging 503s.
        let watched = adaptive && self.watching.load(Ordering::Relaxed);
        if !refused && !unavailable && !found.any() && !watched {
            return;
        }
        let now = self.context.clock.elapsed();
        let mut closed = self.close_on_the_servers_word(refused, headers, &found, now);
        if adaptive {
            let evidence = Evidence {
                // Sent before the last cut or closure: the bucket already acted on it.
                refused: refused && sent.epoch == self.epoch(),
                ran_out,
                unavailable,
                served: status.is_success(),
                sent_at: nanos(sent.at),
            };
            closed |= self.adapt(&found, evidence, now);
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
        telemetry::tokens_settled(self.key, self.group(), self.model(), charged, used);
        if used < charged {
            self.queue.refilled();
        }
    }

    fn estimate_kept(&self, charged: u64) {
        telemetry::estimate_kept(self.key, self.group(), self.model(), charged);
    }
}
