//! Token budgets: charged before sending, corrected after, taken together with the request.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};

use super::{Arrivals, CHAT, recorder, request};
use crate::body::RequestMeta;
use crate::classify::EndpointClass;
use crate::harness::send_all;
use crate::limit::error::TooManyTokens;
use crate::limit::{Adaptation, Limits, RateLimitLayer, TokenRequest};
use crate::quota::{GroupQuota, QuotaTable, Rate};

/// Chat at `requests_per_second`, and 1,000 tokens a second with a burst of 1,000; a request
/// costs exactly its `max_tokens`, so the tests can name every turn.
pub(super) fn token_limits(requests_per_second: u32) -> Limits {
    let exact = |rate: Rate| rate.with_tolerance(Duration::ZERO);
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(exact(Rate::per_second(requests_per_second)))
                .with_tokens(exact(Rate::per_second(1_000).with_burst(1_000))),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table)
        .adaptation(Adaptation::fixed())
        .token_estimate(|request: &TokenRequest<'_>| {
            request.meta.and_then(|meta| meta.max_tokens).unwrap_or(0)
        })
        .build()
}

/// A chat request for key `k` that costs `tokens`, labelled `label`.
pub(super) fn costing(tokens: u64, label: &str) -> Request<String> {
    let mut request = request(CHAT, "k", label);
    request.extensions_mut().insert(RequestMeta {
        max_tokens: Some(tokens),
        ..RequestMeta::default()
    });
    request
}

#[tokio::test(start_paused = true)]
async fn a_request_over_the_whole_token_burst_errors_at_once() {
    let arrivals = Arrivals::new();
    let service =
        RateLimitLayer::new(token_limits(10)).layer(recorder(arrivals.clone(), super::ok));
    let started = tokio::time::Instant::now();
    let error = service.oneshot(costing(1_001, "huge")).await.unwrap_err();
    let too_many = error
        .downcast_ref::<TooManyTokens>()
        .expect("TooManyTokens");
    assert_eq!((too_many.tokens(), too_many.burst()), (1_001, 1_000));
    assert_eq!(started.elapsed(), Duration::ZERO);
    assert!(arrivals.labels().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_big_prompt_waits_for_token_capacity_while_small_ones_keep_flowing() {
    let arrivals = Arrivals::new();
    let service =
        RateLimitLayer::new(token_limits(10)).layer(recorder(arrivals.clone(), super::ok));
    // 600 tokens at 0 leave 400; the big one needs 800, so 400 ms more. The small ones behind
    // it fit, and go at the request rate while it waits, pushing it back by their 200 tokens:
    // within the twice-its-wait it lets others pass.
    let requests = vec![
        costing(600, "first"),
        costing(800, "big"),
        costing(50, "small-1"),
        costing(50, "small-2"),
        costing(50, "small-3"),
        costing(50, "small-4"),
    ];
    let results = send_all(&service, requests).await;
    assert!(results.iter().all(Result::is_ok));
    let seen: Vec<(u128, String)> = arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .collect();
    let expected = [
        (0, "first"),
        (100, "small-1"),
        (200, "small-2"),
        (300, "small-3"),
        (400, "small-4"),
        (600, "big"),
    ];
    assert_eq!(
        seen,
        expected.map(|(at, label)| (at, label.to_owned())),
        "in strict order the big one would go at 400 and the small ones after it"
    );
}

#[tokio::test(start_paused = true)]
async fn a_big_prompt_is_never_starved_by_small_ones() {
    let arrivals = Arrivals::new();
    let service =
        RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), super::ok));
    // Small requests enough to use every token for seconds. At 0 the big one would wait 400 ms;
    // it lets small ones pass only while it would still go by twice that, 800 ms.
    let mut requests = vec![costing(600, "first"), costing(800, "big")];
    requests.extend((0..200).map(|i| costing(100, &format!("small-{i}"))));
    send_all(&service, requests).await;
    let big_at = arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .find(|(_, label)| label == "big")
        .unwrap()
        .0;
    assert!(big_at <= 800, "the big request went at {big_at} ms");
    let passed = arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .filter(|(at, label)| label.starts_with("small") && *at < big_at)
        .count();
    assert!(passed > 0, "no small request passed");
}

