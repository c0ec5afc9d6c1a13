//! The retry layer's rules, on paused tokio time.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::retry::budget::TpsBudget;
use tower::{BoxError, Layer, Service, ServiceExt};

use super::{Attempt, RetryLayer, RetryPolicy};

const CHAT: &str = "/v1/chat/completions";
const FINE_TUNES: &str = "/v1/fine-tunes";
const BATCHES: &str = "/v1/batches";

type Answer = Result<Response<String>, BoxError>;
type Headers<'a> = &'a [(&'a str, &'a str)];

/// When each call reached the inner service, in virtual time since the test began.
#[derive(Clone)]
struct Calls {
    start: Instant,
    times: Arc<Mutex<Vec<Duration>>>,
}

impl Calls {
    fn count(&self) -> usize {
        self.times.lock().unwrap().len()
    }

    /// The gap between call `i` and the one before it.
    fn gap(&self, i: usize) -> Duration {
        let times = self.times.lock().unwrap();
        times[i] - times[i - 1]
    }
}

/// An inner service that answers call `n` (0-based) with `answer(n)`.
fn scripted(
    answer: impl Fn(usize) -> Answer + Clone + Send + Sync + 'static,
) -> (
    impl Service<Request<String>, Response = Response<String>, Error = BoxError, Future: Send>
    + Clone
    + Send,
    Calls,
) {
    let calls = Calls {
        start: Instant::now(),
        times: Arc::default(),
    };
    let log = calls.clone();
    let service = tower::service_fn(move |_: Request<String>| {
        let index = {
            let mut times = log.times.lock().unwrap();
            times.push(log.start.elapsed());
            times.len() - 1
        };
        let answer = answer(index);
        async move { answer }
    });
    (service, calls)
}

fn status(code: u16, headers: &[(&str, &str)]) -> Answer {
    let mut builder = Response::builder().status(code);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    Ok(builder.body(format!("answer {code}"))?)
}

fn io_error(kind: io::ErrorKind) -> Answer {
    Err(Box::new(io::Error::new(kind, "connection trouble")))
}

async fn send(
    policy: RetryPolicy,
    path: &str,
    answer: impl Fn(usize) -> Answer + Clone + Send + Sync + 'static,
) -> (Answer, Calls) {
    let (inner, calls) = scripted(answer);
    let service = RetryLayer::new(policy).layer(inner);
    let request = Request::post(path).body(String::from("{}")).unwrap();
    (service.oneshot(request).await, calls)
}

/// Sends `count` chat requests at once, each from its own task; returns their statuses.
async fn send_concurrently<S>(service: &S, count: usize) -> Vec<StatusCode>
where
    S: Service<Request<String>, Response = Response<String>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let requests = (0..count)
        .map(|_| Request::post(CHAT).body(String::new()).unwrap())
        .collect();
    let results = crate::harness::send_all(service, requests).await;
    results
        .into_iter()
        .map(|result| result.unwrap().status())
        .collect()
}

fn first_then_ok(first: Answer) -> impl Fn(usize) -> Answer + Clone + Send + Sync + 'static {
    let first = Arc::new(Mutex::new(Some(first)));
    move |call| match call {
        0 => first.lock().unwrap().take().unwrap(),
        _ => status(200, &[]),
    }
}

