//! Backends that need I/O, and those that reserve turns, keep the same schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tower::{BoxError, Layer, ServiceExt};

use crate::harness::{send_all, send_one};
use crate::limit::error::RateLimited;
use crate::limit::{
    Backend, BucketSpec, Cost, Decision, Immediate, LocalBackend, RateLimitLayer, Rates,
};
use crate::quota::Rate;

use super::*;

/// A backend that always needs "I/O": it never decides at once, and answers after a yield.
/// With `reserve`, it takes a turn up to the request's max wait ahead, as the Redis backend
/// does.
#[derive(Debug, Clone, Default)]
struct RemoteBackend {
    inner: LocalBackend,
    fail: bool,
    reserve: bool,
    asked: Arc<AtomicUsize>,
}

impl Backend for RemoteBackend {
    type Bucket = <LocalBackend as Backend>::Bucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> Self::Bucket {
        self.inner.bucket(spec)
    }

    fn try_acquire(&self, _: &Self::Bucket, _: Cost, _: Duration) -> Option<Immediate> {
        None
    }

    async fn acquire(
        &self,
        bucket: &Self::Bucket,
        cost: Cost,
        now: Duration,
        max_wait: Duration,
    ) -> Result<Decision, BoxError> {
        tokio::task::yield_now().await;
        self.asked.fetch_add(1, Ordering::Relaxed);
        if self.fail {
            return Err("backend unreachable".into());
        }
        match self.inner.acquire(bucket, cost, now, max_wait).await? {
            Decision::Wait(wait) if self.reserve && wait <= max_wait => {
                // Deciding at the turn's time takes the turn for then.
                let at = now + wait;
                match self.inner.try_acquire(bucket, cost, at) {
                    Some(Immediate::Allow) => Ok(Decision::Reserved(wait)),
                    other => Err(format!("no turn at the time promised: {other:?}").into()),
                }
            }
            decision => Ok(decision),
        }
    }

    fn release(&self, bucket: &Self::Bucket, cost: Cost, now: Duration) {
        self.inner.release(bucket, cost, now);
    }

    fn correct_tokens(&self, bucket: &Self::Bucket, charged: u64, used: u64, now: Duration) {
        self.inner.correct_tokens(bucket, charged, used, now);
    }

    fn set_rates(&self, bucket: &Self::Bucket, rates: Rates, now: Duration) {
        self.inner.set_rates(bucket, rates, now);
    }

    fn until_rest(&self, bucket: &Self::Bucket, now: Duration) -> Duration {
        self.inner.until_rest(bucket, now)
    }
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_needs_io_gives_the_same_schedule() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .backend(RemoteBackend::default())
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    send_all(&service, chat_requests(5, "k")).await;
    assert_eq!(arrivals.times_ms(), [0, 100, 200, 300, 400]);
    assert_eq!(arrivals.labels(), ["0", "1", "2", "3", "4"]);

    let failing = RemoteBackend {
        fail: true,
        ..RemoteBackend::default()
    };
    let service = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .backend(failing)
            .build(),
    )
    .layer(recorder(arrivals.clone(), ok));
    let error = service.oneshot(request(CHAT, "k", "x")).await.unwrap_err();
    assert_eq!(error.to_string(), "backend unreachable");
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_reserves_asks_once_per_request_and_keeps_the_schedule() {
    let arrivals = Arrivals::new();
    let limiter = RemoteBackend {
        reserve: true,
        ..RemoteBackend::default()
    };
    let asked = Arc::clone(&limiter.asked);
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .backend(limiter)
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    send_all(&service, chat_requests(5, "k")).await;
    assert_eq!(arrivals.times_ms(), [0, 100, 200, 300, 400]);
    assert_eq!(arrivals.labels(), ["0", "1", "2", "3", "4"]);
    // Each waiter slept once on its reservation instead of asking again after its wait.
    assert_eq!(asked.load(Ordering::Relaxed), 5);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_dropped_before_its_time_gives_the_turn_back() {
    let arrivals = Arrivals::new();
    let limiter = RemoteBackend {
        reserve: true,
        ..RemoteBackend::default()
    };
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .backend(limiter)
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    send_one(&mut service.clone(), request(CHAT, "k", "first"))
        .await
        .unwrap();
    // Reserved for 1 s, and given up half way.
    let reserved = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "reserved")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    reserved.abort();
    assert!(reserved.await.unwrap_err().is_cancelled());
    // The turn at 1 s is free again for the next request.
    send_one(&mut service.clone(), request(CHAT, "k", "next"))
        .await
        .unwrap();
    assert_eq!(arrivals.labels(), ["first", "next"]);
    assert_eq!(arrivals.times_ms(), [0, 1_000]);
}

#[tokio::test(start_paused = true)]
async fn a_reservation_farther_than_the_max_wait_is_not_made() {
    let limiter = RemoteBackend {
        reserve: true,
        ..RemoteBackend::default()
    };
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_wait(Duration::from_millis(300))
            .backend(limiter)
            .build(),
    );
    let arrivals = Arrivals::new();
    let service = layer.layer(recorder(arrivals.clone(), ok));
    send_one(&mut service.clone(), request(CHAT, "k", "first"))
        .await
        .unwrap();
    let error = send_one(&mut service.clone(), request(CHAT, "k", "second"))
        .await
        .unwrap_err();
    assert!(error.downcast_ref::<RateLimited>().is_some(), "{error}");
    // Nothing was reserved: the turn at 1 s is still there.
    tokio::time::sleep(Duration::from_secs(1)).await;
    send_one(&mut service.clone(), request(CHAT, "k", "third"))
        .await
        .unwrap();
    assert_eq!(arrivals.times_ms(), [0, 1_000]);
}
