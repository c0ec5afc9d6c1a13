//! Adaptive rates through the layer: per-model buckets, stated limits, trouble and recovery,
//! and retries that keep their place.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

use super::{Arrivals, CHAT, chat_requests, ok, recorder, request, table};
use crate::body::RequestMeta;
use crate::classify::EndpointClass;
use crate::harness::send_all;
use crate::limit::{Adaptation, Limits, RateLimitLayer};
use crate::quota::{GroupQuota, QuotaTable, Rate};

fn adaptive(table: QuotaTable, adaptation: Adaptation) -> Limits {
    Limits::builder(table).adaptation(adaptation).build()
}

/// A chat request for key `k` naming `model`, as the buffer layer would have read it.
fn for_model(model: &str, label: &str) -> Request<String> {
    let mut request = request(CHAT, "k", label);
    request.extensions_mut().insert(RequestMeta {
        model: Some(model.into()),
        ..RequestMeta::default()
    });
    request
}

fn per_model_table(rate: Rate) -> QuotaTable {
    QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(rate.with_tolerance(Duration::ZERO)).per_model(true),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap()
}

/// Each label's arrival times, in milliseconds.
fn times_of(arrivals: &Arrivals, prefix: &str) -> Vec<u128> {
    arrivals
        .times_ms()
        .into_iter()
        .zip(arrivals.labels())
        .filter(|(_, label)| label.starts_with(prefix))
        .map(|(at, _)| at)
        .collect()
}

/// An answer carrying `x-ratelimit-limit: limit`.
fn stating(limit: &'static str) -> impl Fn(usize) -> Response<String> + Clone + Send + Sync {
    move |_| {
        let mut response = Response::new(String::new());
        response
            .headers_mut()
            .insert("x-ratelimit-limit", limit.parse().unwrap());
        response
    }
}

#[tokio::test(start_paused = true)]
async fn a_per_model_bucket_does_not_slow_another_model() {
    let arrivals = Arrivals::new();
    let limits = adaptive(per_model_table(Rate::per_second(1)), Adaptation::default());
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(arrivals.clone(), ok));
    let mut requests = vec![
        for_model("model-a", "a-1"),
        for_model("model-b", "b-1"),
        for_model("model-a", "a-2"),
        for_model("model-b", "b-2"),
    ];
    // Without a model, the group's own bucket.
    requests.push(request(CHAT, "k", "none-1"));
    send_all(&service, requests).await;
    assert_eq!(times_of(&arrivals, "a-"), [0, 1_000]);
    assert_eq!(times_of(&arrivals, "b-"), [0, 1_000]);
    assert_eq!(times_of(&arrivals, "none-"), [0]);
    let mut models: Vec<Option<String>> = limits
        .snapshot()
        .into_iter()
        .map(|bucket| bucket.model)
        .collect();
    models.sort();
    assert_eq!(
        models,
        [None, Some("model-a".to_owned()), Some("model-b".to_owned())]
    );
}

#[tokio::test(start_paused = true)]
async fn a_stated_limit_that_halves_slows_the_bucket_within_one_interval() {
    let arrivals = Arrivals::new();
    let limits = adaptive(table(Rate::per_second(10)), Adaptation::default());
    let service =
        RateLimitLayer::new(limits.clone()).layer(recorder(arrivals.clone(), stating("5")));
    send_all(&service, chat_requests(5, "k")).await;
    // Two answers agree at 100 ms: from the next turn on, 5 a second. What the bucket owed
    // (100 ms at 10/s) is owed at the new rate (200 ms): no turn goes early, none is lost.
    assert_eq!(arrivals.times_ms(), [0, 100, 300, 500, 700]);
    let rate = limits.snapshot()[0].requests_per_second.unwrap();
    assert!((rate - 5.0).abs() < 1e-6, "{rate}");
}

#[tokio::test(start_paused = true)]
async fn a_stated_limit_that_doubles_speeds_it_up_within_the_ceiling_and_hands_out_no_burst() {
    for (ceiling, expected) in [
        // The burst's own answers stated 20 a second: the pace after it is 50 ms at once.
        (2.0, [0, 50, 100, 150, 200, 250]),
        // The default ceiling is the table's rate.
        (1.0, [0, 100, 200, 300, 400, 500]),
    ] {
        let arrivals = Arrivals::new();
        let table = table(Rate::per_second(10).with_burst(3));
        let limits = adaptive(table, Adaptation::default().with_ceiling(ceiling));
        let service =
            RateLimitLayer::new(limits.clone()).layer(recorder(arrivals.clone(), stating("20")));
        // Drain the burst first, one at a time, so every turn after it is paced.
        let mut first = vec![];
        for i in 0..3 {
            first.push(tokio::spawn(service.clone().oneshot(request(
                CHAT,
                "k",
                format!("burst-{i}"),
            ))));
        }
        for call in first {
            call.await.unwrap().unwrap();
        }
        let paced = send_all(&service, chat_requests(6, "k")).await;
        assert!(paced.iter().all(Result::is_ok));
        let times = times_of(&arrivals, "");
        let paced: Vec<u128> = times[3..].iter().map(|at| at - times[3]).collect();
        // The burst was used: the rate change hands out no fresh one, only a faster pace.
        assert_eq!(paced, expected, "ceiling {ceiling}");
    }
}

