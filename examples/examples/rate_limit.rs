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

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use together_tower::ServiceBuilderExt;
use together_tower::classify::EndpointClass;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use tokio::net::TcpListener;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

struct Options {
    requests: usize,
    rps: u32,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        requests: 60,
        rps: 10,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or(format!("{flag} needs a value"))?;
        let invalid = || format!("{flag} takes a positive whole number, not {value:?}");
        match flag.as_str() {
            "--requests" => options.requests = value.parse().map_err(|_| invalid())?,
            "--rps" => options.rps = value.parse().map_err(|_| invalid())?,
            _ => return Err(format!("unknown flag {flag}; use --requests N and --rps R")),
        }
    }
    if options.requests == 0 || options.rps == 0 {
        return Err("--requests and --rps must be at least 1".into());
    }
    Ok(options)
}

/// Starts a server that allows `rps` requests a second per key (GCRA, half an interval of
/// tolerance for jitter) and returns its base URL and its count of 429s sent.
async fn start_server(rps: u32) -> std::io::Result<(String, Arc<Mutex<u64>>)> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let interval = Duration::from_secs(1) / rps;
    let next_allowed: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
    let refused = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&refused);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (next_allowed, refused) = (Arc::clone(&next_allowed), Arc::clone(&refused));
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let key = request
                    .headers()
                    .get("authorization")
                    .map(|v| v.as_bytes().to_vec())
                    .unwrap_or_default();
                let now = Instant::now();
                let mut next_allowed = next_allowed.lock().unwrap();
                let next = next_allowed.entry(key).or_insert(now);
                let response = if now + interval / 2 >= *next {
                    *next = now.max(*next) + interval;
                    Response::new(Full::new(Bytes::from_static(
                        br#"{"object":"chat.completion"}"#,
                    )))
                } else {
                    *refused.lock().unwrap() += 1;
                    let mut response = Response::new(Full::new(Bytes::from_static(
                        br#"{"error":{"message":"rate limited","type":"dynamic_request_limited"}}"#,
                    )));
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    response
                        .headers_mut()
                        .insert("retry-after", "1".parse().unwrap());
                    response
                };
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
    });
    Ok((url, counter))
}

/// Sends `requests` chat requests at once through `client`; returns (2xx, 429, seconds).
async fn run<S>(client: S, url: &str, requests: usize) -> (usize, usize, f64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<hyper::body::Incoming>>
        + Clone
        + Send
        + 'static,
    S::Error: Into<BoxError> + Send,
    S::Future: Send,
{
    let started = Instant::now();
    let calls: Vec<_> = (0..requests)
        .map(|_| {
            let request = Request::post(format!("{url}/v1/chat/completions"))
                .header("authorization", "Bearer example-key")
                .body(Full::new(Bytes::from_static(
                    br#"{"model":"m","messages":[]}"#,
                )))
                .expect("a valid request");
            tokio::spawn(client.clone().oneshot(request))
        })
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for call in calls {
        match call.await.map(|result| result.map_err(Into::into)) {
            Ok(Ok(response)) if response.status().is_success() => ok += 1,
            Ok(Ok(response)) if response.status() == StatusCode::TOO_MANY_REQUESTS => limited += 1,
            _ => {}
        }
    }
    (ok, limited, started.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("rate_limit: {message}");
            std::process::exit(2);
        }
    };
    let (url, refused) = start_server(options.rps).await?;
    println!(
        "local server at {url}: {} chat requests/s per key\n",
        options.rps
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let bare = run(client.clone(), &url, options.requests).await;

    // Fresh buckets on the server for the second run.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(options.rps)))
        .class(EndpointClass::Chat, "chat")
        .build()?;
    let limited_client = ServiceBuilder::new()
        .together_rate_limit(table)
        .service(client);
    let limited = run(limited_client, &url, options.requests).await;

    println!(
        "{:<22} {:>6} {:>6} {:>9}",
        "client", "2xx", "429", "seconds"
    );
    for (name, (ok, too_many, seconds)) in [
        ("bare hyper client", bare),
        ("with RateLimitLayer", limited),
    ] {
        println!("{name:<22} {ok:>6} {too_many:>6} {seconds:>9.2}");
    }
    let (ok, _, seconds) = limited;
    let quota_share = ok as f64 / (1.0 + f64::from(options.rps) * seconds);
    println!(
        "\nwith the layer: {:.2} requests/s, {:.1}% of the quota",
        ok as f64 / seconds,
        100.0 * quota_share
    );
    println!("\nthe server sent {} 429s in all", refused.lock().unwrap());
    Ok(())
}
