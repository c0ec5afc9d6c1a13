//! Where a bucket's rate state lives: in this process ([`LocalLimiter`]), or in a backend that
//! many processes share (`RedisLimiter` of the `together-tower-redis` crate).
//!
//! The layer keeps everything else: the queue and its fairness, the waiting, what the server
//! said, and the rate in force. A backend only keeps the GCRA state and answers "may this cost
//! go now, and if not, how long until it may".

use std::future::{Future, Ready, ready};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tower::BoxError;

use super::gcra::{Gcra, nanos};
use crate::key::ApiKeyId;

/// What a [`Limiter`] says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request may go now; its cost was taken.
    Allow,
    /// Not for this long. Nothing was taken.
    Wait(Duration),
    /// The tokens hold it back longer than its request turn: the turn is due in `request`,
    /// the tokens in `tokens`. Nothing was taken. (A backend that cannot tell the two apart
    /// says [`Decision::Wait`] with the longer.)
    WaitForTokens {
        /// Until the request turn is due (zero: it is free now).
        request: Duration,
        /// Until the tokens are there: how long the request must wait.
        tokens: Duration,
    },
    /// The cost is more than the bucket can ever hold (more tokens than the token burst):
    /// no wait would help. Nothing was taken.
    TooLarge,
    /// The cost was taken for a turn this long from now: the request sleeps until then and
    /// goes without asking again. Only [`Limiter::acquire`] reserves, and never farther ahead
    /// than the `max_wait` it was given; a reservation not used is given back by
    /// [`Limiter::release`], like an [`Decision::Allow`].
    Reserved(Duration),
}

/// What one request costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cost {
    /// Requests: 1.
    pub requests: u64,
    /// Tokens, as estimated before sending (0 when the group budgets no tokens).
    pub tokens: u64,
}

/// One GCRA rate: the cost of one unit, and how much a full bucket holds beyond one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pace {
    interval: Duration,
    tau: Duration,
}

impl Pace {
    /// One unit every `interval`; a full bucket lets `tau` more go at once.
    pub fn new(interval: Duration, tau: Duration) -> Self {
        Self {
            interval: interval.max(Duration::from_nanos(1)),
            tau,
        }
    }

    /// The time one unit costs.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// What a full bucket holds beyond one unit (the burst less one, plus the tolerance).
    pub fn tau(&self) -> Duration {
        self.tau
    }

    /// Units a second.
    pub fn per_second(&self) -> f64 {
        1.0 / self.interval.as_secs_f64()
    }

    pub(crate) fn from_gcra(pace: super::gcra::Pace) -> Self {
        Self::new(
            Duration::from_nanos(pace.interval),
            Duration::from_nanos(pace.tau),
        )
    }

    fn to_gcra(self) -> super::gcra::Pace {
        super::gcra::Pace {
            interval: nanos(self.interval).max(1),
            tau: nanos(self.tau),
        }
    }
}

/// The rates in force for a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rates {
    /// Requests, if the group limits their rate.
    pub requests: Option<Pace>,
    /// Tokens, if the group budgets them.
    pub tokens: Option<Pace>,
}

/// What a [`Limiter`] is told about a bucket when the layer first needs it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BucketSpec<'a> {
    /// The fingerprint of the API key the bucket is for.
    pub key: ApiKeyId,
    /// The name of the quota group.
    pub group: &'a str,
    /// The model, for groups limited per model.
    pub model: Option<&'a str>,
    /// The rates it starts with.
    pub rates: Rates,
}

impl<'a> BucketSpec<'a> {
    /// The bucket of `key` in `group` (and `model`, for groups limited per model), starting at
    /// `rates`: for tests of a backend.
    pub fn new(key: ApiKeyId, group: &'a str, model: Option<&'a str>, rates: Rates) -> Self {
        Self {
            key,
            group,
            model,
            rates,
        }
    }
}

