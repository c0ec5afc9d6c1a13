//! Where a bucket's rate state lives: in this process (governor) or elsewhere (Redis, later).

use std::future::{Future, Ready, ready};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use tower::BoxError;

use crate::clock::TokioClock;
use crate::key::ApiKeyId;
use crate::quota::Rate;

/// What a [`Limiter`] says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// The request may go now; it has taken one turn.
    Allow,
    /// No turn is free for this long. Nothing was taken.
    Wait(Duration),
}

/// What a [`Limiter`] is told about a bucket when the layer first needs it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct BucketSpec<'a> {
    /// The fingerprint of the API key the bucket is for.
    pub key: ApiKeyId,
    /// The name of the quota group.
    pub group: &'a str,
    /// The group's request rate (validated), with its pacing tolerance.
    pub rate: Rate,
}

/// A backend that makes the GCRA decision for each bucket.
///
/// The layer keeps the queue, the fairness and the waiting; a backend only answers "may one
/// request go now, and if not, how long until one may". [`GovernorLimiter`] answers from memory;
/// a shared backend (such as Redis) answers for every process that uses it.
pub trait Limiter: Send + Sync + 'static {
    /// The backend's state for one bucket, kept by the layer while the bucket is live.
    type Bucket: Send + Sync + 'static;

    /// Creates the state of a new bucket.
    fn bucket(&self, spec: BucketSpec<'_>) -> Self::Bucket;

    /// Decides at once if that needs no I/O; `None` sends the request down the waiting path,
    /// which calls [`Limiter::acquire`].
    fn try_acquire(&self, bucket: &Self::Bucket) -> Option<Decision>;

    /// Decides, with I/O if the backend needs it. An error fails the request that asked.
    fn acquire(
        &self,
        bucket: &Self::Bucket,
    ) -> impl Future<Output = Result<Decision, BoxError>> + Send;
}

/// One in-process GCRA bucket.
///
/// A request costs `cells` governor cells, so the rate's tolerance (a fraction of one
/// request) can be expressed as extra cells of burst.
#[derive(Debug)]
pub struct GovernorBucket {
    limiter: RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Nanos>>,
    cells: NonZeroU32,
}

/// Cells per request: a thousand, so millisecond tolerances of millisecond-aligned intervals
/// are exact; fewer when an interval is shorter than a thousand nanoseconds.
fn cells_per_request(rate: &Rate) -> NonZeroU32 {
    let interval = u32::try_from(rate.interval().as_nanos()).unwrap_or(u32::MAX);
    NonZeroU32::new(interval.clamp(1, 1_000)).unwrap_or(NonZeroU32::MIN)
}

/// The rate as a governor quota of cells: one cell every `interval / cells` (rounded up, so
/// the client never runs faster than the quota), with the burst plus the tolerance in cells.
fn cell_quota(rate: &Rate) -> Quota {
    let cells = cells_per_request(rate).get();
    let cell_ns = rate
        .interval()
        .as_nanos()
        .div_ceil(u128::from(cells))
        .max(1);
    let cell = Duration::from_nanos(u64::try_from(cell_ns).unwrap_or(u64::MAX));
    let tolerance = u32::try_from(rate.tolerance().as_nanos() / cell_ns).unwrap_or(u32::MAX);
    let burst = rate
        .burst()
        .max(1)
        .saturating_mul(cells)
        .saturating_add(tolerance);
    Quota::with_period(cell)
        .unwrap_or_else(|| {
            Quota::with_period(Duration::from_nanos(1)).expect("one nanosecond is a valid period")
        })
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

/// The in-process backend: one governor GCRA limiter per bucket, on tokio's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct GovernorLimiter {
    clock: TokioClock,
}

impl GovernorLimiter {
    /// A backend whose clock starts now.
    pub fn new() -> Self {
        Self::default()
    }

    fn decide(&self, bucket: &GovernorBucket) -> Decision {
        match bucket.limiter.check_n(bucket.cells) {
            Ok(Ok(())) => Decision::Allow,
            Ok(Err(not_until)) => Decision::Wait(not_until.wait_time_from(self.clock.now())),
            // The burst always holds at least one request's cells.
            Err(_) => Decision::Wait(Duration::MAX),
        }
    }
}

impl Limiter for GovernorLimiter {
    type Bucket = GovernorBucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> Self::Bucket {
        GovernorBucket {
            limiter: RateLimiter::direct_with_clock(cell_quota(&spec.rate), self.clock),
            cells: cells_per_request(&spec.rate),
        }
    }

    fn try_acquire(&self, bucket: &Self::Bucket) -> Option<Decision> {
        Some(self.decide(bucket))
    }

    #[allow(refining_impl_trait)]
    fn acquire(&self, bucket: &Self::Bucket) -> Ready<Result<Decision, BoxError>> {
        ready(Ok(self.decide(bucket)))
    }
}
