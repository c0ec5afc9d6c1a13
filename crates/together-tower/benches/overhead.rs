//! What `RateLimit` adds to each request when its quota never binds, beside the bare inner
//! service, tower's own `limit::RateLimit` and two tower-http layers that wrap the answer; and
//! what the whole stack adds, in all and one layer at a time.
//!
//! Each iteration is one request: `poll_ready`, `call`, and polling the response future to
//! completion, inside a tokio runtime context. The inner service keeps the request for the
//! bench to send again, so nothing is allocated or dropped in the timed loop: the figures are
//! the layers' own cost.
//!
//! `cargo bench -p together-tower --bench overhead`

#![allow(missing_docs)]

use std::cell::Cell;
use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use together_tower::TogetherLayer;
use together_tower::body::BufferedBody;
use together_tower::classify::{Classify, TogetherClassifier};
use together_tower::key::KeyHasher;
use together_tower::limit::RateLimitLayer;
use together_tower::limit::{Adaptation, Limits, Priority, Tenant};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use tower::{Layer, Service};

/// An inner client that answers at once, with an empty body, and keeps the request it was
/// sent for the bench to send again, so that nothing is allocated or dropped in the timed loop.
///
/// The answer is a `Response` with an empty body (112 bytes), about the size of hyper's
/// `Response<Incoming>` (136): the layers move the answer a few times, and an answer that
/// carried the request (336 bytes) would measure those copies more than the layers' work.
#[derive(Clone, Default)]
struct Echo {
    sent: Rc<Cell<Option<Request<Empty<Bytes>>>>>,
}

impl Service<Request<Empty<Bytes>>> for Echo {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Response<Empty<Bytes>>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Empty<Bytes>>) -> Self::Future {
        self.sent.set(Some(request));
        ready(Ok(Response::new(Empty::new())))
    }
}

/// Benchmarks `service`, built on `echo`, sending `requests` round-robin.
fn bench_service<S, B>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    echo: &Echo,
    mut service: S,
    requests: Vec<Request<Empty<Bytes>>>,
) where
    S: Service<Request<Empty<Bytes>>, Response = Response<B>>,
{
    let mut requests: Vec<Option<Request<Empty<Bytes>>>> = requests.into_iter().map(Some).collect();
    let mut next = 0;
    c.bench_function(name, |b| {
        b.iter(|| {
            let slot = &mut requests[next];
            let response = drive(&mut service, slot.take().unwrap());
            std::hint::black_box(response);
            *slot = echo.sent.take();
            next = (next + 1) % requests.len();
        })
    });
}

fn chat(key: &str) -> Request<Empty<Bytes>> {
    Request::post("https://api.together.xyz/v1/chat/completions")
        .header(AUTHORIZATION, format!("Bearer {key}"))
        .body(Empty::new())
        .unwrap()
}

/// Limits whose quota never binds: adaptive, as by default.
fn never_binding() -> Limits {
    let rate = Rate::per_second(1_000_000_000).with_burst(1_000_000_000);
    let table = QuotaTable::together_defaults()
        .to_builder()
        .group("chat", GroupQuota::rate(rate).per_model(true))
        .build()
        .unwrap();
    Limits::new(table)
}

fn overhead(c: &mut Criterion) {
    let runtime = runtime();
    let _context = runtime.enter();
    let key = "fake-key-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH";
    let mut group = c.benchmark_group("per_request");

    let echo = Echo::default();
    bench_service(
        &mut group,
        "bare_inner_service",
        &echo,
        echo.clone(),
        vec![chat(key)],
    );
    // The same thousand requests as the thousand-key case below, so both pay the same cache
    // misses for the requests themselves.
    let keys = (0..1_000).map(|i| chat(&format!("{key}-{i}"))).collect();
    bench_service(
        &mut group,
        "bare_inner_service_1k_requests",
        &echo,
        echo.clone(),
        keys,
    );
    let layer = RateLimitLayer::new(never_binding());
    bench_service(
        &mut group,
        "together_rate_limit_one_key",
        &echo,
        layer.layer(echo.clone()),
        vec![chat(key)],
    );
    let static_limits = Limits::builder(never_binding().table().clone())
        .adaptation(Adaptation::fixed())
        .build();
    bench_service(
        &mut group,
        "together_rate_limit_one_key_static",
        &echo,
        RateLimitLayer::new(static_limits).layer(echo.clone()),
        vec![chat(key)],
    );
    one_key_many_tenants(&mut group, &echo, key);
    let keys = (0..1_000).map(|i| chat(&format!("{key}-{i}"))).collect();
    let layer = RateLimitLayer::new(never_binding());
    bench_service(
        &mut group,
        "together_rate_limit_1k_keys",
        &echo,
        layer.layer(echo.clone()),
        keys,
    );
    let models = Request::get("https://api.together.xyz/v1/models")
        .body(Empty::new())
        .unwrap();
    let layer = RateLimitLayer::new(never_binding());
    bench_service(
        &mut group,
        "together_rate_limit_unlimited_class",
        &echo,
        layer.layer(echo.clone()),
        vec![models],
    );
    other_layers(&mut group, &echo, key);
    classify_and_fingerprint(&mut group, key);
    group.finish();
}

