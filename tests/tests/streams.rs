//! Streamed chat answers through the stack, from the simulator over loopback.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use together_sim::{Class, ClassLimits, Sim, SimConfig, StreamSettings};
use together_tower::ServiceBuilderExt;
use together_tower::classify::EndpointClass;
use together_tower::limit::{Adaptation, Limits, RateLimitLayer};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_tests::{CHAT_MODEL, http_client};
use tower::{ServiceBuilder, ServiceExt};

/// A streamed chat request for `max_tokens`, with key `k`.
fn streamed_chat(base: &str, max_tokens: u64) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"tell me a story"}}],"max_tokens":{max_tokens},"stream":true}}"#
    );
    Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", "Bearer k")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

async fn simulator(stream_cut_rate: f64) -> together_sim::SimHandle {
    let mut config = SimConfig {
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(6_000))]),
        stream: StreamSettings {
            chunks_per_second: 50.0,
        },
        ..SimConfig::default()
    };
    config.faults.stream_cut_rate = stream_cut_rate;
    Sim::start(config).await.unwrap()
}

/// Chat with one call at a time and a token budget of 2,000 a minute, so an estimate that
/// is never settled would hold the next request back for half a minute, past `max_wait`.
fn limits() -> Limits {
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(100))
                .with_tokens(Rate::per_minute(2_000).with_burst(2_000))
                .with_concurrency(1),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table)
        .adaptation(Adaptation::fixed())
        .max_wait(Duration::from_secs(5))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_read_to_done_and_dropped_settles_its_charge_and_frees_its_slot() {
    let sim = simulator(0.0).await;
    let limits = limits();
    let client = ServiceBuilder::new()
        .together_buffer_body()
        .layer(RateLimitLayer::new(limits.clone()))
        .service(http_client());
    let probe = streamed_chat(&sim.url(), 1_500);
    for round in 0..3 {
        // Each is charged its 1,500 `max_tokens` and more for the prompt: two in a row fit
        // the budget of 2,000 only if the first was settled from its `usage`.
        let response = client
            .clone()
            .oneshot(streamed_chat(&sim.url(), 1_500))
            .await
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(response.status(), 200);
        let content_type = &response.headers()["content-type"];
        assert_eq!(content_type, "text/event-stream");
        let mut body = response.into_body();
        let mut events = Vec::new();
        // The head came first, and the stream is still going: the slot is held.
        let free = limits
            .snapshot_for(&probe)
            .and_then(|bucket| bucket.free_slots);
        assert_eq!(free, Some(0));
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            let text = String::from_utf8(data.to_vec()).unwrap();
            let done = text.contains("data: [DONE]");
            events.push(text);
            if done {
                break;
            }
        }
        // The caller stops at `[DONE]` and drops the body, as SSE clients do.
        drop(body);
        let free = limits
            .snapshot_for(&probe)
            .and_then(|bucket| bucket.free_slots);
        assert_eq!(free, Some(1));
        assert!(events.len() > 2, "{events:?}");
        assert!(events.iter().any(|event| event.contains("\"usage\"")));
    }
    assert_eq!(sim.stats().class(Class::Chat).ok, 3);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_by_the_server_is_an_error_and_is_not_sent_again() {
    let sim = simulator(1.0).await;
    let together = ServiceBuilder::new()
        .together(Limits::default())
        .service(http_client());
    let response = together
        .oneshot(streamed_chat(&sim.url(), 50))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let read = response.into_body().collect().await;
    assert!(read.is_err(), "a cut stream read as whole");
    let chat = sim.stats().class(Class::Chat);
    assert_eq!(chat.requests, 1, "{chat:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_one_slot_the_second_stream_starts_only_after_the_first_ends() {
    let sim = simulator(0.0).await;
    let client = ServiceBuilder::new()
        .together_buffer_body()
        .layer(RateLimitLayer::new(limits()))
        .service(http_client());
    let first = client
        .clone()
        .oneshot(streamed_chat(&sim.url(), 100))
        .await
        .unwrap();
    let first_ended = Arc::new(AtomicBool::new(false));
    let second = tokio::spawn({
        let (client, url, first_ended) = (client.clone(), sim.url(), Arc::clone(&first_ended));
        async move {
            let response = client.oneshot(streamed_chat(&url, 100)).await.unwrap();
            // The head of the second answer comes only once the first stream has ended.
            assert!(
                first_ended.load(Ordering::SeqCst),
                "the second stream began early"
            );
            response.into_body().collect().await.unwrap();
        }
    });
    // The first stream is read to its end, a frame at a time: a dozen events at 50 a second,
    // time enough for the second request to overtake it if the slot had come back at the head.
    // The flag is set at `[DONE]`, before the body's end gives the slot back.
    let mut body = first.into_body();
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        if String::from_utf8_lossy(&data).contains("data: [DONE]") {
            first_ended.store(true, Ordering::SeqCst);
        }
        frames += 1;
    }
    assert!(frames > 2, "the events came as one");
    drop(body);
    second.await.unwrap();
    assert_eq!(sim.stats().class(Class::Chat).ok, 2);
    sim.shutdown().await;
}
