//! Bounds: a full queue, a wait past `max_wait`, a dropped waiter, busy slots: each refused
//! at once or given back, never a hang.

use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_test::mock;

use crate::classify::EndpointClass;
use crate::harness::{send_all, send_one};
use crate::limit::error::{QueueFull, RateLimited, SlotsBusy};
use crate::limit::{MaxWait, RateLimitLayer};
use crate::quota::Rate;

use super::*;

#[tokio::test(start_paused = true)]
async fn a_full_queue_answers_queue_full_at_once() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_queue(2)
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    let started = Instant::now();
    let results = send_all(&service, chat_requests(5, "k")).await;
    let errors: Vec<_> = results.iter().map(|result| result.as_ref().err()).collect();
    assert!(errors[..3].iter().all(Option::is_none));
    for error in &errors[3..] {
        let full = error
            .unwrap()
            .downcast_ref::<QueueFull>()
            .expect("QueueFull");
        assert_eq!(full.max_queue(), 2);
        assert_eq!(full.class(), EndpointClass::Chat);
    }
    assert_eq!(arrivals.times_ms(), [0, 1_000, 2_000]);
    assert_eq!(started.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn a_wait_beyond_max_wait_answers_rate_limited_at_once_and_takes_nothing() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_wait(Duration::from_millis(1_500))
            .build(),
    );
    let mut service = layer.layer(recorder(arrivals.clone(), ok));
    let results = send_all(&service, chat_requests(3, "k")).await;
    assert!(results[0].is_ok() && results[1].is_ok());
    let limited = results[2]
        .as_ref()
        .unwrap_err()
        .downcast_ref::<RateLimited>()
        .expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(2));
    assert_eq!(arrivals.times_ms(), [0, 1_000]);

    // The refused request took no turn: the next one goes exactly one interval later.
    let response = send_one(&mut service, request(CHAT, "k", "after")).await;
    assert!(response.is_ok());
    assert_eq!(arrivals.times_ms(), [0, 1_000, 2_000]);
}

#[tokio::test(start_paused = true)]
async fn a_requests_own_max_wait_overrides_the_layers() {
    let arrivals = Arrivals::new();
    let mut service = RateLimitLayer::new(static_limits(table(Rate::per_second(1))).build())
        .layer(recorder(arrivals.clone(), ok));
    send_one(&mut service, request(CHAT, "k", "first"))
        .await
        .unwrap();
    let mut impatient = request(CHAT, "k", "impatient");
    impatient.extensions_mut().insert(MaxWait(Duration::ZERO));
    let error = send_one(&mut service, impatient).await.unwrap_err();
    let limited = error.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), Duration::from_secs(1));
    assert_eq!(arrivals.labels(), ["first"]);
}

#[tokio::test(start_paused = true)]
async fn an_unbounded_max_wait_waits_as_long_as_it_takes() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_hour(1)))
            .max_wait(Duration::MAX)
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    let mut requests = chat_requests(2, "k");
    requests[1].extensions_mut().insert(MaxWait(Duration::MAX));
    let results = send_all(&service, requests).await;
    assert!(results.iter().all(Result::is_ok));
    assert_eq!(arrivals.times_ms(), [0, 3_600_000]);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_frees_its_place_and_consumes_nothing() {
    let arrivals = Arrivals::new();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_queue(2)
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    let first = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "first")));
    // The head waiter (asleep until 1 s) and one queued behind it.
    let head = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "head")));
    let queued = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "queued")));
    tokio::task::yield_now().await;
    first.await.unwrap().unwrap();

    head.abort();
    queued.abort();
    assert!(head.await.unwrap_err().is_cancelled());
    assert!(queued.await.unwrap_err().is_cancelled());

    // Both places are free again (max_queue is 2), and the turn at 1 s is still there.
    let later = send_all(&service, chat_requests(2, "k")).await;
    assert!(later.iter().all(Result::is_ok));
    assert_eq!(arrivals.labels(), ["first", "0", "1"]);
    assert_eq!(arrivals.times_ms(), [0, 1_000, 2_000]);
}

#[tokio::test(start_paused = true)]
async fn a_slot_that_stays_busy_past_max_wait_is_slots_busy() {
    let (service, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_wait(Duration::from_secs(5))
            .build(),
    );
    let service = layer.layer(service);
    let _held: Vec<_> = (0..2)
        .map(|i| {
            tokio::spawn(
                service
                    .clone()
                    .oneshot(request(FINE_TUNES, "k", i.to_string())),
            )
        })
        .collect();
    let _replies = (
        handle.next_request().await.unwrap(),
        handle.next_request().await.unwrap(),
    );
    let started = Instant::now();
    let error = service
        .clone()
        .oneshot(request(FINE_TUNES, "k", "late"))
        .await
        .unwrap_err();
    let busy = error.downcast_ref::<SlotsBusy>().expect("SlotsBusy");
    assert_eq!(busy.waited(), Duration::from_secs(5));
    assert_eq!(started.elapsed(), Duration::from_secs(5));
}

/// Hardening: a waiter whose caller gives up while the inner service is busy takes nothing.
#[tokio::test(start_paused = true)]
async fn a_waiter_dropped_while_the_inner_service_is_busy_takes_no_turn() {
    // One call in flight at a time below the limiter, as a tower ConcurrencyLimit or BufferBody
    // would allow; the mock holds each call until the test answers it.
    let (mock, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let busy = tower::limit::ConcurrencyLimit::new(mock, 1);
    let service =
        RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build()).layer(busy);
    let start = Instant::now();
    let at = |ms| tokio::time::sleep_until(start + Duration::from_millis(ms));

    // 0 ms: key k's first request goes and is answered; k's next turn is at 100 ms.
    let first = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "first")));
    let (_, reply) = handle.next_request().await.unwrap();
    reply.send_response(Response::new(String::new()));
    first.await.unwrap().unwrap();
    // 20 ms: the inner service is free, so this one passes `poll_ready` and queues for the
    // turn at 100 ms. Its caller gives up at 150 ms.
    at(20).await;
    let gives_up = tokio::spawn(tokio::time::timeout(
        Duration::from_millis(130),
        service.clone().oneshot(request(CHAT, "k", "gives-up")),
    ));
    // 30 ms: another key's request takes the inner service's only slot until 160 ms.
    at(30).await;
    let other = tokio::spawn(service.clone().oneshot(request(CHAT, "other", "other")));
    let (_, other_reply) = handle.next_request().await.unwrap();
    assert!(gives_up.await.unwrap().is_err(), "it should have timed out");

    // 150 ms: k's next request.
    let next = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "next")));
    at(160).await;
    other_reply.send_response(Response::new(String::new()));
    other.await.unwrap().unwrap();
    let (sent, next_reply) = handle.next_request().await.unwrap();
    assert_eq!(sent.headers()["x-label"], "next");
    // The turn at 100 ms was never used, so k's next request goes as soon as the inner
    // service is free, not an interval after the abandoned one.
    assert_eq!(start.elapsed(), Duration::from_millis(160));
    next_reply.send_response(Response::new(String::new()));
    next.await.unwrap().unwrap();
}
