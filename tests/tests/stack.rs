//! The whole stack (buffer, retry, rate limit) around hyper-util's `Client`, over loopback.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use together_tower::TogetherLayer;
use together_tower::limit::Limits;
use together_tower_tests::{LoopbackServer, http_client, json};
use tower::{ServiceBuilder, ServiceExt};

const BODY: &str = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[{"role":"user","content":"hi"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_is_waited_out_and_the_same_request_sent_again() {
    let server = LoopbackServer::start(|_, seen| match seen.len() {
        0 => json(
            429,
            &[("retry-after", "1")],
            r#"{"error":{"message":"rate limited","type":"dynamic_request_limited","param":null,"code":null}}"#,
        ),
        _ => json(200, &[], r#"{"object":"chat.completion","choices":[]}"#),
    })
    .await
    .unwrap();

    let together = ServiceBuilder::new()
        .layer(TogetherLayer::new(Limits::default()))
        .service(http_client());
    let request = Request::post(format!("{}/v1/chat/completions", server.url()))
        .header("authorization", "Bearer tgp_v1_loopback-test-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap();
    let response = together.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, r#"{"object":"chat.completion","choices":[]}"#);

    let seen = server.seen();
    assert_eq!(
        seen.iter()
            .map(|request| request.status)
            .collect::<Vec<_>>(),
        [429, 200]
    );
    assert!(
        seen.iter()
            .all(|request| request.body == BODY && request.path == "/v1/chat/completions")
    );
    // The retry slept at least the second the server asked for, counted from after its answer.
    assert!(seen[1].at - seen[0].at >= Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fine_tune_create_that_failed_with_a_500_is_not_sent_again() {
    let server =
        LoopbackServer::start(|_, _| json(500, &[], r#"{"error":{"message":"internal"}}"#))
            .await
            .unwrap();
    let together = ServiceBuilder::new()
        .layer(TogetherLayer::new(Limits::default()))
        .service(http_client());
    let request = Request::post(format!("{}/v1/fine-tunes", server.url()))
        .header("authorization", "Bearer k")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","training_file":"file-1"}"#,
        )))
        .unwrap();
    let response = together.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 500);
    assert_eq!(server.seen().len(), 1);
}
