//! A user's program with together-tower's `reqwest` feature: the stack on their own reqwest
//! client, one chat request to the simulator over plain HTTP.

use together_sim::{Sim, SimConfig};
use together_tower::client::Reqwest;
use together_tower::{Limits, TogetherLayer};
use tower::{Layer, ServiceExt};

#[tokio::main]
async fn main() {
    let sim = Sim::start(SimConfig::default()).await.expect("the simulator starts");
    // With reqwest built with rustls and no crypto provider, this line panics.
    let client = reqwest::Client::new();
    let stack = TogetherLayer::new(Limits::default()).layer(Reqwest::new(client));
    let body = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[{"role":"user","content":"hi"}]}"#;
    let request = http::Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", "Bearer user-key")
        .header("content-type", "application/json")
        .body(reqwest::Body::from(body))
        .unwrap();
    let answer = stack.oneshot(request).await.expect("an answer");
    assert_eq!(answer.status(), 200);
    println!("ok: {}", answer.status());
    sim.shutdown().await;
}
