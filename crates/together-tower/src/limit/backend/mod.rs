//! Where a bucket's rate state lives: in this process ([`LocalBackend`]), or in a backend that
//! many processes share (`RedisBackend` of the `together-tower-redis` crate).
//!
//! The layer keeps everything else: the queue and its fairness, the waiting, what the server
//! said, and the rate in force. A backend only keeps the GCRA state and answers "may this cost
//! go now, and if not, how long until it may".

use std::future::Future;
use std::time::Duration;

use tower::BoxError;

use crate::key::ApiKeyId;

pub(crate) mod gcra;
mod local;

use self::gcra::nanos;
pub use self::local::{LocalBackend, LocalBucket};

/// What a [`Backend`] says about one request.
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
    /// goes without asking again. Only [`Backend::acquire`] reserves, and never farther ahead
    /// than the `max_wait` it was given; a reservation not used is given back by
    /// [`Backend::release`], like an [`Decision::Allow`].
    Reserved(Duration),
}

/// What a [`Backend`] decides at once, without I/O ([`Backend::try_acquire`]): a
/// [`Decision`] that cannot be a reservation, since only a backend that must ask far away
/// reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Immediate {
    /// The request may go now; its cost was taken.
    Allow,
    /// Not for this long. Nothing was taken.
    Wait(Duration),
    /// The tokens hold it back longer than its request turn; see [`Decision::WaitForTokens`].
    WaitForTokens {
        /// Until the request turn is due (zero: it is free now).
        request: Duration,
        /// Until the tokens are there: how long the request must wait.
        tokens: Duration,
    },
    /// The cost is more than the bucket can ever hold. Nothing was taken.
    TooLarge,
}

impl From<Immediate> for Decision {
    fn from(immediate: Immediate) -> Self {
        match immediate {
            Immediate::Allow => Decision::Allow,
            Immediate::Wait(wait) => Decision::Wait(wait),
            Immediate::WaitForTokens { request, tokens } => {
                Decision::WaitForTokens { request, tokens }
            }
            Immediate::TooLarge => Decision::TooLarge,
        }
    }
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

    pub(crate) fn from_gcra(pace: gcra::Params) -> Self {
        Self::new(
            Duration::from_nanos(pace.interval.get()),
            Duration::from_nanos(pace.tau),
        )
    }

    pub(crate) fn to_gcra(self) -> gcra::Params {
        gcra::Params {
            interval: gcra::at_least_one(nanos(self.interval)),
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

/// What a [`Backend`] is told about a bucket when the layer first needs it.
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
pub trait Backend: Send + Sync + 'static {
    /// The backend's state for one bucket, kept by the layer while the bucket is live.
    type Bucket: Send + Sync + 'static;

    /// Creates the state of a new bucket.
    fn bucket(&self, spec: BucketSpec<'_>) -> Self::Bucket;

    /// Decides at once if that needs no I/O; `None` sends the request down the waiting path,
    /// which calls [`Backend::acquire`].
    fn try_acquire(&self, bucket: &Self::Bucket, cost: Cost, now: Duration) -> Option<Immediate>;

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
