//! No piece of an API key ever shows in a `Debug` or `Display` print of the stack: its layers,
//! services, futures in every state they can be in, errors, and the request as the client below
//! receives it.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::Full;
use together_tower::TogetherLayer;
use together_tower::body::{BufferBodyLayer, BufferedBody, RequestMeta};
use together_tower::classify::EndpointClass;
use together_tower::limit::RateLimitLayer;
use together_tower::limit::{Limits, MaxWait};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::retry::{RetryLayer, RetryPolicy};
use tower::{Layer, Service, ServiceExt};
use tower_test::mock;

/// The secret part of the key: long enough that any six characters of it are telling.
const SECRET: &str = "LeakCanary9f3KqZx7Wm2Tb8";
const PIECE: usize = 6;

fn key() -> String {
    format!("Bearer tgp_v1_{SECRET}")
}

/// Fails if any `PIECE` characters of the secret appear in `printed`.
#[track_caller]
fn assert_no_secret(what: &str, printed: &str) {
    for start in 0..=SECRET.len() - PIECE {
        let piece = &SECRET[start..start + PIECE];
        assert!(
            !printed.contains(piece),
            "{what} shows {piece:?} of the key:\n{printed}"
        );
    }
}

/// `Debug` (plain and pretty) of a value.
fn debug(value: &impl std::fmt::Debug) -> String {
    format!("{value:?}\n{value:#?}")
}

fn chat_table() -> QuotaTable {
    QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(1).with_tolerance(Duration::ZERO)),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap()
}

fn chat<B>(body: B) -> Request<B> {
    Request::post("https://api.together.xyz/v1/chat/completions")
        .header("authorization", key())
        .header("x-api-key", format!("tgp_v1_{SECRET}"))
        .body(body)
        .unwrap()
}

fn full(text: &'static str) -> Full<Bytes> {
    Full::new(Bytes::from_static(text.as_bytes()))
}

/// Polls a future once, so it moves into the state it waits in.
fn poll_once<F: Future + Unpin>(future: &mut F) -> Poll<F::Output> {
    let waker = std::task::Waker::noop();
    Pin::new(future).poll(&mut Context::from_waker(waker))
}

type Client = mock::Mock<Request<BufferedBody<Full<Bytes>>>, Response<String>>;

