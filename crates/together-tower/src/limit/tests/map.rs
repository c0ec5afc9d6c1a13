//! The bucket map: idle buckets dropped, the count bounded, no busy bucket evicted.

use std::time::Duration;

use tower::Layer;

use crate::harness::{send_all, send_one};
use crate::limit::RateLimitLayer;
use crate::limit::error::TooManyBuckets;
use crate::quota::Rate;

use super::*;

#[tokio::test(start_paused = true)]
async fn idle_buckets_are_dropped_and_the_count_stays_bounded() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .max_buckets(100)
            .idle_timeout(Duration::from_secs(5))
            .build(),
    );
    let mut service = layer.layer(recorder(arrivals.clone(), ok));
    let mut most = 0;
    // A new key every 10 ms: each bucket is back at rest 100 ms after its request, so the map
    // stays bounded by dropping buckets at rest, and no key is ever refused.
    for key in 0..1_000 {
        let request = request(CHAT, &format!("key-{key}"), "x");
        send_one(&mut service, request).await.unwrap();
        most = most.max(service.limits().live_buckets());
        tokio::time::advance(Duration::from_millis(10)).await;
    }
    assert!(most <= 100, "{most} buckets live");
    assert_eq!(arrivals.times_ms().len(), 1_000);

    // A sweep marks what went unused since the one before; buckets unused for a whole
    // interval go at the next, so idle buckets are gone within two idle timeouts.
    for fresh in ["fresh-1", "fresh-2"] {
        tokio::time::advance(Duration::from_secs(6)).await;
        let request = request(CHAT, fresh, "x");
        send_one(&mut service, request).await.unwrap();
    }
    assert_eq!(service.limits().live_buckets(), 2, "idle buckets were kept");
}

#[tokio::test(start_paused = true)]
async fn a_bucket_is_not_dropped_before_it_has_refilled() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_minute(1)))
            .max_buckets(100)
            .idle_timeout(Duration::from_secs(1))
            .max_wait(Duration::from_secs(120))
            .build(),
    );
    let mut service = layer.layer(recorder(arrivals.clone(), ok));
    send_one(&mut service, request(CHAT, "k", "first"))
        .await
        .unwrap();
    tokio::time::advance(Duration::from_secs(10)).await;
    // A new key triggers a sweep; the first key's bucket is idle but not yet refilled.
    send_one(&mut service, request(CHAT, "other", "other"))
        .await
        .unwrap();
    send_one(&mut service, request(CHAT, "k", "second"))
        .await
        .unwrap();
    let times = arrivals.times_ms();
    assert_eq!(times, [0, 10_000, 60_000]);
}

/// Hardening: a flood of new keys never evicts a bucket that is not at rest; the keys that
/// find no room are refused with `TooManyBuckets`, and find room once buckets are at rest.
#[tokio::test(start_paused = true)]
async fn a_flood_of_new_keys_never_hands_a_busy_key_a_fresh_burst() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .max_buckets(64)
            .build(),
    );
    let mut service = layer.layer(recorder(arrivals.clone(), ok));
    send_one(&mut service, request(CHAT, "hot", "hot-1"))
        .await
        .unwrap();
    // Many more new keys than the map holds, all at once.
    let flood: Vec<_> = (0..500)
        .map(|i| request(CHAT, &format!("flood-{i}"), "flood"))
        .collect();
    let results = send_all(&service, flood).await;
    assert!(service.limits().live_buckets() <= 64);
    let refused: Vec<&TooManyBuckets> = results
        .iter()
        .filter_map(|result| result.as_ref().err())
        .map(|error| {
            error
                .downcast_ref::<TooManyBuckets>()
                .expect("TooManyBuckets")
        })
        .collect();
    // The map had room for 63 more; each of the rest was told when to come back.
    assert_eq!(refused.len(), 500 - 63);
    assert!(refused.iter().all(
        |error| error.max_buckets() == 64 && error.retry_after() <= Duration::from_millis(100)
    ));
    // The hot key used its turn at 0; its next is at 100 ms, flood or no flood.
    send_one(&mut service, request(CHAT, "hot", "hot-2"))
        .await
        .unwrap();
    let seen: Vec<(u128, String)> = arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .filter(|(_, label)| label.starts_with("hot"))
        .collect();
    assert_eq!(seen, [(0, "hot-1".to_owned()), (100, "hot-2".to_owned())]);
    // By then the flood's buckets are at rest, and new keys find room again.
    send_one(&mut service, request(CHAT, "late", "late"))
        .await
        .unwrap();
}