/// Other layers over the same service, for scale: tower's own rate limit (one counter for
/// the whole service, the inner future handed back as it is), and two tower-http layers that
/// wrap the answer.
fn other_layers(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    echo: &Echo,
    key: &str,
) {
    let unbound = tower::limit::rate::Rate::new(u64::MAX, Duration::from_secs(1));
    bench_service(
        c,
        "tower_rate_limit",
        echo,
        tower::limit::RateLimit::new(echo.clone(), unbound),
        vec![chat(key)],
    );
    // Layers that wrap the answer: tower-http's `Trace` reads each answer (its
    // status, for a failure class) and wraps its body, as any layer that learns from answers
    // must; `MapResponseBody` only wraps the body.
    bench_service(
        c,
        "tower_http_trace",
        echo,
        tower_http::trace::TraceLayer::new_for_http().layer(echo.clone()),
        vec![chat(key)],
    );
    bench_service(
        c,
        "tower_http_map_response_body",
        echo,
        tower_http::map_response_body::MapResponseBodyLayer::new(|body: Empty<Bytes>| {
            http_body_util::BodyExt::map_frame(body, |frame| frame)
        })
        .layer(echo.clone()),
        vec![chat(key)],
    );
}

/// One key, a thousand tenants of three priorities: who a request is for is read only when
/// it waits, so the fast path should not see them.
fn one_key_many_tenants(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    echo: &Echo,
    key: &str,
) {
    let tenants = (0..1_000)
        .map(|i| {
            let mut request = chat(key);
            request
                .extensions_mut()
                .insert(Tenant::new(&format!("tenant-{i}")));
            request.extensions_mut().insert(Priority::ALL[i % 3]);
            request
        })
        .collect();
    bench_service(
        c,
        "together_rate_limit_one_key_1k_tenants",
        echo,
        RateLimitLayer::new(never_binding()).layer(echo.clone()),
        tenants,
    );
}

/// What classifying a request and fingerprinting its key cost alone.
fn classify_and_fingerprint(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    key: &str,
) {
    let request = chat(key);
    let hasher = KeyHasher::new();
    c.bench_function("classify_and_fingerprint_only", |b| {
        b.iter(|| {
            let request = std::hint::black_box(&request);
            let class = TogetherClassifier.classify(request);
            (
                class,
                hasher.fingerprint_request(&TogetherClassifier, request),
            )
        })
    });
}

/// An inner client for the whole stack: it answers at once and drops the request.
#[derive(Clone, Copy)]
struct Ok200;

impl Service<Request<BufferedBody<Full<Bytes>>>> for Ok200 {
    type Response = Response<http_body_util::Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<BufferedBody<Full<Bytes>>>) -> Self::Future {
        ready(Ok(Response::new(http_body_util::Empty::new())))
    }
}