/// A backend that keeps each bucket's GCRA state and makes its decisions.
///
/// Times (`now`) are readings of the layer's clock; a backend with a clock of its own (Redis's
/// `TIME`) may ignore them. Decisions take the request and token parts of a [`Cost`]
/// together: both go, or neither.
pub trait Limiter: Send + Sync + 'static {
    /// The backend's state for one bucket, kept by the layer while the bucket is live.
    type Bucket: Send + Sync + 'static;

    /// Creates the state of a new bucket.
    fn bucket(&self, spec: BucketSpec<'_>) -> Self::Bucket;

    /// Decides at once if that needs no I/O; `None` sends the request down the waiting path,
    /// which calls [`Limiter::acquire`]. Never answers [`Decision::Reserved`].
    fn try_acquire(&self, bucket: &Self::Bucket, cost: Cost, now: Duration) -> Option<Decision>;

    /// Decides, with I/O if the backend needs it. An error fails the request that asked.
    ///
    /// `max_wait` is the longest the request may still wait. A backend whose every answer
    /// costs a round trip may reserve a turn up to that far ahead
    /// ([`Decision::Reserved`]), so that a waiter sleeps once instead of asking again.
    fn acquire(
        &self,
        bucket: &Self::Bucket,
        cost: Cost,
        now: Duration,
        max_wait: Duration,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send;

    /// Gives back a cost that an [`Decision::Allow`] took and that was not used.
    fn release(&self, bucket: &Self::Bucket, cost: Cost, now: Duration);

    /// Corrects a token charge once the real count is known: `charged` were taken, `used`
    /// were used. The difference comes back, or is charged.
    fn correct_tokens(&self, bucket: &Self::Bucket, charged: u64, used: u64, now: Duration);

    /// Changes the rates in force. A backend keeps what each bucket holds as a share of it,
    /// so that no change hands out a fresh burst.
    fn set_rates(&self, bucket: &Self::Bucket, rates: Rates, now: Duration);

    /// How long until the bucket is full again, so that forgetting it loses nothing. Zero for a
    /// backend whose state lives elsewhere.
    fn until_rest(&self, bucket: &Self::Bucket, now: Duration) -> Duration;
}

/// The in-process backend: the GCRA state of each bucket in memory, decided under a lock
/// that only requests of the same bucket share.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalLimiter;

impl LocalLimiter {
    /// The in-process backend.
    pub fn new() -> Self {
        Self
    }
}

/// One bucket of [`LocalLimiter`]: a request GCRA and a token GCRA.
#[derive(Debug)]
pub struct LocalBucket {
    state: Mutex<LocalState>,
}

#[derive(Debug)]
struct LocalState {
    requests: Option<Gcra>,
    tokens: Option<Gcra>,
}

impl LocalBucket {
    fn lock(&self) -> std::sync::MutexGuard<'_, LocalState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalState {
    fn decide(&mut self, cost: Cost, now: u64) -> Decision {
        let wait = |gcra: &Option<Gcra>, units| {
            gcra.as_ref().map_or(Some(0), |gcra| gcra.wait(units, now))
        };
        let (Some(requests), Some(tokens)) = (
            wait(&self.requests, cost.requests),
            wait(&self.tokens, cost.tokens),
        ) else {
            return Decision::TooLarge;
        };
        if tokens > requests {
            return Decision::WaitForTokens {
                request: Duration::from_nanos(requests),
                tokens: Duration::from_nanos(tokens),
            };
        }
        if requests > 0 {
            return Decision::Wait(Duration::from_nanos(requests));
        }
        // Both fit: take both, under the one lock, so neither is spent while the other waits.
        if let Some(gcra) = &mut self.requests {
            gcra.take(cost.requests, now);
        }
        if let Some(gcra) = &mut self.tokens {
            gcra.take(cost.tokens, now);
        }
        Decision::Allow
    }
}

impl Limiter for LocalLimiter {
    type Bucket = LocalBucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> LocalBucket {
        LocalBucket {
            state: Mutex::new(LocalState {
                requests: spec.rates.requests.map(|pace| Gcra::new(pace.to_gcra())),
                tokens: spec.rates.tokens.map(|pace| Gcra::new(pace.to_gcra())),
            }),
        }
    }

    fn try_acquire(&self, bucket: &LocalBucket, cost: Cost, now: Duration) -> Option<Decision> {
        Some(bucket.lock().decide(cost, nanos(now)))
    }

    #[allow(refining_impl_trait)]
    fn acquire(
        &self,
        bucket: &LocalBucket,
        cost: Cost,
        now: Duration,
        _max_wait: Duration,
    ) -> Ready<Result<Decision, BoxError>> {
        // Asking again costs a lock, not a round trip: no need to reserve.
        ready(Ok(bucket.lock().decide(cost, nanos(now))))
    }

    fn release(&self, bucket: &LocalBucket, cost: Cost, now: Duration) {
        let now = nanos(now);
        let mut state = bucket.lock();
        if let Some(gcra) = &mut state.requests {
            gcra.give_back(cost.requests, now);
        }
        if let Some(gcra) = &mut state.tokens {
            gcra.give_back(cost.tokens, now);
        }
    }

    fn correct_tokens(&self, bucket: &LocalBucket, charged: u64, used: u64, now: Duration) {
        let now = nanos(now);
        if let Some(gcra) = &mut bucket.lock().tokens {
            if used < charged {
                gcra.give_back(charged - used, now);
            } else {
                gcra.charge(used - charged, now);
            }
        }
    }

    fn set_rates(&self, bucket: &LocalBucket, rates: Rates, now: Duration) {
        let now = nanos(now);
        let mut state = bucket.lock();
        let LocalState { requests, tokens } = &mut *state;
        for (gcra, pace) in [(requests, rates.requests), (tokens, rates.tokens)] {
            match (gcra.as_mut(), pace) {
                (Some(gcra), Some(pace)) => gcra.set_pace(pace.to_gcra(), now),
                (None, Some(pace)) => *gcra = Some(Gcra::new(pace.to_gcra())),
                (_, None) => *gcra = None,
            }
        }
    }

    fn until_rest(&self, bucket: &LocalBucket, now: Duration) -> Duration {
        let now = nanos(now);
        let state = bucket.lock();
        let until = [state.requests, state.tokens]
            .iter()
            .flatten()
            .map(|gcra| gcra.until_rest(now))
            .max()
            .unwrap_or(0);
        Duration::from_nanos(until)
    }
}
