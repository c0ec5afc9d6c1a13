//! Adaptive limits against servers that count differently from the table: whole-second hints
//! sent by rote, refusals that name the limit that ran out, stated limits that are not
//! repeated, and windows that remember the last second.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Response, StatusCode};
use tokio::time::Instant;
use tower::Layer;

use super::{Arrivals, CHAT, chat_requests, recorder, request, table};
use crate::body::RequestMeta;
use crate::classify::EndpointClass;
use crate::harness::send_all;
use crate::limit::{Adaptation, Limits, RateLimitLayer, TokenRequest};
use crate::quota::{GroupQuota, QuotaTable, Rate};

fn limits(table: QuotaTable, adaptation: Adaptation) -> Limits {
    Limits::builder(table).adaptation(adaptation).build()
}

/// Refuses request `refused` with `Retry-After: 1` and nothing more precise, as nginx's
/// `limit_req` and many gateways do; serves the others.
fn whole_second_refusal(
    refused: usize,
) -> impl Fn(usize) -> Response<String> + Clone + Send + Sync {
    move |index| {
        let mut response = Response::new(String::new());
        if index == refused {
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert("retry-after", "1".parse().unwrap());
        }
        response
    }
}

#[tokio::test(start_paused = true)]
async fn a_whole_second_retry_after_does_not_idle_an_adaptive_bucket() {
    let arrivals = Arrivals::new();
    let limits = limits(table(Rate::per_second(10)), Adaptation::default());
    let service = RateLimitLayer::new(limits.clone())
        .layer(recorder(arrivals.clone(), whole_second_refusal(2)));
    send_all(&service, chat_requests(6, "k")).await;
    let times = arrivals.times_ms();
    // The third is refused: the bucket holds back a turn (100 ms), and the rest go on at
    // the cut rate (80% of 10 a second, 125 ms apart), not a second later.
    assert_eq!(times[..4], [0, 100, 200, 325]);
    assert!(times[5] <= 700, "{times:?}");
    assert_eq!(limits.snapshot()[0].rate_changes.refused, 1);
}

#[tokio::test(start_paused = true)]
async fn a_whole_second_retry_after_closes_a_static_bucket_for_the_second() {
    let arrivals = Arrivals::new();
    let limits = limits(table(Rate::per_second(10)), Adaptation::fixed());
    let service = RateLimitLayer::new(limits.clone())
        .layer(recorder(arrivals.clone(), whole_second_refusal(2)));
    send_all(&service, chat_requests(4, "k")).await;
    // Static mode keeps the conservative closure: the server said a second.
    assert_eq!(arrivals.times_ms(), [0, 100, 200, 1_200]);
}

/// Chat at 10 requests a second and 1,000 tokens a second; a request costs its `max_tokens`.
fn with_tokens() -> Limits {
    let exact = |rate: Rate| rate.with_tolerance(Duration::ZERO);
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(exact(Rate::per_second(10)))
                .with_tokens(exact(Rate::per_second(1_000).with_burst(1_000))),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table)
        .token_estimate(|request: &TokenRequest<'_>| {
            request.meta.and_then(|meta| meta.max_tokens).unwrap_or(0)
        })
        .build()
}

/// Refuses the first request with Together's body naming the limit that ran out.
fn refusing_with(kind: &'static str) -> impl Fn(usize) -> Response<String> + Clone + Send + Sync {
    move |index| {
        if index > 0 {
            return Response::new(String::new());
        }
        let body = format!(
            r#"{{"error":{{"message":"slow down","type":"{kind}","param":null,"code":null}}}}"#
        );
        let mut response = Response::new(body.clone());
        *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        response
    }
}

/// Sends one chat request costing 100 tokens through `limits` against `respond`; returns the
/// body the caller read.
async fn one_refused(
    limits: &Limits,
    respond: impl Fn(usize) -> Response<String> + Clone + Send + Sync + 'static,
) -> String {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(Arrivals::new(), respond));
    let mut chat = request(CHAT, "k", "0");
    chat.extensions_mut().insert(RequestMeta {
        max_tokens: Some(100),
        ..RequestMeta::default()
    });
    let response = service.oneshot(chat).await.unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_token_limited_refusal_cuts_the_tokens_and_leaves_the_request_rate_alone() {
    let limits = with_tokens();
    let body = one_refused(&limits, refusing_with("dynamic_token_limited")).await;
    // The caller still reads the whole body, though the limiter read it first.
    assert!(body.contains("dynamic_token_limited"), "{body}");
    let bucket = &limits.snapshot()[0];
    assert_eq!(bucket.requests_per_second, Some(10.0));
    assert!(bucket.tokens_per_second.unwrap() < 1_000.0, "{bucket:?}");
}

#[tokio::test(start_paused = true)]
async fn a_request_limited_refusal_cuts_the_request_rate_and_leaves_the_tokens_alone() {
    let limits = with_tokens();
    one_refused(&limits, refusing_with("dynamic_request_limited")).await;
    let bucket = &limits.snapshot()[0];
    assert!(bucket.requests_per_second.unwrap() < 10.0, "{bucket:?}");
    assert_eq!(bucket.tokens_per_second, Some(1_000.0));
}