/// Answers 503 to every `every`-th request, and to those above `capacity` a second (a GCRA
/// with a burst of two, by the paused clock).
fn unavailable(
    every: usize,
    capacity: f64,
) -> impl Fn(usize) -> Response<String> + Clone + Send + Sync + 'static {
    let start = Instant::now();
    let ready_at = Arc::new(std::sync::Mutex::new(0.0f64));
    move |index| {
        let at = start.elapsed().as_secs_f64();
        let interval = 1.0 / capacity;
        let mut ready = ready_at.lock().unwrap();
        let over = at < *ready - interval;
        if !over {
            *ready = ready.max(at) + interval;
        }
        let mut response = Response::new(String::new());
        if over || (every > 0 && index % every == every - 1) {
            *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        }
        response
    }
}

/// Sends `count` requests through limits at 100 a second against `respond`; returns the
/// request rate in force every 100 ms while they go.
async fn rates_while_sending(
    limits: &Limits,
    count: usize,
    respond: impl Fn(usize) -> Response<String> + Clone + Send + Sync + 'static,
) -> Vec<f64> {
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(Arrivals::new(), respond));
    let stream = tokio::spawn(async move {
        send_all(&service, chat_requests(count, "k")).await;
    });
    let mut rates = Vec::new();
    while !stream.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if let Some(bucket) = limits.snapshot().first() {
            rates.push(bucket.requests_per_second.unwrap());
        }
    }
    rates
}

fn mean(rates: &[f64]) -> f64 {
    rates.iter().sum::<f64>() / rates.len() as f64
}

#[tokio::test(start_paused = true)]
async fn random_503s_leave_the_rate_where_it_was() {
    let limits = adaptive(table(Rate::per_second(100)), Adaptation::default());
    // One answer in ten is a 503, whatever the rate: the server's capacity, not ours.
    let rates = rates_while_sending(&limits, 3_000, unavailable(10, 1e9)).await;
    let mean = mean(&rates);
    assert!(mean >= 95.0, "the rate averaged {mean}: {rates:?}");
    assert_eq!(rates.last(), Some(&100.0));
    let changes = limits.snapshot()[0].rate_changes;
    // At most a trial, undone.
    assert_eq!(changes.unavailable, changes.noise, "{changes:?}");
}

#[tokio::test(start_paused = true)]
async fn unavailable_answers_above_a_capacity_move_the_rate_under_it() {
    let limits = adaptive(table(Rate::per_second(100)), Adaptation::default());
    // 503s above 60 a second: they stop when the rate drops below it.
    let rates = rates_while_sending(&limits, 2_000, unavailable(0, 60.0)).await;
    let late = mean(&rates[rates.len() / 2..]);
    assert!((50.0..=64.0).contains(&late), "late rate {late}: {rates:?}");
    let changes = limits.snapshot()[0].rate_changes;
    // A trial whose fall is not plain is undone; at least one showed the pressure.
    assert!(changes.unavailable > changes.noise, "{changes:?}");
}

#[tokio::test(start_paused = true)]
async fn a_brief_storm_of_503s_costs_at_most_a_short_cut() {
    let storm = Arc::new(AtomicBool::new(false));
    let respond = {
        let storm = Arc::clone(&storm);
        move |_: usize| {
            let mut response = Response::new(String::new());
            if storm.load(Ordering::SeqCst) {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            response
        }
    };
    let limits = adaptive(table(Rate::per_second(100)), Adaptation::default());
    let sampler = {
        let limits = limits.clone();
        tokio::spawn(async move { rates_while_sending(&limits, 2_000, respond).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    storm.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    storm.store(false, Ordering::SeqCst);
    let rates = sampler.await.unwrap();
    // A storm that ends on its own while a trial runs looks like pressure: the cut stays,
    // and the rate climbs back to what the server served, then probes above it.
    assert!(mean(&rates) >= 80.0, "{rates:?}");
    assert!(rates.last().unwrap() >= &97.0, "{rates:?}");
}

#[tokio::test(start_paused = true)]
async fn static_limits_never_move() {
    let arrivals = Arrivals::new();
    let limits = adaptive(table(Rate::per_second(10)), Adaptation::fixed());
    let respond = |_: usize| {
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        response
            .headers_mut()
            .insert("x-ratelimit-limit", "1".parse().unwrap());
        response
    };
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(arrivals.clone(), respond));
    send_all(&service, chat_requests(5, "k")).await;
    assert_eq!(arrivals.times_ms(), [0, 100, 200, 300, 400]);
    assert_eq!(limits.snapshot()[0].requests_per_second, Some(10.0));
}
