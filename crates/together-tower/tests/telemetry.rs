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

/// The events `run` writes at `level` or above on paused time, as the fmt subscriber prints
/// them.
fn events(level: tracing::Level, run: impl std::future::Future<Output = ()>) -> String {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    tracing::subscriber::with_default(subscriber, || runtime().block_on(run));
    String::from_utf8(captured.0.lock().unwrap().clone()).unwrap()
}

/// The metrics recorded while `run` runs on paused time: each as its name and its labels
/// (`name key=value,key=value`), with its value as `Debug` prints it.
#[cfg(feature = "metrics")]
fn recorded(run: impl std::future::Future<Output = ()>) -> Vec<(String, String)> {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    metrics::with_local_recorder(&recorder, || runtime().block_on(run));
    // One snapshot: taking one reads the counters out.
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .map(|(key, _, _, value)| {
            let labels: Vec<String> = key
                .key()
                .labels()
                .map(|label| format!("{}={}", label.key(), label.value()))
                .collect();
            (
                format!("{} {}", key.key().name(), labels.join(",")),
                format!("{value:?}"),
            )
        })
        .collect()
}

#[test]
fn the_events_of_a_429_and_a_retry_name_no_key() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let output = events(tracing::Level::DEBUG, a_request_with_a_429_and_a_retry());
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
    let seen = recorded(a_request_with_a_429_and_a_retry());
    for (line, _) in &seen {
        assert_no_secret("a metric", line);
        let labels = line.split_once(' ').map_or("", |(_, labels)| labels);
        for label in labels.split(',').filter(|label| !label.is_empty()) {
            let name = label.split_once('=').map_or(label, |(name, _)| name);
            assert!(
                [
                    "class", "model", "status", "reason", "group", "priority", "tenant"
                ]
                .contains(&name),
                "unexpected label {line}"
            );
        }
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

/// Two streamed chat answers through the stack under a token budget: the first says what it
/// used, at its `data: [DONE]`; the second ends without its `usage`.
async fn two_streams_one_without_its_usage() {
    use http_body_util::BodyExt;
    let calls = Arc::new(Mutex::new(0));
    let client = tower::service_fn(move |_: Request<BufferedBody<Full<Bytes>>>| {
        let calls = Arc::clone(&calls);
        async move {
            let mut calls = calls.lock().unwrap();
            *calls += 1;
            let chunk = "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n";
            let usage = if *calls == 1 {
                "data: {\"choices\":[],\"usage\":{\"total_tokens\":30}}\n\n"
            } else {
                ""
            };
            let body = format!("{chunk}{usage}data: [DONE]\n\n");
            Ok::<_, std::convert::Infallible>(Response::new(body))
        }
    });
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(10))
                .with_tokens(Rate::per_minute(100_000).with_burst(10_000)),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    let stack = TogetherLayer::new(Limits::new(table)).layer(client);
    for _ in 0..2 {
        let request = Request::post("https://api.together.xyz/v1/chat/completions")
            .header("authorization", format!("Bearer tgp_v1_{SECRET}"))
            .body(Full::new(Bytes::from_static(
                br#"{"model":"m","messages":[],"max_tokens":100,"stream":true}"#,
            )))
            .unwrap();
        let response = stack.clone().oneshot(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
}

#[test]
fn streams_tell_when_their_charge_settles_and_when_the_estimate_stays() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let output = events(tracing::Level::TRACE, two_streams_one_without_its_usage());
    let settled = output
        .lines()
        .find(|line| line.contains("token charge settled"))
        .unwrap_or_else(|| panic!("no settlement in:\n{output}"));
    assert!(
        settled.contains("used=30") && settled.contains("group=\"chat\""),
        "{settled}"
    );
    assert!(
        output.contains("an answer ended without its usage: its estimate stays charged"),
        "{output}"
    );
    assert_no_secret("the tracing output", &output);
}

#[cfg(feature = "metrics")]
#[test]
fn streams_count_the_tokens_given_back_and_the_estimates_kept() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let lines = recorded(two_streams_one_without_its_usage());
    // The metric's labels, and its value.
    let counter = |name: &str| {
        lines.iter().find_map(|(line, value)| {
            let (seen, labels) = line.split_once(' ')?;
            (seen == name).then(|| (labels.to_owned(), value.clone()))
        })
    };
    let (labels, returned) =
        counter("together_tower_tokens_returned_total").expect("tokens returned");
    assert!(labels.contains("chat"), "{labels}");
    // Charged 100 and more for the prompt, used 30: all of the rest came back.
    let returned: u64 = returned
        .trim_start_matches("Counter(")
        .trim_end_matches(')')
        .parse()
        .unwrap();
    assert!(returned >= 70, "{returned}");
    let (_, kept) = counter("together_tower_estimates_kept_total").expect("estimates kept");
    assert_eq!(kept, "Counter(1)");
}

/// Six chat requests queued at once in a bucket of 10 a second: three background ones of
/// tenant `batch`, three interactive ones that name no tenant.
#[cfg(feature = "metrics")]
async fn six_waiters_of_two_priorities() {
    use together_tower::limit::{Priority, RateLimitLayer, Tenant};
    let client = tower::service_fn(|_: Request<String>| async {
        Ok::<_, std::convert::Infallible>(Response::new(String::new()))
    });
    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(10)))
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    let service = RateLimitLayer::new(Limits::new(table)).layer(client);
    let mut calls = Vec::new();
    for (priority, tenant) in [
        (Priority::Background, Some("batch")),
        (Priority::Interactive, None),
    ] {
        for _ in 0..3 {
            let mut request = Request::post("https://api.together.xyz/v1/chat/completions")
                .header("authorization", format!("Bearer tgp_v1_{SECRET}"))
                .body(String::new())
                .unwrap();
            request.extensions_mut().insert(priority);
            if let Some(tenant) = tenant {
                request.extensions_mut().insert(Tenant::new(tenant));
            }
            calls.push(tokio::spawn(service.clone().oneshot(request)));
        }
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

#[cfg(feature = "metrics")]
#[test]
fn queued_turns_are_counted_by_priority_and_tenant() {
    let _alone = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let lines = recorded(six_waiters_of_two_priorities());
    let value = |line: &str| {
        lines
            .iter()
            .find(|(seen, _)| seen == line)
            .map(|(_, value)| value.as_str())
    };
    // The first background request went at once; the other five waited.
    assert_eq!(
        value("together_tower_queued_turns_total priority=background,tenant=batch"),
        Some("Counter(2)"),
        "{lines:#?}"
    );
    assert_eq!(
        value("together_tower_queued_turns_total priority=interactive,tenant=none"),
        Some("Counter(3)")
    );
    assert!(
        lines
            .iter()
            .any(|(line, _)| line == "together_tower_queue_wait_seconds priority=interactive")
    );
    for (line, _) in &lines {
        assert_no_secret("a metric", line);
    }
}
