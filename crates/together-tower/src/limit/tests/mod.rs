//! The rate limit layer's behaviour, on paused tokio time.

mod adaptive;
mod hostile;
mod jobs;
mod tokens;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_test::mock;

use super::error::{QueueFull, RateLimited, SlotsBusy, TooManyBuckets};
use super::{
    Adaptation, BucketSpec, Cost, Decision, Immediate, Limiter, Limits, LimitsBuilder,
    LocalLimiter, MaxWait, RateLimit, RateLimitLayer, Rates,
};
use crate::classify::EndpointClass;
use crate::quota::{GroupQuota, QuotaTable, Rate};
use crate::test_support::{send_all, send_one};

/// Limits that keep the table's rates, for tests of the pacing and the server's closures.
fn static_limits(table: QuotaTable) -> LimitsBuilder {
    Limits::builder(table).adaptation(Adaptation::fixed())
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";
const FINE_TUNES: &str = "/v1/fine-tunes";

fn request(path: &str, key: &str, label: impl Into<String>) -> Request<String> {
    let mut builder = Request::post(path).header("x-label", label.into());
    if !key.is_empty() {
        builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(String::new()).unwrap()
}

/// A table with one rate for chat and completions, another for embeddings. Pacing is exact
/// (no tolerance), so the tests can name the millisecond of every turn.
fn table(chat: Rate) -> QuotaTable {
    let chat = chat.with_tolerance(Duration::ZERO);
    QuotaTable::builder()
        .group("chat", GroupQuota::rate(chat))
        .group("embeddings", GroupQuota::rate(chat))
        .group("fine-tune-create", GroupQuota::concurrency(2))
        .class(EndpointClass::Chat, "chat")
        .class(EndpointClass::Completions, "chat")
        .class(EndpointClass::Embeddings, "embeddings")
        .class(EndpointClass::FineTuneCreate, "fine-tune-create")
        .build()
        .unwrap()
}

/// When each request reached the inner service (virtual time since the test began), by label.
#[derive(Clone)]
struct Arrivals {
    start: Instant,
    seen: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Arrivals {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            seen: Arc::default(),
        }
    }

    fn record(&self, request: &Request<String>) -> usize {
        let label = request.headers()["x-label"].to_str().unwrap().to_owned();
        let mut seen = self.seen.lock().unwrap();
        seen.push((self.start.elapsed(), label));
        seen.len() - 1
    }

    fn labels(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, label)| label.clone())
            .collect()
    }

    fn times_ms(&self) -> Vec<u128> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| at.as_millis())
            .collect()
    }
}

/// An inner service that records arrivals and answers with `respond(arrival index)`.
fn recorder(
    arrivals: Arrivals,
    respond: impl Fn(usize) -> Response<String> + Clone + Send + Sync + 'static,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync {
    let arrivals = arrivals.clone();
    tower::service_fn(move |request: Request<String>| {
        let index = arrivals.record(&request);
        let response = respond(index);
        async move { Ok::<_, Infallible>(response) }
    })
}

fn ok(_: usize) -> Response<String> {
    Response::new(String::new())
}

fn chat_requests(count: usize, key: &str) -> Vec<Request<String>> {
    (0..count)
        .map(|i| request(CHAT, key, i.to_string()))
        .collect()
}

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

/// A backend that always needs "I/O": it never decides at once, and answers after a yield.
/// With `reserve`, it takes a turn up to the request's max wait ahead, as the Redis backend
/// does.
#[derive(Debug, Clone, Default)]
struct RemoteLimiter {
    inner: LocalLimiter,
    fail: bool,
    reserve: bool,
    asked: Arc<AtomicUsize>,
}

impl Limiter for RemoteLimiter {
    type Bucket = <LocalLimiter as Limiter>::Bucket;

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
            .limiter(RemoteLimiter::default())
            .build(),
    );
    let service = layer.layer(recorder(arrivals.clone(), ok));
    send_all(&service, chat_requests(5, "k")).await;
    assert_eq!(arrivals.times_ms(), [0, 100, 200, 300, 400]);
    assert_eq!(arrivals.labels(), ["0", "1", "2", "3", "4"]);

    let failing = RemoteLimiter {
        fail: true,
        ..RemoteLimiter::default()
    };
    let service = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .limiter(failing)
            .build(),
    )
    .layer(recorder(arrivals.clone(), ok));
    let error = service.oneshot(request(CHAT, "k", "x")).await.unwrap_err();
    assert_eq!(error.to_string(), "backend unreachable");
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_reserves_asks_once_per_request_and_keeps_the_schedule() {
    let arrivals = Arrivals::new();
    let limiter = RemoteLimiter {
        reserve: true,
        ..RemoteLimiter::default()
    };
    let asked = Arc::clone(&limiter.asked);
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(10)))
            .limiter(limiter)
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
    let limiter = RemoteLimiter {
        reserve: true,
        ..RemoteLimiter::default()
    };
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .limiter(limiter)
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
    let limiter = RemoteLimiter {
        reserve: true,
        ..RemoteLimiter::default()
    };
    let layer = RateLimitLayer::new(
        static_limits(table(Rate::per_second(1)))
            .max_wait(Duration::from_millis(300))
            .limiter(limiter)
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
