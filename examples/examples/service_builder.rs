//! The stack in a `ServiceBuilder` chain beside tower's and tower-http's own layers.
//!
//! Above the stack, tower-http marks `Authorization` sensitive (this crate's layers do too, but a
//! chain that logs before them needs it). Below the stack, per attempt, tower-http traces each
//! request and tower times it out, so a timed-out attempt is retried like a broken connection.
//! The simulated Together limits chat to 600 requests a minute per key and fails one request in
//! ten with 503; the retry layer sends those again, each waiting its turn in the limiter.
//!
//! ```text
//! cargo run -p together-tower-examples --example service_builder
//! ```

use std::time::Duration;

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, Faults, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::quota::QuotaTable;
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::{chat_body, send_chat_requests, simulator};
use tower::{BoxError, ServiceBuilder};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

const REQUESTS: usize = 40;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    // The trace layer's spans and this crate's events (retries, the rate in force) on stderr.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .init();
    let config = SimConfig {
        faults: Faults {
            unavailable_rate: 0.1,
            ..Faults::default()
        },
        ..SimConfig::default()
    };
    let sim = simulator(600, config).await?;
    println!(
        "simulated Together at {}: 600 chat requests a minute per key, one in ten answered 503\n",
        sim.url()
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Full<Bytes>>>();
    let stack = ServiceBuilder::new()
        .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
        .layer(TogetherLayer::new(Limits::new(
            QuotaTable::together_defaults(),
        )))
        // Below the stack: each attempt is traced, and times out on its own.
        .layer(TraceLayer::new_for_http())
        .timeout(Duration::from_secs(10))
        .service(client);
    let body = || Full::new(Bytes::from(chat_body("Say hello.")));
    let tally = send_chat_requests(stack, &sim.url(), "example-key", REQUESTS, body).await;

    let seen = sim.stats().class(Class::Chat);
    println!(
        "client: {} ok, {} failed, {} handed back as 429, in {:.2} s",
        tally.ok, tally.failed, tally.too_many, tally.seconds
    );
    println!(
        "server: {} ok, {} answered 503 and sent again, {} 429",
        seen.ok, seen.unavailable, seen.rate_limited
    );
    sim.shutdown().await;
    if tally.ok != REQUESTS {
        return Err("a request failed".into());
    }
    Ok(())
}
