//! A user's program with together-tower's `async-openai` feature: async-openai's client with
//! the stack as its HTTP service, one chat completion from the simulator over plain HTTP.

use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use together_sim::{Sim, SimConfig};
use together_tower::client::{Reqwest, async_openai::http_service};
use together_tower::{Limits, TogetherLayer};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() {
    let sim = Sim::start(SimConfig::default()).await.expect("the simulator starts");
    let config = OpenAIConfig::new()
        .with_api_base(format!("{}/v1", sim.url()))
        .with_api_key("user-key");
    // With reqwest built with rustls and no crypto provider, this line panics.
    let client = reqwest::Client::new();
    let stack = ServiceBuilder::new()
        .layer(TogetherLayer::new(Limits::default()))
        .service(Reqwest::new(client));
    let together =
        async_openai::Client::with_config(config).with_http_service(http_service(stack));
    let message = ChatCompletionRequestUserMessageArgs::default()
        .content("hi")
        .build()
        .unwrap();
    let request = CreateChatCompletionRequestArgs::default()
        .model("meta-llama/Llama-3.3-70B-Instruct-Turbo")
        .messages([message.into()])
        .build()
        .unwrap();
    let answer = together.chat().create(request).await.expect("a completion");
    println!("ok: {} choice(s)", answer.choices.len());
    sim.shutdown().await;
}