#[tokio::test(start_paused = true)]
async fn the_whole_stack_never_prints_the_key() {
    let (client, mut handle): (Client, _) = mock::pair();
    let layer = TogetherLayer::new(Limits::new(chat_table()));
    let mut service = layer.layer(client);
    assert_no_secret("the layer", &debug(&layer));

    // In flight at the client.
    service.ready().await.unwrap();
    let mut future = Box::pin(service.call(chat(full(r#"{"model":"m","max_tokens":5}"#))));
    assert!(poll_once(&mut future).is_pending());
    assert_no_secret("a future at the client", &debug(&future));
    assert_no_secret("the service", &debug(&service));
    let (request, send) = handle.next_request().await.unwrap();
    // The client below sees the request, and its own Debug print of it hides the key too.
    assert_no_secret("the request the client received", &debug(&request));
    assert_no_secret(
        "the request's metadata",
        &debug(&request.extensions().get::<RequestMeta>()),
    );
    assert_no_secret("the request's body", &debug(request.body()));

    // Waiting to retry after a 429: the retry layer holds a copy of the request.
    send.send_response(
        Response::builder()
            .status(429)
            .header("retry-after", "2")
            .body(String::new())
            .unwrap(),
    );
    assert!(poll_once(&mut future).is_pending());
    assert_no_secret("a future waiting to retry", &debug(&future));

    // Queued in the rate limiter behind the retry.
    service.ready().await.unwrap();
    let mut queued = Box::pin(service.call(chat(full(r#"{"model":"m"}"#))));
    assert!(poll_once(&mut queued).is_pending());
    assert_no_secret("a future queued for its turn", &debug(&queued));

    // Refused by the limiter: the errors.
    let mut impatient = chat(full("{}"));
    impatient.extensions_mut().insert(MaxWait(Duration::ZERO));
    service.ready().await.unwrap();
    let error = service.call(impatient).await.unwrap_err();
    assert_no_secret("a refusal", &format!("{error} {error:?}"));
}

#[tokio::test(start_paused = true)]
async fn the_model_check_and_the_fallback_never_print_the_key() {
    let (client, mut handle): (Client, _) = mock::pair();
    let policy = RetryPolicy::new().with_fallback("big", "small");
    let mut service = TogetherLayer::new(Limits::new(QuotaTable::unlimited()))
        .with_retry(policy)
        .layer(client);

    // A 503 for "big": the retry goes to "small", with the key, and says so.
    let call = tokio::spawn(service.clone().oneshot(chat(full(r#"{"model":"big"}"#))));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response(Response::builder().status(503).body(String::new()).unwrap());
    let (retried, send) = handle.next_request().await.unwrap();
    assert_no_secret("the fallback request", &debug(&retried));
    send.send_response(Response::new(String::new()));
    let answered = call.await.unwrap().unwrap();
    assert_no_secret("the answer", &debug(&answered));

    // A 404 for an unknown model: the models list is asked for with the key.
    service.ready().await.unwrap();
    let mut future = Box::pin(service.call(chat(full(r#"{"model":"smal"}"#))));
    assert!(poll_once(&mut future).is_pending());
    let (_, send) = handle.next_request().await.unwrap();
    let not_found = Response::builder()
        .status(404)
        .header("content-type", "application/json")
        .body(r#"{"error":{"code":"model_not_found"}}"#.to_owned())
        .unwrap();
    send.send_response(not_found);
    assert!(poll_once(&mut future).is_pending());
    assert_no_secret("a future checking the model", &debug(&future));
    let (models, send) = handle.next_request().await.unwrap();
    assert_eq!(models.uri().path(), "/v1/models");
    assert_no_secret("the models request", &debug(&models));
    send.send_response(Response::new(r#"[{"id":"small"},{"id":"big"}]"#.to_owned()));
    let error = future.await.unwrap_err();
    assert!(error.to_string().contains("did you mean small"), "{error}");
    assert_no_secret("ModelNotFound", &format!("{error} {error:?}"));
    assert_no_secret("the service", &debug(&service));
}

#[tokio::test(start_paused = true)]
async fn each_layer_alone_never_prints_the_key() {
    // The rate limit layer, with a request waiting for its turn.
    let (client, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let mut limited = RateLimitLayer::new(Limits::new(chat_table())).layer(client);
    assert_no_secret("RateLimit", &debug(&limited));
    limited.ready().await.unwrap();
    let mut first = Box::pin(limited.call(chat(String::new())));
    assert!(poll_once(&mut first).is_pending());
    limited.ready().await.unwrap();
    let mut second = Box::pin(limited.call(chat(String::new())));
    assert!(poll_once(&mut second).is_pending());
    assert_no_secret("a rate limit future", &debug(&first));
    assert_no_secret("a waiting rate limit future", &debug(&second));
    let (request, _send) = handle.next_request().await.unwrap();
    assert_no_secret("the request below the rate limit", &debug(&request));

    // The retry layer alone, its future holding the copy it would send again.
    let (client, mut handle) = mock::pair::<Request<String>, Response<String>>();
    let policy = RetryPolicy::new();
    assert_no_secret("RetryPolicy", &debug(&policy));
    let mut retrying = RetryLayer::new(policy).layer(client);
    retrying.ready().await.unwrap();
    let mut future = Box::pin(retrying.call(chat(String::new())));
    assert!(poll_once(&mut future).is_pending());
    assert_no_secret("a retry future", &debug(&future));
    let (request, _send) = handle.next_request().await.unwrap();
    assert_no_secret("the request below the retry layer", &debug(&request));

    // The buffer layer alone, while it reads a body that has not arrived.
    let (client, _handle) = mock::pair::<Request<BufferedBody<Pending>>, Response<String>>();
    let mut buffering = BufferBodyLayer::new().layer(client);
    assert_no_secret("BufferBody", &debug(&buffering));
    buffering.ready().await.unwrap();
    let mut reading = Box::pin(buffering.call(chat(Pending)));
    assert!(poll_once(&mut reading).is_pending());
    assert_no_secret("a buffer future", &debug(&reading));
}

/// A body whose bytes never arrive.
#[derive(Debug)]
struct Pending;

impl Body for Pending {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Pending
    }
}
