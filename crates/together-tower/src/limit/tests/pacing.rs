//! Pacing: turns at the rate, first come first served, per bucket; the tolerance; the
//! service's readiness and its types.

use std::convert::Infallible;
use std::time::Duration;

use http::{Request, Response};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

use crate::classify::EndpointClass;
use crate::harness::send_all;
use crate::limit::{Limits, RateLimit, RateLimitLayer};
use crate::quota::{GroupQuota, QuotaTable, Rate};

use super::*;

#[tokio::test(start_paused = true)]
async fn n_requests_at_rate_r_over_burst_b_take_exactly_n_minus_b_over_r() {
    // 20 requests at 10/s: (20 - b) / 10 seconds from the first to the last.
    for (burst, last_ms) in [(1, 1_900), (5, 1_500), (10, 1_000)] {
        let arrivals = Arrivals::new();
        let layer = RateLimitLayer::new(
            static_limits(table(Rate::per_second(10).with_burst(burst))).build(),
        );
        let service = layer.layer(recorder(arrivals.clone(), ok));
        let results = send_all(&service, chat_requests(20, "k")).await;
        assert!(results.iter().all(Result::is_ok));
        let expected: Vec<u128> = (1..=20u128)
            .map(|n| n.saturating_sub(burst.into()) * 100)
            .collect();
        assert_eq!(arrivals.times_ms(), expected, "burst {burst}");
        assert_eq!(*expected.last().unwrap(), last_ms);
    }
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_first_come_first_served() {
    let arrivals = Arrivals::new();
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
        .layer(recorder(arrivals.clone(), ok));
    let labels: Vec<String> = (0..50).map(|i| format!("r{i}")).collect();
    let requests = labels
        .iter()
        .map(|label| request(CHAT, "k", label.clone()))
        .collect();
    send_all(&service, requests).await;
    assert_eq!(arrivals.labels(), labels);
    assert_eq!(*arrivals.times_ms().last().unwrap(), 4_900);
}

#[tokio::test(start_paused = true)]
async fn keys_and_groups_do_not_share_buckets_but_shared_groups_do() {
    let arrivals = Arrivals::new();
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(1))).build())
        .layer(recorder(arrivals.clone(), ok));
    let requests = vec![
        request(CHAT, "key-a", "a-chat"),
        request(CHAT, "key-b", "b-chat"),
        request(CHAT, "", "anonymous-chat"),
        request(EMBEDDINGS, "key-a", "a-embeddings"),
        request(COMPLETIONS, "key-a", "a-completions"),
        request(CHAT, "", "anonymous-chat-2"),
    ];
    send_all(&service, requests).await;
    let seen: Vec<(u128, String)> = arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .collect();
    let at = |label: &str| seen.iter().find(|(_, l)| l == label).unwrap().0;
    assert_eq!(at("a-chat"), 0);
    assert_eq!(at("b-chat"), 0);
    assert_eq!(at("anonymous-chat"), 0);
    assert_eq!(at("a-embeddings"), 0);
    // Completions share the chat group, and requests without a key share one bucket.
    assert_eq!(at("a-completions"), 1_000);
    assert_eq!(at("anonymous-chat-2"), 1_000);
    assert_eq!(service.limits().live_buckets(), 4);
}

#[tokio::test(start_paused = true)]
async fn unlimited_classes_pass_straight_through_without_a_bucket() {
    let arrivals = Arrivals::new();
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(1))).build())
        .layer(recorder(arrivals.clone(), ok));
    let requests = (0..5)
        .map(|i| request("/v1/models", "k", i.to_string()))
        .collect();
    send_all(&service, requests).await;
    assert_eq!(arrivals.times_ms(), vec![0; 5]);
    assert_eq!(service.limits().live_buckets(), 0);
}

#[tokio::test(start_paused = true)]
async fn poll_ready_is_the_inner_services() {
    let (service, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let mut service =
        RateLimitLayer::new(static_limits(table(Rate::per_second(1))).build()).layer(service);
    handle.allow(0);
    assert!(poll_ready_once(&mut service).is_pending());
    handle.allow(1);
    assert!(
        tokio::time::timeout(Duration::from_secs(1), service.ready())
            .await
            .is_ok()
    );
}

/// Polls `poll_ready` once with a no-op waker.
fn poll_ready_once<S: Service<Request<String>>>(
    service: &mut S,
) -> std::task::Poll<Result<(), S::Error>> {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    service.poll_ready(&mut context)
}

#[test]
fn the_service_fits_boxed_sync_services_and_its_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let service = tower::service_fn(|_: Request<String>| async {
        Ok::<_, Infallible>(Response::new(String::new()))
    });
    let limited: RateLimit<_> = RateLimitLayer::new(Limits::default()).layer(service);
    let future = limited.clone().call(request(CHAT, "k", "x"));
    assert_send(&future);
    let boxed = tower::util::BoxCloneSyncService::new(limited);
    let _clone = boxed.clone();
}

#[tokio::test(start_paused = true)]
async fn the_pacing_tolerance_wakes_waiters_early_so_late_timers_keep_the_schedule() {
    // The default tolerance at 10/s is 2 ms: each turn may go 2 ms early, and the schedule
    // stays on whole intervals instead of starting again from a late wake-up.
    for (rate, expected) in [
        (Rate::per_second(10), [0, 98, 198, 298]),
        (
            Rate::per_second(10).with_tolerance(Duration::from_millis(5)),
            [0, 95, 195, 295],
        ),
        (
            Rate::per_second(10).with_tolerance(Duration::ZERO),
            [0, 100, 200, 300],
        ),
    ] {
        let arrivals = Arrivals::new();
        let table = QuotaTable::builder()
            .group("chat", GroupQuota::rate(rate))
            .class(EndpointClass::Chat, "chat")
            .build()
            .unwrap();
        let service =
            RateLimitLayer::new(static_limits(table).build()).layer(recorder(arrivals.clone(), ok));
        send_all(&service, chat_requests(4, "k")).await;
        assert_eq!(arrivals.times_ms(), expected, "{:?}", rate.tolerance());
    }
}
