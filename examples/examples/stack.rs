//! The whole stack, `TogetherLayer` (buffer, retry, rate limit), around hyper-util's `Client`,
//! added with `ServiceBuilder::together`.
//!
//! A local server limits each key to `--rps` requests a second (429 and `Retry-After` beyond)
//! and fails every tenth request it accepts with 503. The client sends `--requests` chat
//! requests at once: the rate limit keeps it off the 429 wall, the retry layer sends the 503s
//! again after a jittered backoff, each retry waiting its turn in the limiter.
//!
//! ```text
//! cargo run --release -p together-tower-examples --example stack -- --requests 40 --rps 10
//! ```

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::Ordering;
use together_tower::ServiceBuilderExt;
use together_tower::buffer::BufferedBody;
use together_tower::classify::EndpointClass;
use together_tower::limit::Limits;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_examples::{LocalServer, send_chat_requests};
use tower::{BoxError, ServiceBuilder};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut args = std::env::args().skip(1);
    let (mut requests, mut rps) = (40usize, 10u32);
    while let (Some(flag), Some(value)) = (args.next(), args.next()) {
        match (flag.as_str(), value.parse::<u32>()) {
            ("--requests", Ok(value)) if value > 0 => requests = value as usize,
            ("--rps", Ok(value)) if value > 0 => rps = value,
            _ => {
                eprintln!("stack: use --requests N and --rps R with positive whole numbers");
                std::process::exit(2);
            }
        }
    }
    let server = LocalServer::start(rps, Some(10)).await?;
    println!(
        "local server at {}: {rps} chat requests/s per key, every 10th accepted fails with 503\n",
        server.url
    );

    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(rps)))
        .class(EndpointClass::Chat, "chat")
        .build()?;
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Full<Bytes>>>();
    let together = ServiceBuilder::new()
        .together(Limits::new(table))
        .service(client);
    let body = || Full::new(Bytes::from_static(br#"{"model":"m","messages":[]}"#));
    let tally = send_chat_requests(together, &server.url, requests, body).await;

    let answers = &server.answers;
    println!(
        "client: {} ok, {} failed, {} handed back as 429, in {:.2} s",
        tally.ok, tally.failed, tally.too_many, tally.seconds
    );
    println!(
        "server: {} ok, {} 503 (retried), {} 429",
        answers.ok.load(Ordering::Relaxed),
        answers.unavailable.load(Ordering::Relaxed),
        answers.too_many.load(Ordering::Relaxed)
    );
    Ok(())
}
