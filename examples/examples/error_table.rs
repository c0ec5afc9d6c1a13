//! The rest of Together's published error table, handled by the stack: job slots (409),
//! model fallback (503), the model check (404), and a long embeddings list split in chunks.
//!
//! Against the simulator, which runs three fine-tunes per key for two seconds each, answers
//! 503 for one overloaded model, and 404 for models it does not serve:
//!
//! - five fine-tune creates at once: three go, the other two wait for jobs to end (the stack
//!   reads the jobs' states from a list call), and the server answers no 409;
//! - a chat request for the overloaded model is answered by its fallback, and says so;
//! - a request for a misspelt model gets `ModelNotFound`, naming the model meant;
//! - 95 embeddings inputs go in five requests and come back in order.
//!
//! ```text
//! cargo run -p together-tower-examples --example error_table
//! ```

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, JobSettings, Sim, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::embeddings::EmbedInputs;
use together_tower::models::ModelNotFound;
use together_tower::quota::QuotaTable;
use together_tower::retry::{ModelFallback, RetryPolicy};
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::CHAT_MODEL;
use tower::{BoxError, Layer, ServiceExt};

const SMALL_MODEL: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo";
const KEY: &str = "Bearer example-key";

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = Sim::start(SimConfig {
        fine_tunes: JobSettings {
            concurrent: 3,
            duration_ms: 2_000,
        },
        overloaded_models: vec![CHAT_MODEL.to_owned()],
        ..SimConfig::default()
    })
    .await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Full<Bytes>>>();
    let together = TogetherLayer::new(Limits::new(QuotaTable::together_defaults()))
        .with_retry(RetryPolicy::new().with_fallback(CHAT_MODEL, SMALL_MODEL))
        .layer(client);
    let url = |path: &str| format!("{}/v1/{path}", sim.url());
    let request = |method: Method, path: &str, body: String| {
        Request::builder()
            .method(method)
            .uri(url(path))
            .header("authorization", KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
    };

    // 409: five creates, three slots.
    let started = Instant::now();
    let creates: Vec<_> = (0..5)
        .map(|_| {
            let create = request(
                Method::POST,
                "fine-tunes",
                format!(r#"{{"model":"{SMALL_MODEL}","training_file":"file-1"}}"#),
            );
            let together = together.clone();
            tokio::spawn(async move {
                let response = together.oneshot(create?).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok::<_, BoxError>(status)
            })
        })
        .collect();
    // The jobs' owner looks at them now and then, as such code does; each list shows the
    // stack which jobs ended.
    let watcher = {
        let together = together.clone();
        let list = request(Method::GET, "fine-tunes", String::new())?;
        let (parts, body) = list.into_parts();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let list = Request::from_parts(parts.clone(), body.clone());
                if let Ok(response) = together.clone().oneshot(list).await {
                    let _ = response.into_body().collect().await;
                }
            }
        })
    };
    let mut created = 0;
    for create in creates {
        created += usize::from(create.await??.is_success());
    }
    watcher.abort();
    let fine_tunes = sim.stats().class(Class::FineTunes);
    println!(
        "fine-tunes: {created} of 5 created in {:.1} s, three slots; the server answered {} 409s",
        started.elapsed().as_secs_f64(),
        fine_tunes.conflict
    );

    // 503: the overloaded model falls back.
    let chat = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8}}"#
    );
    let response = together
        .clone()
        .oneshot(request(Method::POST, "chat/completions", chat)?)
        .await?;
    let fallback = response.extensions().get::<ModelFallback>().cloned();
    println!(
        "503 for {CHAT_MODEL}: answered {} by {}",
        response.status(),
        fallback
            .as_ref()
            .map_or("the same model", |fallback| fallback.answered_by.as_str())
    );

    // 404: a misspelt model.
    let typo = r#"{"model":"meta-llama/Meta-Llama-3.1-8B-Instruct","messages":[]}"#.to_owned();
    let error = together
        .clone()
        .oneshot(request(Method::POST, "chat/completions", typo)?)
        .await
        .err();
    let missing = error
        .as_ref()
        .and_then(|error| error.downcast_ref::<ModelNotFound>());
    println!(
        "404: {}",
        missing.map_or("no typed error".to_owned(), ToString::to_string)
    );

    // Embeddings: 95 inputs, at most 20 a request.
    let texts: Vec<String> = (0..95).map(|i| format!("text {i}")).collect();
    let embeddings_before = sim.stats().class(Class::Embeddings).requests;
    let embedded = EmbedInputs::new("BAAI/bge-large-en-v1.5")
        .embed(
            together.clone(),
            |body| {
                Request::post(url("embeddings"))
                    .header("authorization", KEY)
                    .body(Full::new(body))
                    .expect("a valid request")
            },
            &texts,
        )
        .await;
    let requests = sim.stats().class(Class::Embeddings).requests - embeddings_before;
    let vectors = embedded.vectors().iter().flatten().count();
    println!(
        "embeddings: {vectors} of 95 vectors in input order from {requests} requests, {} chunks failed",
        embedded.failures().len()
    );

    sim.shutdown().await;
    if created != 5
        || fine_tunes.conflict != 0
        || fallback.is_none_or(|fallback| fallback.answered_by != SMALL_MODEL)
        || missing.is_none_or(|missing| {
            missing.closest().first().map(String::as_str) != Some(SMALL_MODEL)
        })
        || vectors != 95
        || requests != 5
    {
        return Err("the stack did not handle the error table".into());
    }
    Ok(())
}