#[tokio::test(start_paused = true)]
async fn unused_max_tokens_come_back_once_the_answer_has_been_read() {
    let arrivals = Arrivals::new();
    // Every answer says it used 100 tokens.
    let respond = |_: usize| {
        Response::new(r#"{"choices":[],"usage":{"prompt_tokens":60,"completion_tokens":40,"total_tokens":100}}"#.to_owned())
    };
    let service = RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), respond));
    let start = tokio::time::Instant::now();
    for label in ["first", "second"] {
        let response = service.clone().oneshot(costing(900, label)).await.unwrap();
        // The correction comes when the body has been read to its end.
        response.into_body().collect().await.unwrap();
    }
    // 900 charged, 100 used: 800 came back, so the second 900 fits at once. Without the
    // refund it would have waited until 800 ms.
    assert_eq!(arrivals.times_ms(), [0, 10]);
    assert_eq!(start.elapsed(), Duration::from_millis(10));
}

#[tokio::test(start_paused = true)]
async fn a_request_waiting_for_tokens_goes_as_soon_as_an_answer_gives_them_back() {
    let arrivals = Arrivals::new();
    let respond = |_: usize| Response::new(r#"{"usage":{"total_tokens":100}}"#.to_owned());
    let service = RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), respond));
    let first = service
        .clone()
        .oneshot(costing(900, "first"))
        .await
        .unwrap();
    // 100 tokens are left: the second 900 is due at 800 ms by the rate alone, and sleeps.
    let second = tokio::spawn(service.clone().oneshot(costing(900, "second")));
    tokio::time::sleep(Duration::from_millis(50)).await;
    // The first answer is read at 50 ms: it used 100 of its 900, and the 800 it gives back
    // wake the waiting request.
    first.into_body().collect().await.unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(arrivals.times_ms(), [0, 50]);
}

#[tokio::test(start_paused = true)]
async fn an_answer_that_used_more_than_charged_is_charged_the_difference() {
    let arrivals = Arrivals::new();
    let respond = |_: usize| Response::new(r#"{"usage":{"total_tokens":700}}"#.to_owned());
    let service = RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), respond));
    for label in ["first", "second"] {
        let response = service.clone().oneshot(costing(100, label)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    // Each was charged 100 and used 700: the bucket owes 1,200 more, so a third request of
    // 500 tokens waits until 900 ms instead of going at 20 ms.
    let third = costing(500, "third");
    service.clone().oneshot(third).await.unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10, 900]);
}

#[tokio::test(start_paused = true)]
async fn tokens_of_a_request_the_server_refused_come_back() {
    let arrivals = Arrivals::new();
    let respond = |index: usize| {
        let mut response = Response::new(String::new());
        if index == 0 {
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert("retry-after-ms", "10".parse().unwrap());
        }
        response
    };
    let service = RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), respond));
    let refused = service
        .clone()
        .oneshot(costing(1_000, "refused"))
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
    // All 1,000 came back: the next 1,000 goes when the server's pause ends, not a second on.
    service
        .clone()
        .oneshot(costing(1_000, "next"))
        .await
        .unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn an_absurd_usage_costs_at_most_one_token_burst() {
    for reported in ["1000000000000", "18446744073709551615"] {
        let arrivals = Arrivals::new();
        let body = format!(r#"{{"usage":{{"total_tokens":{reported}}}}}"#);
        let respond = move |_: usize| Response::new(body.clone());
        let service =
            RateLimitLayer::new(token_limits(100)).layer(recorder(arrivals.clone(), respond));
        let response = service
            .clone()
            .oneshot(costing(100, "absurd"))
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        // Believed, the bucket would owe 1e12 tokens: 1e9 s at 1,000 a second. Charged the
        // burst instead, it owes 1,000: a full request of 1,000 goes one second later.
        service
            .clone()
            .oneshot(costing(1_000, "next"))
            .await
            .unwrap();
        assert_eq!(arrivals.times_ms(), [0, 1_000], "usage {reported}");
    }
}
