//! Runnable examples of together-tower, each against the simulated Together of `together-sim`
//! on a loopback port: no network, no key. Run one with
//! `cargo run -p together-tower-examples --example NAME`.
//!
//! - `hyper_client`: hyper-util's `Client` behind the stack, beside the same client bare.
//! - `service_builder`: the stack in a `ServiceBuilder` chain with tower's timeout and
//!   tower-http's trace and sensitive-header layers, against a server that fails some requests.
//! - `axum_gateway`: an axum gateway that forwards `/v1/*` through the stack with the
//!   organisation's key, with limits per team keyed by an incoming header.
//! - `fair_gateway`: an axum gateway that shares the organisation's quota between three teams
//!   by weight, read from a header, with an interactive route that goes first.
//! - `tonic_client`: a tonic client whose channel sits under the stack, with a classifier for
//!   its gRPC paths, against a small in-process gRPC server.
//! - `async_openai`: async-openai's client with the stack as its HTTP service.
//! - `streaming_chat`: async-openai's `create_stream` through the stack, with a token budget
//!   that holds only because each stream's charge is settled at its `data: [DONE]`.
//!
//! This library holds what the examples share.

use std::time::Instant;

use http::{Request, Response, StatusCode};
use together_sim::{Class, ClassLimits, Sim, SimConfig, SimHandle};

/// How early, in milliseconds, the examples' simulator lets a request arrive before its turn.
pub const JITTER_ALLOWANCE_MS: u64 = 20;

/// A chat model the simulator serves.
pub const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// Starts the simulator, limiting chat to `chat_rpm` requests a minute per key (enforced per
/// second, as Together does), with `config` for the rest.
///
/// The simulator paces by GCRA with a burst of one, stricter than Together's per-second
/// counts. It lets a request arrive up to [`JITTER_ALLOWANCE_MS`] before its exact turn: the
/// examples run on shared 2-core machines, where a debug build's task can be held back that
/// long between the limiter's decision and the socket. The examples show what the callers
/// see; the server's 429s are printed, and the stack waits out and resends any it meets.
pub async fn simulator(chat_rpm: u64, config: SimConfig) -> std::io::Result<SimHandle> {
    let config = SimConfig {
        limits: [(Class::Chat, ClassLimits::rpm(chat_rpm))].into(),
        gcra_tolerance_ms: JITTER_ALLOWANCE_MS,
        ..config
    };
    Sim::start(config).await
}

/// Points a gateway's incoming request at `/v1/{path}` under `together`, and drops the
/// caller's `Host`; `false` if that makes no URI.
pub fn point_at_together<B>(request: &mut Request<B>, together: &str, path: &str) -> bool {
    match format!("{together}/v1/{path}").parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(_) => return false,
    }
    request.headers_mut().remove(http::header::HOST);
    true
}

/// A gateway's answer when the stack gave none: the limiter's refusal as Together would send
/// it (429 with `Retry-After`), as the caller expects of Together; else 502.
pub fn gateway_error<B: From<String> + Default>(error: &tower::BoxError) -> Response<B> {
    together_tower::limit::error::refusal_response(&**error)
        .map(|refusal| refusal.map(B::from))
        .unwrap_or_else(|| empty(StatusCode::BAD_GATEWAY))
}

/// An empty answer with `status`.
pub fn empty<B: Default>(status: StatusCode) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = status;
    response
}

/// A chat completion request's JSON body.
pub fn chat_body(text: &str) -> String {
    serde_json::json!({
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 16,
    })
    .to_string()
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

/// Sends `count` chat requests at once through `client`, each from its own task, with `key`,
/// and tallies the answers.
pub async fn send_chat_requests<S, B, R>(
    client: S,
    url: &str,
    key: &str,
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
                .header("authorization", format!("Bearer {key}"))
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
