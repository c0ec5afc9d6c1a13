//! hyper-util's `Client` behind the whole stack, beside the same client bare.
//!
//! A simulated Together on a loopback port allows each key 600 chat requests a minute, which it
//! enforces per second, as Together does, and answers faster requests with 429. The same 60
//! requests go out at once twice: from the bare client, as today's SDKs send them, and through
//! `TogetherLayer` with the same quota, where each waits its turn.
//!
//! ```text
//! cargo run -p together-tower-examples --example hyper_client
//! ```

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::quota::QuotaTable;
use together_tower::{Limits, ServiceBuilderExt};
use together_tower_examples::{chat_body, send_chat_requests, simulator};
use tower::{BoxError, ServiceBuilder};

const REQUESTS: usize = 60;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = simulator(600, SimConfig::default()).await?;
    println!(
        "simulated Together at {}: 600 chat requests a minute per key\n",
        sim.url()
    );
    let body = || Full::new(Bytes::from(chat_body("Say hello.")));

    let bare_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let bare = send_chat_requests(bare_client, &sim.url(), "key-bare", REQUESTS, body).await;
    let bare_429 = sim.stats().class(Class::Chat).rate_limited;

    // The same client, built for the stack's body type, behind the stack. The default table
    // is Together's published one: 600 chat requests a minute.
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Full<Bytes>>>();
    let limits = Limits::new(QuotaTable::together_defaults());
    let together = ServiceBuilder::new().together(limits).service(client);
    let limited = send_chat_requests(together, &sim.url(), "key-stack", REQUESTS, body).await;

    println!(
        "{:<26} {:>6} {:>6} {:>9}",
        "client", "2xx", "429", "seconds"
    );
    for (name, tally) in [
        ("bare hyper client", bare),
        ("behind TogetherLayer", limited),
    ] {
        println!(
            "{name:<26} {:>6} {:>6} {:>9.2}",
            tally.ok, tally.too_many, tally.seconds
        );
    }
    let stack_429 = sim.stats().class(Class::Chat).rate_limited - bare_429;
    println!(
        "\nthe server answered 429 to {bare_429} requests of the bare client, {stack_429} of the stack's"
    );
    // The quota allows the first request at once, then ten a second.
    let allowed = 1.0 + 10.0 * limited.seconds;
    println!(
        "behind the stack: {:.2} requests a second, {:.1}% of the quota",
        limited.ok as f64 / limited.seconds,
        100.0 * limited.ok as f64 / allowed
    );
    sim.shutdown().await;
    if limited.ok != REQUESTS || limited.too_many != 0 {
        return Err("the stack let a 429 through".into());
    }
    Ok(())
}
