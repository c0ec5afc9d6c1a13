//! The in-process backend: each bucket's GCRA state in memory, under a lock of its own.

use std::future::{Ready, ready};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tower::BoxError;

use super::gcra::{Gcra, nanos};
use super::{Backend, BucketSpec, Cost, Decision, Immediate, Rates};

/// The in-process backend: the GCRA state of each bucket in memory, decided under a lock
/// that only requests of the same bucket share.
#[derive(Debug, Clone, Copy, Default)]
pub struct LocalBackend;

impl LocalBackend {
    /// The in-process backend.
    pub fn new() -> Self {
        Self
    }
}

/// One bucket of [`LocalBackend`]: a request GCRA and a token GCRA.
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
    fn decide(&mut self, cost: Cost, now: u64) -> Immediate {
        let wait = |gcra: &Option<Gcra>, units| {
            gcra.as_ref().map_or(Some(0), |gcra| gcra.wait(units, now))
        };
        let (Some(requests), Some(tokens)) = (
            wait(&self.requests, cost.requests),
            wait(&self.tokens, cost.tokens),
        ) else {
            return Immediate::TooLarge;
        };
        if tokens > requests {
            return Immediate::WaitForTokens {
                request: Duration::from_nanos(requests),
                tokens: Duration::from_nanos(tokens),
            };
        }
        if requests > 0 {
            return Immediate::Wait(Duration::from_nanos(requests));
        }
        // Both fit: take both, under the one lock, so neither is spent while the other waits.
        if let Some(gcra) = &mut self.requests {
            gcra.take(cost.requests, now);
        }
        if let Some(gcra) = &mut self.tokens {
            gcra.take(cost.tokens, now);
        }
        Immediate::Allow
    }
}

impl Backend for LocalBackend {
    type Bucket = LocalBucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> LocalBucket {
        LocalBucket {
            state: Mutex::new(LocalState {
                requests: spec.rates.requests.map(|pace| Gcra::new(pace.to_gcra())),
                tokens: spec.rates.tokens.map(|pace| Gcra::new(pace.to_gcra())),
            }),
        }
    }

    fn try_acquire(&self, bucket: &LocalBucket, cost: Cost, now: Duration) -> Option<Immediate> {
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
        ready(Ok(bucket.lock().decide(cost, nanos(now)).into()))
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
