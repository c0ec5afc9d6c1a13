//! Model fallback against the simulator on loopback: a 503 for one model is answered by the
//! next model of the user's map.

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use together_sim::{Class, Sim, SimConfig};
use together_tower::limit::Limits;
use together_tower::quota::QuotaTable;
use together_tower::retry::{ModelFallback, RetryPolicy};
use together_tower::{ServiceBuilderExt, TogetherLayer};
use together_tower_tests::http_client;
use tower::{ServiceBuilder, ServiceExt};

const BIG: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
const SMALL: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_for_one_model_is_answered_by_its_fallback_waiting_in_that_models_bucket() {
    let sim = Sim::start(SimConfig {
        overloaded_models: vec![BIG.to_owned()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let limits = Limits::new(QuotaTable::together_defaults());
    let layer =
        TogetherLayer::new(limits.clone()).with_retry(RetryPolicy::new().with_fallback(BIG, SMALL));
    let together = ServiceBuilder::new().layer(layer).service(http_client());
    // Key order, spacing and the rest of the body as the caller wrote them.
    let body = format!(
        r#"{{ "messages": [{{"role": "user", "content": "hi"}}], "model": "{BIG}", "max_tokens": 8 }}"#
    );
    let request = Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", "Bearer k")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = together.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let fallback = response
        .extensions()
        .get::<ModelFallback>()
        .cloned()
        .unwrap();
    assert_eq!(
        (fallback.requested.as_str(), fallback.answered_by.as_str()),
        (BIG, SMALL)
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(reply["model"], SMALL);

    let stats = sim.stats();
    assert_eq!(
        (stats.model(BIG).requests, stats.model(BIG).unavailable),
        (1, 1)
    );
    assert_eq!((stats.model(SMALL).requests, stats.model(SMALL).ok), (1, 1));
    assert_eq!(stats.class(Class::Chat).requests, 2);
    // Chat is limited per model: the retry took its turn in the small model's bucket.
    let mut models: Vec<_> = limits
        .snapshot()
        .into_iter()
        .filter_map(|bucket| bucket.model)
        .collect();
    models.sort();
    assert_eq!(models, [BIG, SMALL]);
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_fallback_the_503s_are_retried_with_the_same_model() {
    let sim = Sim::start(SimConfig {
        overloaded_models: vec![BIG.to_owned()],
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let together = ServiceBuilder::new()
        .together(Limits::new(QuotaTable::together_defaults()))
        .service(http_client());
    let body = format!(r#"{{"model":"{BIG}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    let request = Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", "Bearer k")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = together.oneshot(request).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.extensions().get::<ModelFallback>().is_none());
    assert_eq!(sim.stats().model(BIG).unavailable, 5);
    assert_eq!(sim.stats().model(SMALL).requests, 0);
    sim.shutdown().await;
}
