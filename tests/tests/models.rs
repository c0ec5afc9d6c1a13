//! The model check against the simulator on loopback: a request naming an unknown model gets a
//! typed error with the closest known ids, and the models list is fetched once.

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use together_sim::{Class, Sim, SimConfig};
use together_tower::ServiceBuilderExt;
use together_tower::limit::Limits;
use together_tower::models::ModelNotFound;
use together_tower_tests::{chat_request, http_client};
use tower::{ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_model_is_a_typed_error_with_suggestions_from_one_models_call() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let together = ServiceBuilder::new()
        .together(Limits::default())
        .service(http_client());
    // A typo: the version without "-Turbo", ten times.
    let typo = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..10 {
        let request = Request::post(format!("{}/v1/chat/completions", sim.url()))
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from_static(typo.as_bytes())))
            .unwrap();
        let error = together.clone().oneshot(request).await.unwrap_err();
        let missing = error
            .downcast_ref::<ModelNotFound>()
            .expect("ModelNotFound");
        assert_eq!(missing.model(), "meta-llama/Llama-3.3-70B-Instruct");
        assert_eq!(
            missing.closest()[0],
            "meta-llama/Llama-3.3-70B-Instruct-Turbo"
        );
    }
    // The happy path asks for nothing more.
    for _ in 0..5 {
        let response = together
            .clone()
            .oneshot(chat_request(&sim.url(), "k"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let stats = sim.stats();
    assert_eq!(
        stats.class(Class::Models).requests,
        1,
        "one models call for ten 404s"
    );
    assert_eq!(stats.class(Class::Chat).other_errors, 10);
    assert_eq!(stats.class(Class::Chat).ok, 5);
    sim.shutdown().await;
}
