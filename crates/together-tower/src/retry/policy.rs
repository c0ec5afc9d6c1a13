use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use tokio::time::{Instant, Sleep};
use tower::BoxError;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::{HasherRng, Rng};

use super::delivery::Delivery;
use crate::body::BufferedBody;
use crate::classify::{Classify, EndpointClass, TogetherClassifier};
use crate::headers;
use crate::telemetry;

/// `x-should-retry`: the server's own word on whether a retry may help (`true` or `false`).
pub const X_SHOULD_RETRY: HeaderName = HeaderName::from_static("x-should-retry");

/// A request body the retry layer can send again.
///
/// Bodies that are `Clone` are; a [`BufferedBody`] is when it was buffered whole.
pub trait RetryBody: Sized {
    /// A copy to send again, or `None` if this body can be sent only once.
    fn try_clone_body(&self) -> Option<Self>;
}

impl<B: Clone> RetryBody for B {
    fn try_clone_body(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<B> RetryBody for BufferedBody<B> {
    fn try_clone_body(&self) -> Option<Self> {
        self.try_clone()
    }
}

/// A request extension the retry layer puts on each request it sends again: which attempt
/// this is (1 for the first retry). The rate limit layer serves such requests before those
/// not sent yet, so a 429 does not send a request to the back of a long queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attempt(pub u32);

/// When the request was first sent: put on each request by [`Retry`](super::Retry) as it
/// enters, so the time allowed for retries counts from there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FirstSent(pub(crate) Instant);

/// The settings of [`RetryPolicy`], shared by every request it handles.
#[derive(Debug, Clone)]
struct Settings {
    max_retries: u32,
    max_elapsed: Duration,
    base_delay: Duration,
    max_delay: Duration,
    max_hint: Duration,
}

/// When and how long to retry a Together call. Use it through [`RetryLayer`](super::RetryLayer).
///
/// - Retries 429, 408, 500, 502, 503, 504 and connection failures; never other 4xx, and never
///   errors this crate's rate limit layer returns itself (it already decided the request
///   should not wait).
/// - Connection failures are told apart by their types (hyper-util's client error, hyper's
///   error, tower's timeout, `io::Error`), never by message text. A request that never left
///   (a failed connect, a refused connection, a request hyper cancelled before writing it) is
///   safe to repeat. One the server may have read (the connection closed or reset before the
///   answer, a timeout) is repeated only if repeating cannot create a second paid job.
/// - So a job-creating call (fine-tune create, batch create) is never repeated after a 5xx, a
///   408, a timeout or a connection that broke after sending: the job may exist. A 429, or a
///   connection that failed before sending, is still retried.
/// - A 409 on a job create (too many running jobs) is retried: no job was created. Under the
///   rate limit layer the retry waits for one of the key's job slots to free, within its
///   `max_wait`, rather than going out to meet another 409.
/// - `x-should-retry: true|false` overrides the rules above when the server sends it.
/// - The delay is the server's hint (`retry-after-ms`, `Retry-After`, `x-ratelimit-reset`) plus up
///   to 10% (at most one second) of jitter, so callers told the same thing do not return in
///   lockstep. A hint longer than `max_hint` (60 s) means "give up now". Without a hint: full
///   jitter, a random delay up to `min(max_delay, base_delay * 2^attempt)` (0.5 s and 8 s).
/// - Stops after `max_retries` (4) retries, once `max_elapsed` (2 min since the first send)
///   would pass, or when the shared budget (20% of requests plus 10 a second, over 10 s) is
///   spent. The caller then gets the last response or error, unchanged. [`Retry`](super::Retry)
///   deposits each new request in the budget and notes when it was first sent, as the request
///   enters; the policy itself keeps no state between requests, so it does not matter in
///   which order tower asks it to copy a request or judge an answer.
/// - A request whose body cannot be sent again (it was too large to buffer) is sent once.
pub struct RetryPolicy<C = TogetherClassifier> {
    settings: Arc<Settings>,
    budget: Arc<TpsBudget>,
    classifier: C,
    rng: HasherRng,
    // Per request: tower's retry future holds a clone of the policy for its request, and only
    // that clone's `retry` counts here. The layer's own copy is never asked to judge.
    retries: u32,
}

impl RetryPolicy {
    /// The defaults described above, with Together's classifier.
    pub fn new() -> Self {
        Self {
            settings: Arc::new(Settings {
                max_retries: 4,
                max_elapsed: Duration::from_secs(120),
                base_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(8),
                max_hint: Duration::from_secs(60),
            }),
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
            classifier: TogetherClassifier,
            rng: HasherRng::new(),
            retries: 0,
        }
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl<C> RetryPolicy<C> {
    fn with_settings(mut self, change: impl FnOnce(&mut Settings)) -> Self {
        change(Arc::make_mut(&mut self.settings));
        self
    }

    /// Retries at most this many times (default 4).
    pub fn with_max_retries(self, max_retries: u32) -> Self {
        self.with_settings(|settings| settings.max_retries = max_retries)
    }

    /// Does not retry once this much time would have passed since the first send (default 2 min).
    pub fn with_max_elapsed(self, max_elapsed: Duration) -> Self {
        self.with_settings(|settings| settings.max_elapsed = max_elapsed)
    }

    /// The backoff without a server hint: full jitter up to `min(max, base * 2^attempt)`.
    pub fn with_backoff(self, base: Duration, max: Duration) -> Self {
        self.with_settings(|settings| {
            settings.base_delay = base;
            settings.max_delay = max;
        })
    }

    /// The longest server hint worth waiting for (default 60 s); a longer one hands the
    /// response back at once.
    pub fn with_max_hint(self, max_hint: Duration) -> Self {
        self.with_settings(|settings| settings.max_hint = max_hint)
    }

    /// Shares this retry budget instead of the default (20% of requests plus 10/s over 10 s).
    pub fn with_budget(mut self, budget: TpsBudget) -> Self {
        self.budget = Arc::new(budget);
        self
    }

    /// Classifies requests with `classifier`, to know which create paid jobs.
    pub fn with_classifier<C2>(self, classifier: C2) -> RetryPolicy<C2> {
        RetryPolicy {
            settings: self.settings,
            budget: self.budget,
            classifier,
            rng: self.rng,
            retries: 0,
        }
    }

    /// The shared retry budget, which [`Retry`](super::Retry) deposits in.
    pub(crate) fn budget(&self) -> &Arc<TpsBudget> {
        &self.budget
    }

    /// The classifier, which knows which calls create paid jobs and where keys are.
    pub(crate) fn classifier(&self) -> &C {
        &self.classifier
    }

    /// How many more times this request may be retried.
    fn retries_left(&self) -> u32 {
        self.settings.max_retries.saturating_sub(self.retries)
    }

    /// The delay before retry number `attempt` (0-based) without a server hint.
    fn backoff(&mut self, attempt: u32) -> Duration {
        let ceiling = self
            .settings
            .base_delay
            .saturating_mul(2u32.saturating_pow(attempt))
            .min(self.settings.max_delay);
        ceiling.mul_f64(self.rng.next_f64())
    }

    /// A server hint plus up to 10% of jitter, at most one second of it.
    fn jittered(&mut self, hint: Duration) -> Duration {
        let spread = (hint / 10).min(Duration::from_secs(1));
        hint.saturating_add(spread.mul_f64(self.rng.next_f64()))
    }
}

/// What the answer says about trying again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Done,
    /// Retry after the server's hint if it gave one, else after backoff.
    Retry {
        hint: Option<Duration>,
        /// What made it worth trying again, for events and metrics.
        reason: &'static str,
    },
}

impl<C> RetryPolicy<C> {
    fn judge_response(
        &self,
        class: EndpointClass,
        status: StatusCode,
        headers: &HeaderMap,
    ) -> Verdict {
        let hint = || headers::retry_hint(headers, SystemTime::now());
        match should_retry(headers) {
            Some(false) => return Verdict::Done,
            Some(true) if !status.is_success() => {
                return Verdict::Retry {
                    hint: hint(),
                    reason: "x-should-retry",
                };
            }
            _ => {}
        }
        match status.as_u16() {
            429 => Verdict::Retry {
                hint: hint(),
                reason: "429",
            },
            // Too many running jobs: none was created, so trying again is safe.
            409 if class.creates_job() => Verdict::Retry {
                hint: hint(),
                reason: "409",
            },
            503 if !class.creates_job() => Verdict::Retry {
                hint: hint(),
                reason: "503",
            },
            408 | 500 | 502 | 504 if !class.creates_job() => Verdict::Retry {
                hint: hint(),
                reason: "5xx",
            },
            _ => Verdict::Done,
        }
    }

    fn judge_error(&self, class: EndpointClass, error: &BoxError) -> Verdict {
        match Delivery::of(error) {
            Delivery::NotSent => Verdict::Retry {
                hint: None,
                reason: "not sent",
            },
            // The server may have read it: a job create may have created its job.
            Delivery::MaybeSent if !class.creates_job() => Verdict::Retry {
                hint: None,
                reason: "connection",
            },
            Delivery::MaybeSent | Delivery::Final => Verdict::Done,
        }
    }
}

fn should_retry(headers: &HeaderMap) -> Option<bool> {
    match headers.get(X_SHOULD_RETRY)?.as_bytes() {
        b"true" => Some(true),
        b"false" => Some(false),
        _ => None,
    }
}

impl<B, ResBody, C> Policy<Request<B>, Response<ResBody>, BoxError> for RetryPolicy<C>
where
    B: RetryBody,
    C: Classify + Clone,
{
    type Future = Sleep;

    fn retry(
        &mut self,
        request: &mut Request<B>,
        result: &mut Result<Response<ResBody>, BoxError>,
    ) -> Option<Sleep> {
        let class = self.classifier.classify(request);
        let verdict = match result {
            Ok(response) => self.judge_response(class, response.status(), response.headers()),
            Err(error) => self.judge_error(class, error),
        };
        let (hint, reason) = match verdict {
            Verdict::Done => return None,
            Verdict::Retry { hint, reason } => (hint, reason),
        };
        let attempts = self.retries + 1;
        let delay = match hint {
            Some(hint) if hint > self.settings.max_hint => {
                telemetry::gave_up(class, attempts, "hint_too_long");
                return None;
            }
            Some(hint) => self.jittered(hint),
            None => self.backoff(self.retries),
        };
        // Only a request that may be retried reads the clock.
        let elapsed = request
            .extensions()
            .get::<FirstSent>()
            .map_or(Duration::ZERO, |sent| sent.0.elapsed());
        let refusal = if self.retries >= self.settings.max_retries {
            Some("max_retries")
        } else if elapsed.saturating_add(delay) > self.settings.max_elapsed {
            Some("max_elapsed")
        } else if !self.budget.withdraw() {
            Some("budget")
        } else {
            None
        };
        if let Some(refusal) = refusal {
            telemetry::gave_up(class, attempts, refusal);
            return None;
        }
        self.retries += 1;
        request.extensions_mut().insert(Attempt(self.retries));
        telemetry::retrying(class, self.retries, reason, delay, self.retries_left());
        Some(tokio::time::sleep(delay))
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let body = request.body().try_clone_body()?;
        let mut clone = Request::new(body);
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        *clone.headers_mut() = request.headers().clone();
        // The copy lives in the retry future, which tower prints with `Debug`.
        self.classifier.hide_credentials(clone.headers_mut());
        *clone.extensions_mut() = request.extensions().clone();
        Some(clone)
    }
}

impl<C: Clone> Clone for RetryPolicy<C> {
    fn clone(&self) -> Self {
        Self {
            settings: Arc::clone(&self.settings),
            budget: Arc::clone(&self.budget),
            classifier: self.classifier.clone(),
            // A generator of its own: a copy of this one would draw the same jitter, and
            // callers told the same hint would come back in lockstep.
            rng: HasherRng::new(),
            retries: self.retries,
        }
    }
}

impl<C: fmt::Debug> fmt::Debug for RetryPolicy<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("settings", &self.settings)
            .field("budget", &self.budget)
            .field("classifier", &self.classifier)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn backoff_never_exceeds_its_cap(attempt in 0u32..200, base_ms in 0u64..10_000, cap_ms in 0u64..100_000) {
            let (base, cap) = (Duration::from_millis(base_ms), Duration::from_millis(cap_ms));
            let mut policy = RetryPolicy::new().with_backoff(base, cap);
            let delay = policy.backoff(attempt);
            prop_assert!(delay <= cap);
            prop_assert!(delay <= base.saturating_mul(2u32.saturating_pow(attempt)));
        }

        #[test]
        fn hint_jitter_adds_at_most_a_tenth_and_a_second(hint_ms in 0u64..100_000_000) {
            let hint = Duration::from_millis(hint_ms);
            let delay = RetryPolicy::new().jittered(hint);
            prop_assert!(delay >= hint);
            prop_assert!(delay - hint <= (hint / 10).min(Duration::from_secs(1)));
        }
    }
}
