use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use tokio::time::Sleep;
use tower::BoxError;
use tower::retry::Policy;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::{HasherRng, Rng};

use super::delivery::Delivery;
use crate::body::model::replace_model;
use crate::body::{BufferedBody, RequestMeta};
use crate::classify::{Classified, Classify, EndpointClass, TogetherClassifier};
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

    /// The same JSON body naming `model` instead, every other byte as it was, and its length
    /// in bytes, for a [model fallback](RetryPolicy::with_fallback); `None` if this body
    /// cannot be rewritten (the default). A [`BufferedBody`] buffered whole can.
    fn with_model(&self, model: &str) -> Option<(Self, u64)> {
        let _ = model;
        None
    }
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

    fn with_model(&self, model: &str) -> Option<(Self, u64)> {
        let json = replace_model(self.bytes()?, model)?;
        let length = json.len() as u64;
        Some((BufferedBody::buffered(json.into()), length))
    }
}

/// A response extension saying the answer came from a fallback model: the request named
/// `requested`, and the retry that was answered went with `answered_by`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ModelFallback {
    /// The model the caller's request named.
    pub requested: String,
    /// The model the answered request named.
    pub answered_by: String,
}

/// A request extension the retry layer puts on each request it sends again: which attempt
/// this is (1 for the first retry). The rate limit layer serves such requests before those
/// not sent yet, so a 429 does not send a request to the back of a long queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Attempt(pub u32);

/// The settings of [`RetryPolicy`], shared by every request it handles.
#[derive(Debug, Clone)]
struct Settings {
    max_retries: u32,
    max_elapsed: Duration,
    base_delay: Duration,
    max_delay: Duration,
    max_hint: Duration,
    /// Model fallbacks: after one of `fallback_statuses` for the first model, the retry goes
    /// with the second.
    fallbacks: Vec<(String, String)>,
    fallback_statuses: Vec<StatusCode>,
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
///   lockstep. A hint longer than `max_hint` (60 s) means "give up now". Without a hint:
///   "equal" jitter, a random delay between half and all of `min(max_delay, base_delay *
///   2^attempt)` (0.2 s and 8 s: up to 0.2 s, 0.4 s, 0.8 s, 1.6 s). Most hint-less 503s are
///   one busy replica of a shared platform, not an outage: a quick retry lands elsewhere,
///   while a slow one holds up its caller (at the end of a batch, the whole batch) for
///   nothing. The half that is not random spreads a request's retries over the seconds a
///   server counts: with full jitter all five attempts could fall inside the one second
///   that refused the first, before the rate limit has judged whether the 503s follow its
///   rate (against a server that answers 503 above its capacity, about one request in two
///   thousand failed so). A retry still waits its turn in the rate limit and draws on the
///   budget, so quick retries cannot storm; for an outage, a fallback model
///   ([`with_fallback`](Self::with_fallback)) helps more than waiting.
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
                base_delay: Duration::from_millis(200),
                max_delay: Duration::from_secs(8),
                max_hint: Duration::from_secs(60),
                fallbacks: Vec::new(),
                fallback_statuses: vec![StatusCode::SERVICE_UNAVAILABLE],
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

    /// The backoff without a server hint: a random delay between half and all of
    /// `min(max, base * 2^attempt)` (defaults 0.2 s and 8 s).
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

    /// After a 503 (or one of [`with_fallback_statuses`](Self::with_fallback_statuses)) for a
    /// request naming model `from`, the retry goes with model `to`: the buffered JSON body's
    /// `model` is rewritten, and nothing else. Call it once per model; fallbacks chain (`X`
    /// to `Y`, then `Y` to `Z`) within `max_retries`. Under the rate limit layer the retry
    /// waits its turn in `to`'s bucket, where the group is limited per model. The answer
    /// carries a [`ModelFallback`] extension, and a `tracing` event says so. A fallback retry
    /// goes at once: the server's hint was about `from`. Only bodies that
    /// [`RetryBody::with_model`] can rewrite (a [`BufferedBody`] buffered whole) fall back;
    /// others are retried with their own model.
    pub fn with_fallback(self, from: impl Into<String>, to: impl Into<String>) -> Self {
        let (from, to) = (from.into(), to.into());
        self.with_settings(|settings| {
            settings.fallbacks.retain(|(model, _)| *model != from);
            settings.fallbacks.push((from, to));
        })
    }

    /// The statuses that send a retry to the fallback model (default: 503). Statuses the
    /// policy does not retry never fall back.
    pub fn with_fallback_statuses(self, statuses: impl IntoIterator<Item = StatusCode>) -> Self {
        let statuses = statuses.into_iter().collect();
        self.with_settings(|settings| settings.fallback_statuses = statuses)
    }

