//! A hyper client behind `RateLimitLayer`, against a local server that limits like Together.
//!
//! The server (on a loopback port, started here) allows each API key `--rps` chat requests a
//! second and answers faster requests with 429 and `Retry-After`, as Together enforces its
//! per-minute limits per second. The same workload runs twice: with the bare client, as today's
//! SDKs send it, and with the client behind `RateLimitLayer` at the same quota.
//!
//! ```text
//! cargo run --release -p together-tower-examples --example rate_limit -- --requests 60 --rps 10
//! ```

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_tower::ServiceBuilderExt;
use together_tower::classify::EndpointClass;
use together_tower::limit::Limits;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_examples::{LocalServer, send_chat_requests};
use tower::{BoxError, ServiceBuilder};

/// The flags: `--requests N` and `--rps R`.
fn options() -> Result<(usize, u32), String> {
    let (mut requests, mut rps) = (60, 10);
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let invalid = || format!("{flag} takes a positive whole number, not {value:?}");
        match flag.as_str() {
            "--requests" => requests = value.parse().map_err(|_| invalid())?,
            "--rps" => rps = value.parse().map_err(|_| invalid())?,
            _ => return Err(format!("unknown flag {flag}; use --requests N and --rps R")),
        }
    }
    if requests == 0 || rps == 0 {
        return Err("--requests and --rps must be at least 1".into());
    }
    Ok((requests, rps))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (requests, rps) = options().unwrap_or_else(|message| {
        eprintln!("rate_limit: {message}");
        std::process::exit(2);
    });
    let server = LocalServer::start(rps, None).await?;
    println!(
        "local server at {}: {rps} chat requests/s per key\n",
        server.url
    );
    let body = || Full::new(Bytes::from_static(br#"{"model":"m","messages":[]}"#));

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let bare = send_chat_requests(client.clone(), &server.url, requests, body).await;

    // Let the server's buckets refill before the second run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(rps)))
        .class(EndpointClass::Chat, "chat")
        .build()?;
    let limited_client = ServiceBuilder::new()
        .together_rate_limit(Limits::new(table))
        .service(client);
    let limited = send_chat_requests(limited_client, &server.url, requests, body).await;

    println!(
        "{:<22} {:>6} {:>6} {:>9}",
        "client", "2xx", "429", "seconds"
    );
    for (name, tally) in [
        ("bare hyper client", bare),
        ("with RateLimitLayer", limited),
    ] {
        println!(
            "{name:<22} {:>6} {:>6} {:>9.2}",
            tally.ok, tally.too_many, tally.seconds
        );
    }
    // The quota over the run allows the first request at once, then `rps` a second.
    let allowed = 1.0 + f64::from(rps) * limited.seconds;
    println!(
        "\nwith the layer: {:.2} requests/s, {:.1}% of the quota",
        limited.ok as f64 / limited.seconds,
        100.0 * limited.ok as f64 / allowed
    );
    Ok(())
}
