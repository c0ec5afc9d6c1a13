//! async-openai's client with the stack as its HTTP service.
//!
//! A simulated Together on a loopback port allows each key 300 chat requests a minute, which it
//! enforces per second. The same 20 chat completions go out at once twice through
//! async-openai: with its own client, which retries 429s with backoff until it gives up, and
//! with [`http_service`] on the stack, where each call waits its turn and none meets a 429.
//!
//! ```text
//! cargo run -p together-tower-examples --example async_openai
//! ```

use std::time::Instant;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use together_sim::{Class, SimConfig, SimHandle};
use together_tower::client::{Reqwest, async_openai::http_service};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::{CHAT_MODEL, simulator};
use tower::{BoxError, ServiceBuilder};

const CALLS: usize = 20;
const CHAT_RPM: u32 = 300;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = simulator(CHAT_RPM.into(), SimConfig::default()).await?;
    println!(
        "simulated Together at {}: {CHAT_RPM} chat requests a minute per key\n",
        sim.url()
    );
    let config = |key: &str| {
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", sim.url()))
            .with_api_key(key)
    };

    let own = Client::with_config(config("key-own-retry"));
    let own_run = run(&own, &sim).await;

    // The stack on reqwest, told the same quota the server enforces.
    let table = QuotaTable::together_defaults()
        .to_builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_minute(CHAT_RPM)).per_model(true),
        )
        .build()?;
    let limits = Limits::new(table);
    let stack = ServiceBuilder::new()
        .layer(TogetherLayer::new(limits))
        .service(Reqwest::new(reqwest::Client::new()));
    let together = Client::with_config(config("key-stack")).with_http_service(http_service(stack));
    let stack_run = run(&together, &sim).await;

    println!(
        "{:<30} {:>9} {:>7} {:>12} {:>8}",
        "async-openai client", "answered", "failed", "server 429s", "seconds"
    );
    for (name, run) in [
        ("with its own retry", own_run),
        ("with together-tower's stack", stack_run),
    ] {
        println!(
            "{name:<30} {:>9} {:>7} {:>12} {:>8.2}",
            run.answered, run.failed, run.server_429, run.seconds
        );
    }
    sim.shutdown().await;
    if stack_run.answered != CALLS {
        return Err("a call through the stack failed".into());
    }
    Ok(())
}

/// How one client's calls went.
#[derive(Debug, Clone, Copy)]
struct Run {
    answered: usize,
    failed: usize,
    server_429: u64,
    seconds: f64,
}

/// Sends [`CALLS`] chat completions at once through `client`.
async fn run(client: &Client<OpenAIConfig>, sim: &SimHandle) -> Run {
    let refused_before = sim.stats().class(Class::Chat).rate_limited;
    let started = Instant::now();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.chat().create(chat_request(i)?).await })
        })
        .collect();
    let mut answered = 0;
    for call in calls {
        if let Ok(Ok(reply)) = call.await
            && !reply.choices.is_empty()
        {
            answered += 1;
        }
    }
    Run {
        answered,
        failed: CALLS - answered,
        server_429: sim.stats().class(Class::Chat).rate_limited - refused_before,
        seconds: started.elapsed().as_secs_f64(),
    }
}

fn chat_request(i: usize) -> Result<CreateChatCompletionRequest, async_openai::error::OpenAIError> {
    CreateChatCompletionRequestArgs::default()
        .model(CHAT_MODEL)
        .max_tokens(16u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(format!("Say hello to caller {i}."))
            .build()?
            .into()])
        .build()
}
