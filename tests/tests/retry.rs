//! The retry policy's judgement of real hyper-util errors.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use std::time::Duration;

use together_sim::{Class, Sim, SimConfig};
use together_tower::TogetherLayer;
use together_tower::body::BufferedBody;
use together_tower::limit::Limits;
use together_tower::quota::QuotaTable;
use together_tower::retry::RetryPolicy;
use together_tower_tests::http_client;
use tower::retry::Policy;
use tower::{BoxError, Layer, ServiceExt};

/// A loopback address nothing listens on.
async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

#[tokio::test]
async fn a_refused_connection_is_safe_to_retry_even_for_a_job_create() {
    let base = closed_port().await;
    let request = |path: &str| {
        Request::post(format!("{base}{path}"))
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap()
    };
    let error: BoxError = http_client::<Full<Bytes>>()
        .oneshot(request("/v1/fine-tunes"))
        .await
        .unwrap_err()
        .into();
    let mut result: Result<http::Response<()>, BoxError> = Err(error);

    for path in ["/v1/fine-tunes", "/v1/batches", "/v1/chat/completions"] {
        let mut policy = RetryPolicy::new();
        let retry = policy.retry(&mut request(path), &mut result);
        assert!(retry.is_some(), "{path}: a refused connection sent nothing");
    }
}

#[tokio::test]
async fn a_request_the_server_read_and_hung_up_on_is_retried_but_a_job_create_is_not() {
    // Every request is read whole, then the connection is closed without an answer: hyper
    // reports "connection closed before message completed".
    let mut config = SimConfig::default();
    config.faults.hangup_rate = 1.0;
    let sim = Sim::start(config).await.unwrap();
    let retry = RetryPolicy::new().with_backoff(Duration::from_millis(1), Duration::from_millis(5));
    let stack = TogetherLayer::new(Limits::new(QuotaTable::unlimited()))
        .with_retry(retry)
        .layer(http_client::<BufferedBody<Full<Bytes>>>());
    let send = |path: &str, body: &'static str| {
        let request = Request::post(format!("{}{path}", sim.url()))
            .header("authorization", "Bearer test-key-hangup")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        stack.clone().oneshot(request)
    };
    let chat = send(
        "/v1/chat/completions",
        r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[]}"#,
    )
    .await;
    let create = send(
        "/v1/fine-tunes",
        r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","training_file":"file-1"}"#,
    )
    .await;
    assert!(chat.is_err() && create.is_err());

    let stats = sim.stats();
    // The chat request was sent again four times (the default); the job create only once,
    // since the server may have created the job before it hung up.
    assert_eq!(stats.class(Class::Chat).hung_up, 5, "{stats:?}");
    assert_eq!(stats.class(Class::FineTunes).hung_up, 1, "{stats:?}");
    sim.shutdown().await;
}
