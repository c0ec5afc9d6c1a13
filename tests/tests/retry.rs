//! The retry policy's judgement of real hyper-util errors.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use together_tower::RetryPolicy;
use together_tower_tests::http_client;
use tower::retry::Policy;
use tower::{BoxError, ServiceExt};

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
