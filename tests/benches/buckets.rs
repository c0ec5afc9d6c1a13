//! The heap one live bucket holds: a gateway that serves many API keys keeps one bucket per
//! (key, quota group, model) it has seen lately, so this is what each key costs it.
//!
//! Requests with distinct keys go through `RateLimit` (an inner service that answers at once,
//! a chat quota per model that never binds, room for every bucket) until the given number of
//! buckets is live; the heap is counted before and after by an allocator that wraps the
//! system's. Everything a request allocates is dropped with its answer, so what stays is the
//! buckets: the map's entries, each bucket (its queue, its GCRA state, its atomics) behind its
//! `Arc`, and the model's name, which a bucket keeps from the first request that made it.
//!
//! `cargo bench -p together-tower-tests --bench buckets` (a million buckets). Without
//! `--bench` (as `cargo test --all-targets` runs it) ten thousand check that it works.

#![allow(missing_docs)]

use std::alloc::System;
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use together_tower::body::RequestMeta;
use together_tower::limit::{Limits, RateLimitLayer};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_tests::{CHAT_MODEL, heap_bytes};
use tower::{Layer, Service, ServiceExt};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// An inner client that answers at once with an empty body.
#[derive(Clone, Copy)]
struct Ok200;

impl Service<Request<()>> for Ok200 {
    type Response = Response<Empty<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(Empty::new())))
    }
}

/// A chat request with key number `key`, its body already read (as the buffer layer would).
fn chat(key: usize) -> Request<()> {
    let body = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":16}}"#
    );
    let mut request = Request::post("https://api.together.xyz/v1/chat/completions")
        .header(
            "authorization",
            format!("Bearer probe-key-0123456789abcdefghijklmnopqrstuvwxyz-{key}"),
        )
        .body(())
        .expect("a valid request");
    let meta = RequestMeta::from_json(body.as_bytes()).expect("a JSON body");
    request.extensions_mut().insert(meta);
    request
}

/// Limits with a chat quota per model that never binds and room for `buckets` buckets (twice
/// that: the map is in shards, and keys do not spread over them exactly evenly).
fn limits(buckets: usize) -> Limits {
    let rate = Rate::per_second(1_000_000_000).with_burst(1_000_000_000);
    let table = QuotaTable::together_defaults()
        .to_builder()
        .group("chat", GroupQuota::rate(rate).per_model(true))
        .build()
        .expect("a valid table");
    Limits::builder(table).max_buckets(2 * buckets).build()
}

#[tokio::main(flavor = "current_thread")]
#[allow(clippy::cast_precision_loss)]
async fn main() {
    let benching = std::env::args().any(|arg| arg == "--bench");
    let buckets = if benching { 1_000_000 } else { 10_000 };
    let limits = limits(buckets);
    let mut service = RateLimitLayer::new(limits.clone()).layer(Ok200);
    // The first request makes what every bucket shares (the group's name, the map's shards).
    let first = service.ready().await.unwrap().call(chat(0)).await;
    drop(first.expect("the first request is answered"));
    let before = heap_bytes();
    for key in 1..=buckets {
        let answer = service.ready().await.unwrap().call(chat(key)).await;
        drop(answer.expect("every request is answered"));
    }
    let after = heap_bytes();
    let live = limits.snapshot().len();
    assert_eq!(live, buckets + 1, "every bucket made is live");
    let per_bucket = (after - before) as f64 / buckets as f64;
    println!("{buckets} live buckets: {per_bucket:.0} bytes of heap each");
}
