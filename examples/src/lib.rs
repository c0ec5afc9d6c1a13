//! Runnable examples of together-tower. Each is a file in `examples/`; run one with
//! `cargo run --release -p together-tower-examples --example NAME`.
//!
//! - `rate_limit`: hyper-util's `Client` behind `RateLimitLayer`, against a local server that
//!   enforces Together's per-second limits, beside the same client without the layer.
//! - `stack`: the whole stack (`TogetherLayer`: buffer, retry, rate limit) against a local
//!   server that also fails some requests with 503.
//!
//! This library holds what the examples share: [`LocalServer`], a stand-in for Together.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a [`LocalServer`] answered, by kind.
#[derive(Debug, Default)]
pub struct Answers {
    /// 200s.
    pub ok: AtomicU64,
    /// 429s: requests over the limit.
    pub too_many: AtomicU64,
    /// 503s: injected failures.
    pub unavailable: AtomicU64,
}

/// A local stand-in for Together on a loopback port: it allows each API key `rps` requests a
/// second (GCRA, with half an interval of tolerance for jitter), answers faster ones with 429
/// and `Retry-After: 1`, and fails every `fail_every`-th allowed request with 503.
#[derive(Debug)]
pub struct LocalServer {
    /// The base URL, such as `http://127.0.0.1:40123`.
    pub url: String,
    /// What it answered so far.
    pub answers: Arc<Answers>,
}

impl LocalServer {
    /// Starts the server; it runs until the runtime stops.
    pub async fn start(rps: u32, fail_every: Option<u64>) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let url = format!("http://{}", listener.local_addr()?);
        let interval = Duration::from_secs(1) / rps.max(1);
        let next_allowed: Arc<Mutex<HashMap<Vec<u8>, Instant>>> = Arc::default();
        let answers = Arc::new(Answers::default());
        let counters = Arc::clone(&answers);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (next_allowed, answers) = (Arc::clone(&next_allowed), Arc::clone(&answers));
                let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                    let key = request
                        .headers()
                        .get("authorization")
                        .map(|v| v.as_bytes().to_vec());
                    let allowed = {
                        let now = Instant::now();
                        let mut next_allowed =
                            next_allowed.lock().unwrap_or_else(|p| p.into_inner());
                        let next = next_allowed.entry(key.unwrap_or_default()).or_insert(now);
                        let allowed = now + interval / 2 >= *next;
                        if allowed {
                            *next = now.max(*next) + interval;
                        }
                        allowed
                    };
                    let response = answer(allowed, fail_every, &answers);
                    async move { Ok::<_, Infallible>(response) }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Ok(Self {
            url,
            answers: counters,
        })
    }
}

fn answer(allowed: bool, fail_every: Option<u64>, answers: &Answers) -> Response<Full<Bytes>> {
    let (status, body): (StatusCode, &'static [u8]) = if !allowed {
        answers.too_many.fetch_add(1, Ordering::Relaxed);
        (
            StatusCode::TOO_MANY_REQUESTS,
            br#"{"error":{"message":"rate limited","type":"dynamic_request_limited"}}"#,
        )
    } else {
        let served =
            answers.ok.load(Ordering::Relaxed) + answers.unavailable.load(Ordering::Relaxed);
        if fail_every.is_some_and(|every| every > 0 && served % every == every - 1) {
            answers.unavailable.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                br#"{"error":{"message":"overloaded","type":"server_error"}}"#,
            )
        } else {
            answers.ok.fetch_add(1, Ordering::Relaxed);
            (
                StatusCode::OK,
                br#"{"object":"chat.completion","choices":[]}"#,
            )
        }
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body)));
    *response.status_mut() = status;
    if status == StatusCode::TOO_MANY_REQUESTS {
        response
            .headers_mut()
            .insert("retry-after", http::HeaderValue::from_static("1"));
    }
    response
}

/// How a run of [`send_chat_requests`] went, from the client's side.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tally {
    /// 2xx answers.
    pub ok: usize,
    /// 429 answers handed back to the caller.
    pub too_many: usize,
    /// Other failures: other statuses, or errors.
    pub failed: usize,
    /// Wall-clock seconds from the first send to the last answer.
    pub seconds: f64,
}

/// Sends `count` chat requests at once through `client`, each from its own task, and tallies
/// the answers.
pub async fn send_chat_requests<S, B, R>(
    client: S,
    url: &str,
    count: usize,
    body: impl Fn() -> B,
) -> Tally
where
    S: tower::Service<Request<B>, Response = Response<R>> + Clone + Send + 'static,
    R: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
    S::Future: Send,
    B: Send + 'static,
{
    use tower::ServiceExt;
    let started = Instant::now();
    let calls: Vec<_> = (0..count)
        .map(|_| {
            let request = Request::post(format!("{url}/v1/chat/completions"))
                .header("authorization", "Bearer example-key")
                .header("content-type", "application/json")
                .body(body())
                .expect("a valid request");
            tokio::spawn(client.clone().oneshot(request))
        })
        .collect();
    let mut tally = Tally::default();
    for call in calls {
        match call.await {
            Ok(Ok(response)) if response.status().is_success() => tally.ok += 1,
            Ok(Ok(response)) if response.status() == StatusCode::TOO_MANY_REQUESTS => {
                tally.too_many += 1
            }
            _ => tally.failed += 1,
        }
    }
    tally.seconds = started.elapsed().as_secs_f64();
    tally
}

/// The README's code, compiled as a doc test so that it stays true.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