#[tokio::test(start_paused = true)]
async fn a_stated_limit_that_is_not_repeated_fades() {
    // Two answers say the limit is 1 a second; every later one says nothing.
    let respond = |index: usize| {
        let mut response = Response::new(String::new());
        if index < 2 {
            response
                .headers_mut()
                .insert("x-ratelimit-limit", "1".parse().unwrap());
        }
        response
    };
    let limits = limits(table(Rate::per_second(10)), Adaptation::default());
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(Arrivals::new(), respond));
    send_all(&service, chat_requests(3, "k")).await;
    let rate = || limits.snapshot()[0].requests_per_second.unwrap();
    assert_eq!(rate(), 1.0);
    // Back at the table's rate within half a minute, not held there for good.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let fading = rate();
    assert!(fading > 1.0 && fading < 10.0, "{fading}");
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(rate(), 10.0);
}

/// Answers `status` to a request when `capacity` were served in the second before it: a
/// sliding log, as a server that counts the last second keeps.
fn last_second(
    capacity: usize,
    status: StatusCode,
) -> impl Fn(usize) -> Response<String> + Clone + Send + Sync {
    let served = Arc::new(Mutex::new(std::collections::VecDeque::<Instant>::new()));
    move |_| {
        let now = Instant::now();
        let mut served = served.lock().unwrap();
        while served
            .front()
            .is_some_and(|at| now.duration_since(*at) >= Duration::from_secs(1))
        {
            served.pop_front();
        }
        let mut response = Response::new(String::new());
        if served.len() >= capacity {
            *response.status_mut() = status;
        } else {
            served.push_back(now);
        }
        response
    }
}

#[tokio::test(start_paused = true)]
async fn unavailable_answers_from_a_last_second_window_do_not_cascade() {
    let limits = limits(table(Rate::per_second(100)), Adaptation::default());
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(
        Arrivals::new(),
        last_second(60, StatusCode::SERVICE_UNAVAILABLE),
    ));
    let stream = tokio::spawn(async move { send_all(&service, chat_requests(1_000, "k")).await });
    let mut rates = Vec::new();
    while !stream.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rates.push(limits.snapshot()[0].requests_per_second.unwrap());
    }
    let unavailable = stream
        .await
        .unwrap()
        .iter()
        .filter(|answer| answer.as_ref().unwrap().status() == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    // The first second's 503s, and the window still full after the first cut, cut once: the
    // rate never falls far below the capacity, and few requests meet a 503.
    let lowest = rates.iter().copied().fold(f64::MAX, f64::min);
    assert!(lowest >= 45.0, "lowest {lowest}: {rates:?}");
    assert!(unavailable <= 100, "{unavailable} 503s: {rates:?}");
}

#[tokio::test(start_paused = true)]
async fn a_flood_of_refusals_holds_the_bucket_until_a_window_after_the_first() {
    // Told 100 a second; the server takes 5 in any second, and refuses the rest without a
    // hint.
    let arrivals = Arrivals::new();
    let limits = limits(table(Rate::per_second(100)), Adaptation::default());
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(
        arrivals.clone(),
        last_second(5, StatusCode::TOO_MANY_REQUESTS),
    ));
    let answers = send_all(&service, chat_requests(30, "k")).await;
    let times = arrivals.times_ms();
    // Five served at the table's pace, then refusals hold the bucket twice as long each: a
    // handful are refused, not the ninety-five of the first second at the table's rate...
    let first_second = times.iter().filter(|&&at| at < 1_000).count();
    assert!((6..=12).contains(&first_second), "{times:?}");
    // ...and the sending resumes once the server's second is over, a window after the first
    // refusal (50 ms), not a window after the last.
    let resumed = times[first_second];
    assert!((1_000..=1_100).contains(&resumed), "{times:?}");
    assert_eq!(
        answers[first_second].as_ref().unwrap().status(),
        StatusCode::OK
    );
}

#[tokio::test(start_paused = true)]
async fn a_wall_far_below_the_table_is_found_and_kept_with_few_refusals() {
    let arrivals = Arrivals::new();
    // Every request waits its turn, however long the queue at the wall's pace.
    let limits = Limits::builder(table(Rate::per_second(100)))
        .max_wait(Duration::from_secs(600))
        .build();
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(
        arrivals.clone(),
        last_second(5, StatusCode::TOO_MANY_REQUESTS),
    ));
    let answers = send_all(&service, chat_requests(200, "k")).await;
    let refused = answers
        .iter()
        .filter(|answer| answer.as_ref().unwrap().status() == StatusCode::TOO_MANY_REQUESTS)
        .count();
    let seconds = *arrivals.times_ms().last().unwrap() as f64 / 1_000.0;
    let served_per_second = (200 - refused) as f64 / seconds;
    // The probes above the wall cost a refusal now and then, fewer as the wall is found
    // again (but not in the first ten seconds, when it may be an earned limit's base): 19
    // of 200 at 4.6 served a second when this was written (16 when a refusal held the
    // bucket two turns, not one). Static mode, closing for a second at each refusal and
    // then sending the window's worth at once, had 33 at 4.8 a second.
    assert!(refused <= 21, "{refused} refused");
    assert!(served_per_second >= 4.5, "{served_per_second} a second");
}
