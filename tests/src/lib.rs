//! Support for the integration tests: the layers against the simulated Together of
//! `together-sim`, over real HTTP on loopback, judged by what the simulator saw.

use bytes::Bytes;
use http::Request;
use http_body::Body;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// How early, in milliseconds, a strictly pacing simulator lets a request arrive before its
/// turn in these tests. They run on shared 2-core machines, where a debug build's task can be
/// held back this long between the limiter's decision and the socket: less would test the
/// machine's scheduler, not the limiter.
pub const JITTER_ALLOWANCE_MS: u64 = 20;

/// A chat model the simulator serves.
pub const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// hyper-util's pooled HTTP client, as users put it under the layers.
pub fn http_client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// A chat completion request to the server at `base`, with `key`.
pub fn chat_request(base: &str, key: &str) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":8}}"#
    );
    Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

/// Bytes on the heap now, as counted by `stats_alloc`'s instrumented system allocator. Only
/// a benchmark that makes it the global allocator counts anything:
///
/// ```ignore
/// #[global_allocator]
/// static HEAP: &stats_alloc::StatsAlloc<std::alloc::System> = &stats_alloc::INSTRUMENTED_SYSTEM;
/// ```
pub fn heap_bytes() -> i64 {
    let stats = stats_alloc::INSTRUMENTED_SYSTEM.stats();
    stats.bytes_allocated as i64 - stats.bytes_deallocated as i64 + stats.bytes_reallocated as i64
}
