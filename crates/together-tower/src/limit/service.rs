use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use http::{HeaderMap, Request, Response, StatusCode};
use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;
use tower_service::Service;

use super::MaxWait;
use super::backend::{BucketSpec, Decision, GovernorLimiter, Limiter};
use super::bucket::{Bucket, BucketKey, Buckets, Close, QueueSlot, Turn};
use super::error::{QueueFull, RateLimited};
use super::future::{ResponseFuture, WaitForTurn};
use crate::classify::{Classify, EndpointClass, TogetherClassifier};
use crate::clock::TokioClock;
use crate::headers;
use crate::key::KeyHasher;
use crate::quota::QuotaTable;

/// Makes each request wait its turn in its (API key, quota group) bucket before it is sent.
///
/// Built by [`RateLimitLayer`](super::RateLimitLayer); every service the layer builds shares
/// its buckets. See the [module docs](super) for how it decides.
pub struct RateLimit<S, C = TogetherClassifier, L = GovernorLimiter>
where
    L: Limiter,
{
    inner: S,
    shared: Arc<Shared<C, L>>,
}

impl<S, C, L: Limiter> RateLimit<S, C, L> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<C, L>>) -> Self {
        Self { inner, shared }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the limiter, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// How many buckets are live now.
    pub fn live_buckets(&self) -> usize {
        self.shared.buckets.len()
    }
}

impl<S: Clone, C, L: Limiter> Clone for RateLimit<S, C, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug, L: Limiter + fmt::Debug> fmt::Debug for RateLimit<S, C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, C, L, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, C, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    C: Classify,
    L: Limiter,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The wait happens in the response future, once the request is known; readiness is
        // the inner service's.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        self.shared
            .classifier
            .hide_credentials(request.headers_mut());
        match self.shared.admit(&request) {
            Admission::Go { permit, learner } => {
                // The inner service is ready (our `poll_ready` is its own), so call it now.
                ResponseFuture::calling(self.inner.call(request), permit, learner)
            }
            Admission::Wait { turn, learner } => {
                // A waiting request takes an unready clone, so that it holds none of the inner
                // service's capacity while it waits; it drives `poll_ready` once its turn comes.
                ResponseFuture::waiting(turn, self.inner.clone(), request, learner)
            }
            Admission::Reject(error) => ResponseFuture::rejected(error),
        }
    }
}

/// Tunables of the layer, with the defaults documented on [`RateLimitLayer`](super::RateLimitLayer).
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_queue: usize,
    pub(crate) max_wait: Duration,
    pub(crate) max_buckets: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) max_pause: Duration,
    pub(crate) default_pause: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_queue: 1_024,
            max_wait: Duration::from_secs(30),
            max_buckets: 65_536,
            idle_timeout: Duration::from_secs(60),
            max_pause: Duration::from_secs(60),
            default_pause: Duration::from_secs(1),
        }
    }
}

/// What every service built by one layer shares.
pub(crate) struct Shared<C, L: Limiter> {
    pub(crate) classifier: C,
    pub(crate) limiter: Arc<L>,
    pub(crate) table: QuotaTable,
    pub(crate) key_hasher: KeyHasher,
    pub(crate) settings: Settings,
    clock: TokioClock,
    buckets: Buckets<L::Bucket>,
}

/// What the layer decided when the request arrived.
enum Admission {
    /// Send now (the fast path, or a class with no limit).
    Go {
        permit: Option<OwnedSemaphorePermit>,
        learner: Option<Learner>,
    },
    /// Wait for a slot and a turn first.
    Wait { turn: WaitForTurn, learner: Learner },
    /// Do not send: the wait would be too long, or the queue is full.
    Reject(BoxError),
}

/// What the fast path decided.
enum FastPath {
    /// Send now, holding this slot if the group has slots.
    Go(Option<OwnedSemaphorePermit>),
    /// Take the waiting path.
    Wait,
    /// Refuse at once.
    Reject(BoxError),
}

impl<C, L: Limiter> Shared<C, L> {
    pub(crate) fn new(
        classifier: C,
        limiter: Arc<L>,
        table: QuotaTable,
        key_hasher: KeyHasher,
        settings: Settings,
    ) -> Self {
        let buckets = Buckets::new(
            settings.max_buckets,
            sweep_every(&table, settings.idle_timeout),
        );
        Self {
            classifier,
            limiter,
            table,
            key_hasher,
            clock: TokioClock::new(),
            buckets,
            settings,
        }
    }