/// The whole stack (buffer, model check, retry, rate limit) beside the same client alone, with chat bodies
/// of about 100 bytes, 1 KB and 100 KB. Requests are built outside the timed part; both sides
/// drop theirs inside it.
fn full_stack(c: &mut Criterion) {
    let runtime = runtime();
    let _context = runtime.enter();
    let mut group = c.benchmark_group("full_stack");
    for (name, size) in [("small", 0), ("1kb", 1_024), ("100kb", 100 * 1_024)] {
        let body = chat_body(size);
        let request = || chat_request(body.clone());
        let buffered = || request().map(|body| BufferedBody::buffered(body_bytes(body)));
        bench_batched(
            &mut group,
            &format!("bare_client_{name}"),
            &mut Ok200,
            buffered,
        );
        let mut stack = TogetherLayer::new(never_binding()).layer(Ok200);
        bench_batched(
            &mut group,
            &format!("together_layer_{name}"),
            &mut stack,
            request,
        );
    }
    group.finish();
}

/// The whole stack's layers added one at a time, outside in, over the same client with a small
/// chat body: the buffer (reads the body and its fields), the model check, the retry layer
/// (copies the request to send again, deposits in the budget). The whole stack, which adds the
/// rate limit, is `full_stack/together_layer_small`.
fn layer_by_layer(c: &mut Criterion) {
    use together_tower::body::BufferBodyLayer;
    use together_tower::models::ModelCheckLayer;
    use together_tower::retry::{RetryLayer, RetryPolicy};
    use tower::ServiceExt;

    let runtime = runtime();
    let _context = runtime.enter();
    let mut group = c.benchmark_group("layers");
    let body = chat_body(0);
    let request = || chat_request(body.clone());
    // The layers below the buffer want a client that fails with a `BoxError`.
    let client = Ok200.map_err(|never: Infallible| -> tower::BoxError { match never {} });
    let mut buffer = BufferBodyLayer::new().layer(client.clone());
    bench_batched(&mut group, "buffer_small", &mut buffer, request);
    let mut checked = BufferBodyLayer::new().layer(ModelCheckLayer::new().layer(client.clone()));
    bench_batched(
        &mut group,
        "buffer_model_check_small",
        &mut checked,
        request,
    );
    let retried = RetryLayer::new(RetryPolicy::new()).layer(client);
    let mut retried = BufferBodyLayer::new().layer(ModelCheckLayer::new().layer(retried));
    bench_batched(
        &mut group,
        "buffer_model_check_retry_small",
        &mut retried,
        request,
    );
    group.finish();
}

/// Benchmarks `service` with requests made by `request` outside the timed part.
fn bench_batched<S, R>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    service: &mut S,
    request: impl Fn() -> R,
) where
    S: Service<R>,
{
    group.bench_function(name, |b| {
        b.iter_batched(
            &request,
            |request| drive(service, request),
            criterion::BatchSize::SmallInput,
        )
    });
}

/// The runtime the benches run in: one thread, with tokio's clock.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// A chat request with `body`, as a client would send it.
fn chat_request(body: Bytes) -> Request<Full<Bytes>> {
    Request::post("https://api.together.xyz/v1/chat/completions")
        .header(
            AUTHORIZATION,
            "Bearer fake-key-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGH",
        )
        .header("content-type", "application/json")
        .body(Full::new(body))
        .unwrap()
}

/// A chat completion whose message is `size` bytes of text (at least a short one).
fn chat_body(size: usize) -> Bytes {
    let text = if size == 0 {
        "Say hello.".to_owned()
    } else {
        "lorem ipsum ".repeat(size / 12 + 1)[..size].to_owned()
    };
    let body = serde_json::json!({
        "model": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
    });
    Bytes::from(body.to_string())
}

/// The bytes of a `Full` body built from one `Bytes`.
fn body_bytes(body: Full<Bytes>) -> Bytes {
    let mut body = pin!(body);
    let mut context = Context::from_waker(Waker::noop());
    match http_body::Body::poll_frame(body.as_mut(), &mut context) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// One request through `service` to completion, with a no-op waker; returns the response.
fn drive<S: Service<R>, R>(service: &mut S, request: R) -> S::Response {
    let mut context = Context::from_waker(Waker::noop());
    let Poll::Ready(Ok(())) = service.poll_ready(&mut context) else {
        panic!("the service was not ready");
    };
    let future = pin!(service.call(request));
    let Poll::Ready(Ok(response)) = future.poll(&mut context) else {
        panic!("the quota bound, or the request failed");
    };
    response
}

criterion_group!(benches, overhead, full_stack, layer_by_layer);
criterion_main!(benches);
