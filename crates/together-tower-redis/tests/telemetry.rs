//! What the Redis backend tells the outside world when Redis goes away and comes back: the
//! tracing events and the metrics, and that neither carries any piece of the API key.

#![cfg(feature = "metrics")]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::RedisServer;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use together_tower::key::KeyHasher;
use together_tower::limit::{Backend, BucketSpec, Cost, Pace, Rates};
use together_tower_redis::{RedisBackend, RedisSettings, Unreachable};

const SECRET: &str = "RedisCanary7Kq3Zp9Wx";

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

const ONE: Cost = Cost {
    requests: 1,
    tokens: 0,
};

/// Decides once with Redis up, once with it dead, and again once it is back.
async fn redis_goes_away_and_comes_back() {
    let redis = RedisServer::start().await;
    let settings = RedisSettings {
        call_timeout: Duration::from_millis(200),
        retry_after: Duration::from_millis(200),
        unreachable: Unreachable::FallBack { replicas: 2 },
        ..RedisSettings::default()
    };
    let limiter = RedisBackend::connect(&redis.url(), settings).await.unwrap();
    let key = KeyHasher::new().fingerprint(SECRET.as_bytes());
    let rates = Rates {
        requests: Some(Pace::new(Duration::from_millis(10), Duration::ZERO)),
        tokens: None,
    };
    let bucket = limiter.bucket(BucketSpec::new(key, "chat", Some("m"), rates));
    let decide = || limiter.acquire(&bucket, ONE, Duration::ZERO, Duration::ZERO);
    decide().await.unwrap();
    let port = redis.stop().await;
    decide().await.unwrap();
    assert!(limiter.is_falling_back());
    let redis = RedisServer::start_on(port).await;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if decide().await.is_ok() && !limiter.is_falling_back() {
            break;
        }
    }
    assert!(
        !limiter.is_falling_back(),
        "the limiter did not return to redis"
    );
    drop(redis);
}

#[test]
fn the_switch_and_the_return_are_logged_and_counted_without_the_key() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .finish();
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    tracing::subscriber::with_default(subscriber, || {
        metrics::with_local_recorder(&recorder, || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(redis_goes_away_and_comes_back());
        });
    });

    let output = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let count = |text: &str| output.matches(text).count();
    assert_eq!(
        count("redis unreachable: deciding in this process"),
        1,
        "{output}"
    );
    assert_eq!(count("redis answers again: deciding there"), 1, "{output}");

    let mut metrics = Vec::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let labels: Vec<String> = key
            .key()
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        metrics.push((format!("{} {}", key.key().name(), labels.join(",")), value));
    }
    let value = |line: &str| {
        metrics
            .iter()
            .find(|(name, _)| name == line)
            .map(|(_, value)| value)
    };
    assert_eq!(
        value("together_tower_redis_unreachable_total "),
        Some(&DebugValue::Counter(1)),
        "{metrics:#?}"
    );
    assert!(matches!(
        value("together_tower_redis_deciding_here "),
        Some(DebugValue::Gauge(gauge)) if gauge.into_inner() == 0.0
    ));
    for outcome in ["allow", "error", "here"] {
        let line = format!("together_tower_redis_decisions_total outcome={outcome}");
        assert!(
            matches!(value(&line), Some(DebugValue::Counter(n)) if *n >= 1),
            "{line}: {metrics:#?}"
        );
    }
    assert!(value("together_tower_redis_call_seconds ").is_some());

    let everything = format!("{output}{metrics:?}");
    for start in 0..=SECRET.len() - 6 {
        let piece = &SECRET[start..start + 6];
        assert!(
            !everything.contains(piece),
            "{piece:?} shows in:\n{everything}"
        );
    }
}