    pub(crate) fn live_buckets(&self) -> usize {
        self.buckets.len()
    }

    fn admit<B>(&self, request: &Request<B>) -> Admission
    where
        C: Classify,
    {
        let class = self.classifier.classify(request);
        let Some(group_id) = self.table.group_id(class) else {
            return Admission::Go {
                permit: None,
                learner: None,
            };
        };
        let key = BucketKey {
            key: self
                .key_hasher
                .fingerprint_request(&self.classifier, request),
            group: group_id,
        };
        let bucket = self.buckets.get_or_insert_with(key, &self.clock, || {
            let group = self.table.group(group_id);
            let rate = group.rate().map(|rate| {
                let spec = BucketSpec {
                    key: key.key,
                    group: group.name(),
                    rate,
                };
                (rate, self.limiter.bucket(spec))
            });
            let interval = rate
                .as_ref()
                .map_or(Duration::ZERO, |(rate, _)| rate.interval());
            let earliest_next = rate.as_ref().map_or(Duration::ZERO, |(rate, _)| {
                rate.interval().saturating_sub(rate.tolerance())
            });
            let state = rate.map(|(_, state)| state);
            Bucket::new(state, interval, earliest_next, group.concurrency())
        });
        let max_wait = request
            .extensions()
            .get::<MaxWait>()
            .map_or(self.settings.max_wait, |max_wait| max_wait.0);

        match self.try_fast_path(&bucket, max_wait, class) {
            FastPath::Go(permit) => {
                let learner = self.learner(bucket);
                return Admission::Go {
                    permit,
                    learner: Some(learner),
                };
            }
            FastPath::Reject(error) => return Admission::Reject(error),
            FastPath::Wait => {}
        }

        let now = self.clock.elapsed();
        let estimate = bucket.estimated_wait(now);
        if estimate > max_wait {
            return Admission::Reject(RateLimited::new(estimate, class).into());
        }
        let Some(slot) = QueueSlot::take(&bucket, self.settings.max_queue) else {
            return Admission::Reject(QueueFull::new(self.settings.max_queue, class).into());
        };
        let turn = Turn {
            limiter: Arc::clone(&self.limiter),
            clock: self.clock,
            arrived: now,
            deadline: now.saturating_add(max_wait),
            class,
        };
        Admission::Wait {
            turn: Box::pin(turn.wait(slot)),
            learner: self.learner(bucket),
        }
    }

    /// Lets the request go at once when nobody waits, the server has not closed the bucket, a
    /// slot is free and the backend has a turn. The clock is not read unless it must be.
    fn try_fast_path(
        &self,
        bucket: &Bucket<L::Bucket>,
        max_wait: Duration,
        class: EndpointClass,
    ) -> FastPath {
        if bucket.has_waiters() || bucket.is_closed(&self.clock) {
            return FastPath::Wait;
        }
        let permit = match bucket.slots() {
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return FastPath::Wait,
            },
            None => None,
        };
        let Some(rate) = bucket.rate() else {
            return FastPath::Go(permit);
        };
        match self.limiter.try_acquire(rate) {
            Some(Decision::Allow) => FastPath::Go(permit),
            Some(Decision::Wait(wait)) => {
                bucket.next_turn_at(self.clock.elapsed().saturating_add(wait));
                if wait > max_wait {
                    // Known to be too long already: answer now rather than queue.
                    return FastPath::Reject(RateLimited::new(wait, class).into());
                }
                FastPath::Wait
            }
            None => FastPath::Wait,
        }
    }

    fn learner(&self, bucket: Arc<Bucket<L::Bucket>>) -> Learner {
        Learner {
            bucket,
            clock: self.clock,
            max_pause: self.settings.max_pause,
            default_pause: self.settings.default_pause,
        }
    }
}

/// How often a shard of buckets may be swept: never sooner than any quota of `table` refills,
/// so that a bucket unused for a whole interval is back at rest and dropping it loses nothing.
fn sweep_every(table: &QuotaTable, idle_timeout: Duration) -> Duration {
    table
        .groups()
        .filter_map(|group| group.rate())
        .map(|rate| rate.refill_time())
        .fold(idle_timeout, Duration::max)
}

