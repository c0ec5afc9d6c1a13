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
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, JobSettings, Sim, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::embeddings::EmbedInputs;
use together_tower::models::ModelNotFound;
use together_tower::quota::QuotaTable;
use together_tower::retry::{ModelFallback, RetryPolicy};
use together_tower::{Limits, TogetherLayer, TogetherService};
use together_tower_examples::CHAT_MODEL;
use tower::{BoxError, Layer, ServiceExt};

const SMALL_MODEL: &str = "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo";
const KEY: &str = "Bearer example-key";

/// The stack under test, on hyper-util's client.
type Together = TogetherService<Client<HttpConnector, BufferedBody<Full<Bytes>>>>;

/// The stack and the simulator's address.
struct Stage {
    together: Together,
    base: String,
}

impl Stage {
    fn request(
        &self,
        method: Method,
        path: &str,
        body: String,
    ) -> http::Result<Request<Full<Bytes>>> {
        Request::builder()
            .method(method)
            .uri(format!("{}/v1/{path}", self.base))
            .header("authorization", KEY)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
    }
}

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
    let stage = Stage {
        together: TogetherLayer::new(Limits::new(QuotaTable::together_defaults()))
            .with_retry(RetryPolicy::new().with_fallback(CHAT_MODEL, SMALL_MODEL))
            .layer(client),
        base: sim.url(),
    };

    let started = Instant::now();
    let created = five_creates(&stage).await?;
    let fine_tunes = sim.stats().class(Class::FineTunes);
    println!(
        "fine-tunes: {created} of 5 created in {:.1} s, three slots; the server answered {} 409s",
        started.elapsed().as_secs_f64(),
        fine_tunes.conflict
    );
    let fallback = overloaded_model(&stage).await?;
    let missing = misspelt_model(&stage).await?;
    let embeddings_before = sim.stats().class(Class::Embeddings).requests;
    let (vectors, failed) = long_embeddings_list(&stage).await;
    let requests = sim.stats().class(Class::Embeddings).requests - embeddings_before;
    println!(
        "embeddings: {vectors} of 95 vectors in input order from {requests} requests, {failed} chunks failed"
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

/// 409: five fine-tune creates at once, three slots. Returns how many were created.
async fn five_creates(stage: &Stage) -> Result<usize, BoxError> {
    let creates: Vec<_> = (0..5)
        .map(|_| {
            let create = stage.request(
                Method::POST,
                "fine-tunes",
                format!(r#"{{"model":"{SMALL_MODEL}","training_file":"file-1"}}"#),
            );
            let together = stage.together.clone();
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
        let together = stage.together.clone();
        let list = stage.request(Method::GET, "fine-tunes", String::new())?;
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
    Ok(created)
}

/// 503: the overloaded model falls back to the small one, and the answer says so.
async fn overloaded_model(stage: &Stage) -> Result<Option<ModelFallback>, BoxError> {
    let chat = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8}}"#
    );
    let response = stage
        .together
        .clone()
        .oneshot(stage.request(Method::POST, "chat/completions", chat)?)
        .await?;
    let fallback = response.extensions().get::<ModelFallback>().cloned();
    println!(
        "503 for {CHAT_MODEL}: answered {} by {}",
        response.status(),
        fallback
            .as_ref()
            .map_or("the same model", |fallback| fallback.answered_by.as_str())
    );
    Ok(fallback)
}

/// 404: a misspelt model becomes `ModelNotFound`, naming the closest models.
async fn misspelt_model(stage: &Stage) -> Result<Option<ModelNotFound>, BoxError> {
    let typo = r#"{"model":"meta-llama/Meta-Llama-3.1-8B-Instruct","messages":[]}"#.to_owned();
    let error = stage
        .together
        .clone()
        .oneshot(stage.request(Method::POST, "chat/completions", typo)?)
        .await
        .err();
    let missing = error
        .as_ref()
        .and_then(|error| error.downcast_ref::<ModelNotFound>())
        .cloned();
    println!(
        "404: {}",
        missing
            .as_ref()
            .map_or("no typed error".to_owned(), ToString::to_string)
    );
    Ok(missing)
}

/// Embeddings: 95 inputs, at most 20 a request. Returns how many vectors came back, and how
/// many chunks failed.
async fn long_embeddings_list(stage: &Stage) -> (usize, usize) {
    let texts: Vec<String> = (0..95).map(|i| format!("text {i}")).collect();
    let url = format!("{}/v1/embeddings", stage.base);
    let embedded = EmbedInputs::new("BAAI/bge-large-en-v1.5")
        .embed(
            stage.together.clone(),
            |body| {
                Request::post(&url)
                    .header("authorization", KEY)
                    .body(Full::new(body))
                    .expect("a valid request")
            },
            &texts,
        )
        .await;
    let vectors = embedded.vectors().iter().flatten().count();
    (vectors, embedded.failures().len())
}
