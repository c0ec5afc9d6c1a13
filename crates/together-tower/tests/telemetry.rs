//! What the stack tells the outside world about a run with a 429 and a retry: the tracing
//! events and the metrics, and that neither carries any piece of the API key.

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
#[cfg(feature = "metrics")]
use metrics_util::debugging::DebuggingRecorder;
use together_tower::body::BufferedBody;
use together_tower::classify::EndpointClass;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, TogetherLayer};
use tower::{Layer, ServiceExt};

const SECRET: &str = "TelemetryCanary4Rt9Xq2Lm";

/// The tests run one at a time: tracing caches, per call site, whether anyone listens, and a
/// test running the stack on another thread with no subscriber can leave a site silent for the
/// test that captures events.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn assert_no_secret(what: &str, text: &str) {
    for start in 0..=SECRET.len() - 6 {
        let piece = &SECRET[start..start + 6];
        assert!(!text.contains(piece), "{what} shows {piece:?}:\n{text}");
    }
}

/// A writer the subscriber writes every event into.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One chat request through the whole stack; the server answers its first attempt 429 (with
/// a hint and a stated limit) and its second 200.
async fn a_request_with_a_429_and_a_retry() {
    let calls = Arc::new(Mutex::new(0));
    let client = tower::service_fn(move |_: Request<BufferedBody<Full<Bytes>>>| {
        let calls = Arc::clone(&calls);
        async move {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            let response = if *calls == 1 {
                Response::builder()
                    .status(StatusCode::TOO_MANY_REQUESTS)
                    .header("retry-after-ms", "100")
                    .header("x-ratelimit-limit", "5")
                    .body(String::new())
            } else {
                Response::builder().body(String::new())
            };
            Ok::<_, std::convert::Infallible>(response.unwrap())
        }
    });
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(10)).per_model(true),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    let stack = TogetherLayer::new(Limits::new(table)).layer(client);
    let request = Request::post("https://api.together.xyz/v1/chat/completions")
        .header("authorization", format!("Bearer tgp_v1_{SECRET}"))
        .body(Full::new(Bytes::from_static(
            br#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[]}"#,
        )))
        .unwrap();
    let response = stack.oneshot(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

#[test]
fn the_events_of_a_429_and_a_retry_name_no_key() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        runtime().block_on(a_request_with_a_429_and_a_retry());
    });
    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    if std::env::var("SHOW_OUTPUT").is_ok() {
        eprintln!("{output}");
    }
    for expected in [
        // The span of each attempt, with its class and model; the retry is attempt 1.
        "together_tower{class=chat model=\"meta-llama/Llama-3.3-70B-Instruct-Turbo\" attempt=0}",
        "together_tower{class=chat model=\"meta-llama/Llama-3.3-70B-Instruct-Turbo\" attempt=1}",
        "the server refused",
        "bucket closed by the server",
        "pause_ms=100",
        "retrying",
        "reason=\"429\"",
    ] {
        assert!(output.contains(expected), "no {expected:?} in:\n{output}");
    }
    // Buckets are named by the key's fingerprint, never the key.
    assert!(output.contains("key="), "{output}");
    assert_no_secret("the tracing output", &output);
}

#[cfg(feature = "metrics")]
#[test]
fn the_metrics_of_a_429_and_a_retry_have_bounded_labels_and_no_key() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || {
        runtime().block_on(a_request_with_a_429_and_a_retry());
    });
    let snapshot = snapshotter.snapshot().into_vec();
    let mut seen = Vec::new();
    for (key, _, _, value) in &snapshot {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        let line = format!("{} {}", key.key().name(), labels.join(","));
        assert_no_secret("a metric", &line);
        for label in key.key().labels() {
            assert!(
                ["class", "model", "status", "reason", "group"].contains(&label.key()),
                "unexpected label {line}"
            );
        }
        seen.push((line, format!("{value:?}")));
    }
    let counter = |name: &str, labels: &str| {
        seen.iter()
            .find(|(line, _)| line == &format!("{name} {labels}"))
            .map(|(_, value)| value.as_str())
    };
    let model = "model=meta-llama/Llama-3.3-70B-Instruct-Turbo";
    assert_eq!(
        counter(
            "together_tower_requests_total",
            &format!("class=chat,{model}")
        ),
        Some("Counter(2)"),
        "{seen:#?}"
    );
    assert_eq!(
        counter(
            "together_tower_answers_total",
            &format!("class=chat,{model},status=429")
        ),
        Some("Counter(1)")
    );
    assert_eq!(
        counter(
            "together_tower_answers_total",
            &format!("class=chat,{model},status=2xx")
        ),
        Some("Counter(1)")
    );
    assert_eq!(
        counter("together_tower_retries_total", "class=chat,reason=429"),
        Some("Counter(1)")
    );
}
