//! The server's word: 429s and used-up limits close a bucket for the other waiters, within
//! bounds.

use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::Instant;
use tower::Layer;

use crate::harness::{send_all, send_one};
use crate::limit::RateLimitLayer;
use crate::limit::error::RateLimited;
use crate::quota::Rate;

use super::*;

#[tokio::test(start_paused = true)]
async fn a_429_closes_the_bucket_for_the_other_waiters() {
    let arrivals = Arrivals::new();
    let respond = |index: usize| {
        let mut response = Response::new(String::new());
        if index == 0 {
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert("retry-after", "5".parse().unwrap());
        }
        response
    };
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
        .layer(recorder(arrivals.clone(), respond));
    let results = send_all(&service, chat_requests(3, "k")).await;
    assert_eq!(
        results[0].as_ref().unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(arrivals.times_ms(), [0, 5_000, 5_100]);
}

#[tokio::test(start_paused = true)]
async fn no_requests_remaining_closes_the_bucket_until_the_reset() {
    let arrivals = Arrivals::new();
    let respond = |index: usize| {
        let mut response = Response::new(String::new());
        if index == 0 {
            response
                .headers_mut()
                .insert("x-ratelimit-remaining", "0".parse().unwrap());
            response
                .headers_mut()
                .insert("x-ratelimit-reset", "2".parse().unwrap());
        }
        response
    };
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
        .layer(recorder(arrivals.clone(), respond));
    send_all(&service, chat_requests(3, "k")).await;
    assert_eq!(arrivals.times_ms(), [0, 2_000, 2_100]);
}

#[tokio::test(start_paused = true)]
async fn absurd_server_hints_are_clamped_and_missing_ones_get_the_default_pause() {
    for (retry_after, expected) in [(Some("99999999"), [0, 3_000]), (None, [0, 1_000])] {
        let arrivals = Arrivals::new();
        let respond = move |index: usize| {
            let mut response = Response::new(String::new());
            if index == 0 {
                *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                if let Some(value) = retry_after {
                    response
                        .headers_mut()
                        .insert("retry-after", value.parse().unwrap());
                }
            }
            response
        };
        let layer = RateLimitLayer::new(
            static_limits(table(Rate::per_second(100)))
                .max_pause(Duration::from_secs(3))
                .build(),
        );
        let service = layer.layer(recorder(arrivals.clone(), respond));
        send_all(&service, chat_requests(2, "k")).await;
        assert_eq!(arrivals.times_ms(), expected, "retry-after {retry_after:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_closed_bucket_refuses_at_once_what_would_wait_too_long() {
    let arrivals = Arrivals::new();
    let respond = |_: usize| {
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
            .headers_mut()
            .insert("retry-after", "20".parse().unwrap());
        response
    };
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(100)))
            .max_wait(Duration::from_secs(10))
            .build(),
    );
    let mut service = layer.layer(recorder(arrivals.clone(), respond));
    send_one(&mut service, request(CHAT, "k", "a"))
        .await
        .unwrap();
    let started = Instant::now();
    let error = send_one(&mut service, request(CHAT, "k", "b"))
        .await
        .unwrap_err();
    assert_eq!(
        error.downcast_ref::<RateLimited>().unwrap().retry_after(),
        Duration::from_secs(20)
    );
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert_eq!(arrivals.labels(), ["a"]);
}

#[tokio::test(start_paused = true)]
async fn a_used_up_limit_closes_the_bucket_only_when_it_resets_after_the_next_turn() {
    // Every answer says no requests remain; at 10/s the next turn is 100 ms away.
    for (reset, expected) in [("0.1", [0, 100, 200]), ("0.3", [0, 300, 600])] {
        let arrivals = Arrivals::new();
        let respond = move |_: usize| {
            let mut response = Response::new(String::new());
            let headers = response.headers_mut();
            headers.insert("x-ratelimit-remaining", "0".parse().unwrap());
            headers.insert("x-ratelimit-reset", reset.parse().unwrap());
            response
        };
        let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
            .layer(recorder(arrivals.clone(), respond));
        send_all(&service, chat_requests(3, "k")).await;
        assert_eq!(arrivals.times_ms(), expected, "reset {reset}");
    }
}