impl<C: fmt::Debug, L: Limiter + fmt::Debug> fmt::Debug for Shared<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("classifier", &self.classifier)
            .field("limiter", &self.limiter)
            .field("table", &self.table)
            .field("settings", &self.settings)
            .field("live_buckets", &self.buckets.len())
            .finish_non_exhaustive()
    }
}

/// Reads a response for the server's word on the bucket, and closes the bucket if it asks.
///
/// It also keeps the bucket alive while the request is in flight, so a concurrency slot is
/// never counted in a bucket that was dropped and made anew.
pub(crate) struct Learner {
    bucket: Arc<dyn Close>,
    clock: TokioClock,
    max_pause: Duration,
    default_pause: Duration,
}

impl Learner {
    pub(crate) fn learn<B>(&self, response: &Response<B>) {
        let pause = match server_pause(response.status(), response.headers(), self.default_pause) {
            Some(Pause::Refused(pause)) => pause,
            // A limit used up says something the bucket's own pacing does not know only when
            // it resets later than the bucket's next turn may come: another client shares the
            // key, or a window is full. A reset before then is our own pacing, seen from the
            // server; closing for it would cost a round trip on every request.
            Some(Pause::Exhausted(reset)) if reset > self.bucket.earliest_next() => reset,
            Some(Pause::Exhausted(_)) | None => return,
        };
        let until = self
            .clock
            .elapsed()
            .saturating_add(pause.min(self.max_pause));
        self.bucket.close_until(until);
    }
}

impl fmt::Debug for Learner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Learner")
            .field("max_pause", &self.max_pause)
            .field("default_pause", &self.default_pause)
            .finish_non_exhaustive()
    }
}

/// What the server said about a bucket's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pause {
    /// A 429: stop for its retry hint (`retry-after-ms`, `Retry-After`, then
    /// `x-ratelimit-reset`), or for the default without one.
    Refused(Duration),
    /// No requests remain (`x-ratelimit-remaining: 0`) until `x-ratelimit-reset`.
    Exhausted(Duration),
}

fn server_pause(status: StatusCode, headers: &HeaderMap, default: Duration) -> Option<Pause> {
    if status == StatusCode::TOO_MANY_REQUESTS {
        let now = SystemTime::now();
        let hint =
            headers::retry_after(headers, now).or_else(|| headers::ratelimit_reset(headers, now));
        return Some(Pause::Refused(hint.unwrap_or(default)));
    }
    if !headers.is_empty() && headers::ratelimit_remaining(headers) == Some(0) {
        return headers::ratelimit_reset(headers, SystemTime::now()).map(Pause::Exhausted);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.parse().unwrap(), HeaderValue::from_str(value).unwrap()))
            .collect()
    }

    #[test]
    fn a_429_pauses_for_its_hint_or_the_default() {
        let default = Duration::from_secs(1);
        let pause =
            |pairs| match server_pause(StatusCode::TOO_MANY_REQUESTS, &headers(pairs), default) {
                Some(Pause::Refused(pause)) => Some(pause),
                _ => None,
            };
        assert_eq!(pause(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(
            pause(&[("retry-after-ms", "120"), ("retry-after", "3")]),
            Some(Duration::from_millis(120))
        );
        assert_eq!(
            pause(&[("x-ratelimit-reset", "0.5")]),
            Some(Duration::from_millis(500))
        );
        assert_eq!(pause(&[("retry-after", "soon")]), Some(default));
        assert_eq!(pause(&[]), Some(default));
    }

    #[test]
    fn an_exhausted_limit_pauses_until_its_reset() {
        let default = Duration::from_secs(1);
        let pause = |pairs| match server_pause(StatusCode::OK, &headers(pairs), default) {
            Some(Pause::Exhausted(pause)) => Some(pause),
            _ => None,
        };
        let exhausted = [("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "0.2")];
        assert_eq!(pause(&exhausted), Some(Duration::from_millis(200)));
        assert_eq!(pause(&[("x-ratelimit-remaining", "0")]), None);
        assert_eq!(
            pause(&[("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "1")]),
            None
        );
        assert_eq!(pause(&[]), None);
        let unavailable = server_pause(
            StatusCode::SERVICE_UNAVAILABLE,
            &headers(&[("retry-after", "5")]),
            default,
        );
        assert_eq!(unavailable, None);
    }
}
