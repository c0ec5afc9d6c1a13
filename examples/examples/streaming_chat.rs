//! Streamed chat completions through the stack: async-openai's `create_stream` against a
//! simulated Together that streams its answers.
//!
//! The stack is told a token budget of 4,000 a minute and charges each request its
//! `max_completion_tokens` (2,000) and its prompt before it is sent. The answers use a few
//! tokens each. async-openai stops reading at `data: [DONE]` and drops the body; the stack
//! settles each charge from the `usage` of the stream's last chunk there, so the six streams
//! go one after the other at once. Without that, the budget would hold the third back for half
//! a minute and the rest for longer, past the stack's `max_wait` of ten seconds, and the
//! example would fail.
//!
//! ```text
//! cargo run -p together-tower-examples --example streaming_chat
//! ```

use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use together_sim::{SimConfig, StreamSettings};
use together_tower::client::{Reqwest, async_openai::http_service};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::{CHAT_MODEL, simulator};
use tokio_stream::StreamExt;
use tower::{BoxError, ServiceBuilder};

const STREAMS: usize = 6;
const MAX_COMPLETION_TOKENS: u32 = 2_000;
const TOKENS_PER_MINUTE: u32 = 4_000;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let config = SimConfig {
        stream: StreamSettings {
            chunks_per_second: 50.0,
        },
        ..SimConfig::default()
    };
    let sim = simulator(600, config).await?;
    println!(
        "simulated Together at {}, streaming 50 chunks a second\n",
        sim.url()
    );
    let table = QuotaTable::together_defaults()
        .to_builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_minute(600))
                .with_tokens(Rate::per_minute(TOKENS_PER_MINUTE).with_burst(TOKENS_PER_MINUTE))
                .per_model(true),
        )
        .build()?;
    let limits = Limits::builder(table)
        .max_wait(Duration::from_secs(10))
        .build();
    let stack = ServiceBuilder::new()
        .layer(TogetherLayer::new(limits))
        .service(Reqwest::new(reqwest::Client::new()));
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!("{}/v1", sim.url()))
            .with_api_key("key-streaming"),
    )
    .with_http_service(http_service(stack));

    println!(
        "{:<8} {:>18} {:>8} {:>13} {:>10}",
        "stream", "first token (ms)", "chunks", "tokens used", "total ms"
    );
    let started = Instant::now();
    for i in 0..STREAMS {
        let sent = Instant::now();
        let mut stream = client.chat().create_stream(chat_request(i)?).await?;
        let (mut first_token, mut chunks, mut used) = (None, 0, None);
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            chunks += 1;
            first_token.get_or_insert_with(|| sent.elapsed());
            if let Some(usage) = chunk.usage {
                used = Some(usage.total_tokens);
            }
        }
        println!(
            "{i:<8} {:>18.1} {chunks:>8} {:>13} {:>10.0}",
            first_token.unwrap_or_default().as_secs_f64() * 1e3,
            used.map_or_else(|| "-".to_owned(), |used| used.to_string()),
            sent.elapsed().as_secs_f64() * 1e3,
        );
    }
    println!(
        "\n{STREAMS} streams, each charged {MAX_COMPLETION_TOKENS} tokens and more up front against \
         {TOKENS_PER_MINUTE} a minute, in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    sim.shutdown().await;
    Ok(())
}

fn chat_request(i: usize) -> Result<CreateChatCompletionRequest, async_openai::error::OpenAIError> {
    CreateChatCompletionRequestArgs::default()
        .model(CHAT_MODEL)
        .max_completion_tokens(MAX_COMPLETION_TOKENS)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content(format!("Tell caller {i} a story."))
            .build()?
            .into()])
        .build()
}
