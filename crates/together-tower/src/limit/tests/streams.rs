//! Streamed answers: a token charge settled at the stream's last event, a concurrency slot
//! held for as long as the stream.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, Service, ServiceExt};

use super::tokens::{costing, token_limits};
use super::{Arrivals, CHAT, request};
use crate::classify::EndpointClass;
use crate::limit::{Adaptation, Limits, RateLimitLayer};
use crate::quota::{GroupQuota, QuotaTable, Rate};

type Events = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;
type Streamed = crate::limit::future::ResponseBody<Events>;

const CHUNK: &str = "data: {\"object\":\"chat.completion.chunk\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"}}]}\n\n";
const DONE: &str = "data: [DONE]\n\n";

/// The chunk that carries `finish_reason` and, as Together sends it, `usage`.
fn finish(total_tokens: u64) -> String {
    format!(
        "data: {{\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}],\"usage\":{{\"prompt_tokens\":10,\"completion_tokens\":{},\"total_tokens\":{total_tokens}}}}}\n\n",
        total_tokens.saturating_sub(10)
    )
}

/// An event stream of `events`, one frame each; unless `ends`, it then stays open, as a
/// stream whose caller stops reading at `[DONE]` leaves it.
fn events(events: Vec<String>, ends: bool) -> Events {
    let frames = stream::iter(
        events
            .into_iter()
            .map(|event| Ok(Frame::data(Bytes::from(event)))),
    );
    let stream = if ends {
        frames.boxed()
    } else {
        frames.chain(stream::pending()).boxed()
    };
    StreamBody::new(stream)
}

/// The rate limit over a server that answers every request with `answer()`.
fn streaming(
    limits: Limits,
    arrivals: &Arrivals,
    answer: impl Fn() -> Events + Clone + Send + Sync + 'static,
) -> impl Service<Request<String>, Response = Response<Streamed>, Error = tower::BoxError, Future: Send>
+ Clone
+ Send
+ 'static {
    let arrivals = arrivals.clone();
    RateLimitLayer::new(limits).layer(tower::service_fn(move |request: Request<String>| {
        arrivals.record(&request);
        let body = answer();
        async move { Ok::<_, Infallible>(Response::new(body)) }
    }))
}

/// Sends `request` and returns its answer's body.
async fn open<S>(service: &S, request: Request<String>) -> Streamed
where
    S: Service<Request<String>, Response = Response<Streamed>, Error = tower::BoxError> + Clone,
{
    service.clone().oneshot(request).await.unwrap().into_body()
}

/// Reads frames until one holds `needle`.
async fn read_past(body: &mut Streamed, needle: &str) {
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        if frame
            .data_ref()
            .is_some_and(|data| String::from_utf8_lossy(data).contains(needle))
        {
            return;
        }
    }
    panic!("the stream ended before {needle:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stream_settles_its_charge_at_done_though_the_caller_drops_it_there() {
    let arrivals = Arrivals::new();
    let answer = || events(vec![CHUNK.into(), finish(30), DONE.into()], false);
    let service = streaming(token_limits(100), &arrivals, answer);
    let response = service
        .clone()
        .oneshot(costing(900, "first"))
        .await
        .unwrap();
    let mut body = response.into_body();
    read_past(&mut body, "[DONE]").await;
    drop(body);
    // 900 charged, 30 used: the second 900 fits at its turn, not 870 ms later.
    service.oneshot(costing(900, "second")).await.unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_after_its_usage_settles_and_one_dropped_before_keeps_the_estimate() {
    let arrivals = Arrivals::new();
    let answer = || events(vec![CHUNK.into(), finish(30), DONE.into()], false);
    let service = streaming(token_limits(100), &arrivals, answer);
    // Dropped after the finish chunk, before `[DONE]`: the answer is whole, its usage read.
    let mut body = open(&service, costing(900, "read to its usage")).await;
    read_past(&mut body, "usage").await;
    drop(body);
    // Dropped after the first chunk: the estimate stays. After the 30 the first used and
    // this 900 at 10 ms, 80 are left, and the next 900 waits 820 ms for the rest.
    let mut body = open(&service, costing(900, "cut short")).await;
    read_past(&mut body, "hi").await;
    drop(body);
    service.oneshot(costing(900, "after")).await.unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10, 830]);
}

#[tokio::test(start_paused = true)]
async fn a_stream_read_to_its_end_is_settled_once() {
    let arrivals = Arrivals::new();
    // Each stream is charged 100 and says it used 700: settled at `[DONE]`, then ended.
    let answer = || events(vec![CHUNK.into(), finish(700), DONE.into()], true);
    let service = streaming(token_limits(100), &arrivals, answer);
    for label in ["first", "second"] {
        let response = service.clone().oneshot(costing(100, label)).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    // The bucket owes 1,200 more, once per stream, so a third of 500 waits until 900 ms; a
    // second settling at the end would have made it wait until 2,100 ms.
    service.oneshot(costing(500, "third")).await.unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10, 900]);
}

/// Chat at 100 a second, one call at a time.
fn one_at_a_time() -> Limits {
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(100).with_tolerance(Duration::ZERO))
                .with_concurrency(1),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table)
        .adaptation(Adaptation::fixed())
        .build()
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_slot_is_held_until_the_stream_ends_or_is_dropped() {
    let arrivals = Arrivals::new();
    let answer = || events(vec![CHUNK.into(), finish(30), DONE.into()], false);
    let service = streaming(one_at_a_time(), &arrivals, answer);
    let mut first = open(&service, request(CHAT, "k", "first")).await;
    read_past(&mut first, "hi").await;
    let second = tokio::spawn(service.clone().oneshot(request(CHAT, "k", "second")));
    // The head arrived long ago, and the stream goes on: the second call waits.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(arrivals.labels(), ["first"]);
    // The caller reads to `[DONE]` and drops the stream: the slot is free.
    read_past(&mut first, "[DONE]").await;
    drop(first);
    second.await.unwrap().unwrap();
    assert_eq!(arrivals.labels(), ["first", "second"]);
    assert_eq!(arrivals.times_ms(), [0, 1_000]);
}

#[tokio::test(start_paused = true)]
async fn a_concurrency_slot_comes_back_when_the_body_ends_though_it_is_kept() {
    let arrivals = Arrivals::new();
    let answer = || events(vec![CHUNK.into(), finish(30), DONE.into()], true);
    let service = streaming(one_at_a_time(), &arrivals, answer);
    let mut first = open(&service, request(CHAT, "k", "first")).await;
    while first.frame().await.is_some() {}
    // The body ended; the caller still has it, and the next call goes at its turn.
    service.oneshot(request(CHAT, "k", "second")).await.unwrap();
    assert_eq!(arrivals.times_ms(), [0, 10]);
    drop(first);
}