    /// The model to fall back to after `status` for `model`, if any.
    fn fallback_for(&self, status: StatusCode, model: &str) -> Option<&str> {
        if !self.settings.fallback_statuses.contains(&status) {
            return None;
        }
        self.settings
            .fallbacks
            .iter()
            .find(|(from, _)| from == model)
            .map(|(_, to)| to.as_str())
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
        // At least half the ceiling: full jitter may put all of a request's retries inside
        // the one second a server counts, where the first was refused.
        let half = ceiling / 2;
        half.saturating_add(half.mul_f64(self.rng.next_f64()))
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

impl<C: Classify> RetryPolicy<C> {
    /// Whether and when to send `request` again after `result`.
    fn decide<B: RetryBody, ResBody>(
        &mut self,
        request: &mut Request<B>,
        result: &Result<Response<ResBody>, BoxError>,
    ) -> Option<Sleep> {
        let class = Classified::of(request).unwrap_or_else(|| self.classifier.classify(request));
        let verdict = match result {
            Ok(response) => self.judge_response(class, response.status(), response.headers()),
            Err(error) => self.judge_error(class, error),
        };
        let (hint, reason) = match verdict {
            Verdict::Done => return None,
            Verdict::Retry { hint, reason } => (hint, reason),
        };
        let attempts = self.retries + 1;
        let fallback = match result {
            Ok(response) => self.fall_back(request, response.status()),
            Err(_) => None,
        };
        let delay = match hint {
            // The hint was about the model it fell back from.
            _ if fallback.is_some() => Duration::ZERO,
            Some(hint) if hint > self.settings.max_hint => {
                telemetry::gave_up(class, attempts, "hint_too_long");
                return None;
            }
            Some(hint) => self.jittered(hint),
            None => self.backoff(self.retries),
        };
        // Only a request that may be retried reads the clock.
        let elapsed = Classified::first_sent(request).map_or(Duration::ZERO, |sent| sent.elapsed());
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
        if let Some((body, fallback)) = fallback {
            switch_model(request, body, fallback, class);
        }
        self.retries += 1;
        request.extensions_mut().insert(Attempt(self.retries));
        telemetry::retrying(class, self.retries, reason, delay, self.retries_left());
        Some(tokio::time::sleep(delay))
    }

    /// The body for a retry with the fallback model of the request's, after `status`, and
    /// what the answer will say; `None` if the request does not fall back.
    fn fall_back<B: RetryBody>(
        &self,
        request: &Request<B>,
        status: StatusCode,
    ) -> Option<((B, u64), ModelFallback)> {
        let model = request
            .extensions()
            .get::<RequestMeta>()?
            .model
            .as_deref()?;
        let to = self.fallback_for(status, model)?;
        let body = request.body().with_model(to)?;
        let requested = request
            .extensions()
            .get::<ModelFallback>()
            .map_or(model, |earlier| earlier.requested.as_str());
        Some((
            body,
            ModelFallback {
                requested: requested.to_owned(),
                answered_by: to.to_owned(),
            },
        ))
    }
}

/// Sends `request` again naming the fallback model: its body, its length and what the rate
/// limit layer reads of it (so the retry waits in the new model's bucket).
fn switch_model<B: RetryBody>(
    request: &mut Request<B>,
    (body, length): (B, u64),
    fallback: ModelFallback,
    class: EndpointClass,
) {
    if let Some(meta) = request.extensions_mut().get_mut::<RequestMeta>() {
        telemetry::fell_back(class, meta.model.as_deref(), &fallback.answered_by);
        meta.model = Some(Arc::from(fallback.answered_by.as_str()));
        meta.body_bytes = length;
    }
    *request.body_mut() = body;
    if request.headers().contains_key(http::header::CONTENT_LENGTH) {
        request
            .headers_mut()
            .insert(http::header::CONTENT_LENGTH, length.into());
    }
    request.extensions_mut().insert(fallback);
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
        let retry = self.decide(request, result);
        if retry.is_none() {
            // The answer goes back to the caller: say which model gave it.
            if let (Ok(response), Some(fallback)) =
                (result, request.extensions().get::<ModelFallback>())
            {
                response.extensions_mut().insert(fallback.clone());
            }
        }
        retry
    }

    fn clone_request(&mut self, request: &Request<B>) -> Option<Request<B>> {
        let body = request.body().try_clone_body()?;
        let mut clone = Request::new(body);
        *clone.method_mut() = request.method().clone();
        *clone.uri_mut() = request.uri().clone();
        *clone.version_mut() = request.version();
        // The copy lives in the retry future, which tower prints with `Debug`: its headers
        // were marked sensitive when the request entered the retry layer, and the marks are
        // copied with them.
        *clone.headers_mut() = request.headers().clone();
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