#[tokio::test(start_paused = true)]
async fn retryable_statuses_are_retried_until_success() {
    for code in [429, 408, 500, 502, 503, 504] {
        let (answer, calls) =
            send(RetryPolicy::new(), CHAT, first_then_ok(status(code, &[]))).await;
        assert_eq!(answer.unwrap().status(), 200, "{code}");
        assert_eq!(calls.count(), 2, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn other_client_errors_are_never_retried() {
    for code in [400, 401, 402, 403, 404, 409, 413, 422] {
        let (answer, calls) =
            send(RetryPolicy::new(), CHAT, first_then_ok(status(code, &[]))).await;
        let response = answer.unwrap();
        assert_eq!(response.status(), code);
        assert_eq!(response.body(), &format!("answer {code}"));
        assert_eq!(calls.count(), 1, "{code}");
    }
}

#[tokio::test(start_paused = true)]
async fn job_creates_are_not_repeated_after_a_5xx_a_408_or_a_timeout() {
    let timeout =
        || Err::<Response<String>, BoxError>(Box::new(tower::timeout::error::Elapsed::new()));
    for path in [FINE_TUNES, BATCHES] {
        for first in [
            status(500, &[]),
            status(503, &[]),
            status(408, &[]),
            timeout(),
            io_error(io::ErrorKind::ConnectionReset),
        ] {
            let (_, calls) = send(RetryPolicy::new(), path, first_then_ok(first)).await;
            assert_eq!(calls.count(), 1, "{path}");
        }
        // A 429, or a connection refused before sending, created nothing: safe to repeat.
        for first in [
            status(429, &[("retry-after", "1")]),
            io_error(io::ErrorKind::ConnectionRefused),
        ] {
            let (answer, calls) = send(RetryPolicy::new(), path, first_then_ok(first)).await;
            assert_eq!(answer.unwrap().status(), 200);
            assert_eq!(calls.count(), 2, "{path}");
        }
    }
    // The same failures are retried for calls that create nothing.
    let (_, calls) = send(RetryPolicy::new(), CHAT, first_then_ok(timeout())).await;
    assert_eq!(calls.count(), 2);
    let (_, calls) = send(
        RetryPolicy::new(),
        CHAT,
        first_then_ok(io_error(io::ErrorKind::ConnectionReset)),
    )
    .await;
    assert_eq!(calls.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn errors_that_are_not_about_the_connection_are_not_retried() {
    let (answer, calls) = send(
        RetryPolicy::new(),
        CHAT,
        first_then_ok(Err("invalid uri".into())),
    )
    .await;
    assert_eq!(answer.unwrap_err().to_string(), "invalid uri");
    assert_eq!(calls.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_409_on_a_job_create_is_retried_for_no_job_was_made() {
    for path in [FINE_TUNES, "/v1/batches"] {
        let (answer, calls) = send(RetryPolicy::new(), path, first_then_ok(status(409, &[]))).await;
        assert_eq!(answer.unwrap().status(), 200, "{path}");
        assert_eq!(calls.count(), 2, "{path}");
    }
    // A 409 elsewhere is a conflict of the request's own making.
    let (answer, calls) = send(RetryPolicy::new(), CHAT, first_then_ok(status(409, &[]))).await;
    assert_eq!(answer.unwrap().status(), 409);
    assert_eq!(calls.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_request_earns_its_share_of_the_budget_once_however_often_it_is_copied() {
    // No reserve: only deposits pay for retries, one retry for every two requests. Each
    // request's first send fails and its retry succeeds. A request is deposited once, as it
    // enters the layer; copying it for each send deposits nothing more.
    let policy = RetryPolicy::new().with_budget(TpsBudget::new(Duration::from_secs(10), 0, 0.5));
    let sends = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&sends);
    let first_send_fails = tower::service_fn(move |request: Request<String>| {
        *counter.lock().unwrap() += 1;
        let retried = request.extensions().get::<Attempt>().is_some();
        async move { status(if retried { 200 } else { 503 }, &[]) }
    });
    let service = RetryLayer::new(policy).layer(first_send_fails);
    let mut unretried = 0;
    for _ in 0..10 {
        let request = Request::post(CHAT).body(String::new()).unwrap();
        let answer = service.clone().oneshot(request).await.unwrap();
        unretried += usize::from(answer.status() == 503);
    }
    let retries = *sends.lock().unwrap() - 10;
    assert_eq!((retries, unretried), (5, 5));
}

#[tokio::test(start_paused = true)]
async fn the_delay_is_the_servers_hint_plus_a_little_jitter() {
    let in_three_seconds =
        httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3));
    // The hint's headers, and the shortest and longest delay expected, in milliseconds.
    let cases: [(Headers<'_>, u64, u64); 5] = [
        (&[("retry-after", "2")], 2_000, 2_200),
        (&[("retry-after", "0.5")], 500, 550),
        (
            &[("retry-after-ms", "1500"), ("retry-after", "9")],
            1_500,
            1_650,
        ),
        (&[("x-ratelimit-reset", "4")], 4_000, 4_400),
        // An HTTP-date has whole seconds, so "in three seconds" is two to three seconds away.
        (&[("retry-after", &in_three_seconds)], 2_000, 3_300),
    ];
    for (headers, low, high) in cases {
        let (answer, calls) = send(
            RetryPolicy::new(),
            CHAT,
            first_then_ok(status(429, headers)),
        )
        .await;
        assert_eq!(answer.unwrap().status(), 200);
        let gap = calls.gap(1);
        assert!(
            gap >= Duration::from_millis(low) && gap <= Duration::from_millis(high),
            "{headers:?}: {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn garbage_hints_fall_back_to_backoff_and_enormous_ones_give_up_at_once() {
    for garbage in ["soon", "-3", "1e9", ""] {
        let (answer, calls) = send(
            RetryPolicy::new(),
            CHAT,
            first_then_ok(status(503, &[("retry-after", garbage)])),
        )
        .await;
        assert_eq!(answer.unwrap().status(), 200);
        assert!(
            calls.gap(1) <= Duration::from_millis(500),
            "{garbage:?}: {:?}",
            calls.gap(1)
        );
    }
    let started = Instant::now();
    for enormous in ["61", "99999999999", "3600"] {
        let (answer, calls) = send(
            RetryPolicy::new(),
            CHAT,
            first_then_ok(status(429, &[("retry-after", enormous)])),
        )
        .await;
        assert_eq!(answer.unwrap().status(), 429, "{enormous}");
        assert_eq!(calls.count(), 1);
    }
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_within_its_cap_and_gives_up_with_the_last_answer() {
    let policy = RetryPolicy::new().with_backoff(Duration::from_secs(1), Duration::from_secs(3));
    let always_503 = |call: usize| status(503, &[("x-call", &call.to_string())]);
    let (answer, calls) = send(policy, CHAT, always_503).await;
    let response = answer.unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(
        response.headers()["x-call"],
        "4",
        "the last answer comes back unchanged"
    );
    assert_eq!(calls.count(), 5, "one call and four retries");
    // Between half and all of the doubling delay, within the cap.
    for (retry, ceiling_ms) in [(1, 1_000), (2, 2_000), (3, 3_000), (4, 3_000)] {
        let gap = calls.gap(retry);
        let ceiling = Duration::from_millis(ceiling_ms);
        assert!(
            gap >= ceiling / 2 && gap <= ceiling,
            "retry {retry}: {gap:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn the_servers_x_should_retry_overrides_the_rules() {
    let refuse = first_then_ok(status(503, &[("x-should-retry", "false")]));
    let (answer, calls) = send(RetryPolicy::new(), CHAT, refuse).await;
    assert_eq!(
        (answer.unwrap().status(), calls.count()),
        (StatusCode::SERVICE_UNAVAILABLE, 1)
    );
    let insist = first_then_ok(status(400, &[("x-should-retry", "true")]));
    let (answer, calls) = send(RetryPolicy::new(), CHAT, insist).await;
    assert_eq!(
        (answer.unwrap().status(), calls.count()),
        (StatusCode::OK, 2)
    );
}

#[tokio::test(start_paused = true)]
async fn max_elapsed_stops_retries_that_would_end_too_late() {
    let policy = RetryPolicy::new().with_max_elapsed(Duration::from_secs(3));
    let (answer, calls) = send(policy, CHAT, |_| status(503, &[("retry-after", "2")])).await;
    assert_eq!(answer.unwrap().status(), 503);
    assert_eq!(calls.count(), 2, "a third call would start after 4 s");
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_a_retry_storm_against_an_always_failing_server() {
    // A reserve of one retry a second over one second, plus 10% of requests.
    let policy = RetryPolicy::new().with_budget(TpsBudget::new(Duration::from_secs(1), 1, 0.1));
    let (inner, calls) = scripted(|_| status(503, &[]));
    let service = RetryLayer::new(policy).layer(inner);
    let statuses = send_concurrently(&service, 100).await;
    assert!(statuses.iter().all(|&status| status == 503));
    // Without the budget, four retries each would make 500 calls.
    let retries = calls.count() - 100;
    assert!((1..=12).contains(&retries), "{retries} retries");
}

#[tokio::test(start_paused = true)]
async fn limiter_refusals_are_not_retried() {
    use crate::limit::error::RateLimited;
    let refusal = || {
        Err::<Response<String>, BoxError>(
            RateLimited::new(Duration::from_secs(5), crate::classify::EndpointClass::Chat).into(),
        )
    };
    let (answer, calls) = send(RetryPolicy::new(), CHAT, first_then_ok(refusal())).await;
    assert!(answer.unwrap_err().is::<RateLimited>());
    assert_eq!(calls.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn callers_told_the_same_hint_do_not_come_back_in_lockstep() {
    let (inner, calls) = scripted(|call| match call {
        0..20 => status(429, &[("retry-after", "2")]),
        _ => status(200, &[]),
    });
    let service = RetryLayer::new(RetryPolicy::new()).layer(inner);
    let statuses = send_concurrently(&service, 20).await;
    assert!(statuses.iter().all(|&status| status == 200));
    let mut retried_at = calls.times.lock().unwrap()[20..].to_vec();
    retried_at.sort();
    retried_at.dedup();
    assert!(
        retried_at.len() > 10,
        "the retries came back at only {} distinct times",
        retried_at.len()
    );
}
