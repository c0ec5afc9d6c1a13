//! A thousand streamed chat answers open at once, through the whole stack and through the same
//! hyper client bare: the time from the send to each stream's first event, and the heap each
//! open stream holds.
//!
//! The simulator runs in this process on a loopback port, with limits that never bind, and
//! sends a stream's first event at once and the next ten seconds later: every stream is still
//! open when the last one has its first event. Each round opens the streams one every half
//! millisecond (all of them at the same instant would measure the kernel's accept queue: a
//! SYN dropped is resent after a second), reads each answer to its first event, counts the
//! heap while all of them are open, then drops them. The heap is counted by an allocator that wraps the system's; the stack's cost
//! per stream is the stack's heap per open stream less the bare client's (the simulator's
//! and the connections' share is the same in both).
//!
//! `cargo bench -p together-tower-tests --bench streams` (1,000 streams, 7 rounds each).
//! Without `--bench` (as `cargo test --all-targets` runs it) one small round of each checks
//! that the bench works.

#![allow(missing_docs)]

use std::alloc::System;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use together_sim::{Class, ClassLimits, Sim, SimConfig, StreamSettings};
use together_tower::ServiceBuilderExt;
use together_tower::classify::EndpointClass;
use together_tower::limit::Limits;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_tests::{CHAT_MODEL, heap_bytes, http_client};
use tokio::sync::watch;
use tower::{Service, ServiceBuilder, ServiceExt};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A streamed chat request to the simulator at `base`.
fn streamed_chat(base: &str) -> Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{CHAT_MODEL}","messages":[{{"role":"user","content":"tell me a story"}}],"max_tokens":64,"stream":true}}"#
    );
    Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", "Bearer bench-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("a valid request")
}

/// The simulator: chat limits that never bind (a burst of every stream at once), a stream's
/// events ten seconds apart.
async fn simulator(streams: u64) -> together_sim::SimHandle {
    let chat = ClassLimits {
        burst: streams,
        ..ClassLimits::rpm(60_000_000)
    };
    let config = SimConfig {
        limits: BTreeMap::from([(Class::Chat, chat)]),
        stream: StreamSettings {
            chunks_per_second: 0.1,
        },
        ..SimConfig::default()
    };
    Sim::start(config).await.expect("the simulator starts")
}

/// The stack's limits: a request rate and a token budget that never bind, so every stream
/// is charged, watched for its `usage` and settled as in use, but none waits.
fn limits(streams: u32) -> Limits {
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(1_000_000).with_burst(streams))
                .with_tokens(Rate::per_second(1_000_000_000).with_burst(streams * 1_000)),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .expect("a valid table");
    Limits::builder(table).build()
}

/// What one round measured.
struct Round {
    /// Each stream's time from its send to its first event, sorted.
    first_events: Vec<Duration>,
    /// Heap bytes per open stream, over the heap before the round.
    bytes_per_stream: f64,
}

/// How far apart a round's streams are opened.
const GAP: Duration = Duration::from_micros(500);

/// Opens `streams` streams through `client`, [`GAP`] apart, and measures them.
async fn round<S, B>(client: &S, base: &str, streams: usize) -> Round
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Debug,
    B: Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Debug,
{
    let start = tokio::time::Instant::now() + Duration::from_millis(20);
    let (release, released) = watch::channel(false);
    let (opened, mut first_events) = tokio::sync::mpsc::unbounded_channel();
    let requests: Vec<_> = (0..streams).map(|_| streamed_chat(base)).collect();
    let before = heap_bytes();
    let tasks: Vec<_> = requests
        .into_iter()
        .zip(0u32..)
        .map(|(request, index)| {
            let (client, opened) = (client.clone(), opened.clone());
            let mut released = released.clone();
            tokio::spawn(async move {
                tokio::time::sleep_until(start + GAP * index).await;
                let sent = Instant::now();
                let response = client.oneshot(request).await.expect("an answer");
                assert_eq!(response.status(), 200);
                let mut body = response.into_body();
                loop {
                    let frame = body.frame().await.expect("a first event").expect("a frame");
                    if frame.data_ref().is_some_and(|data| !data.is_empty()) {
                        break;
                    }
                }
                opened.send(sent.elapsed()).expect("the round listens");
                // Held open until every stream has had its first event and the heap is read.
                released
                    .wait_for(|go| *go)
                    .await
                    .expect("the round releases");
                drop(body);
            })
        })
        .collect();
    drop(opened);
    let mut first = Vec::with_capacity(streams);
    while first.len() < streams {
        first.push(first_events.recv().await.expect("every stream opens"));
    }
    let bytes_per_stream = (heap_bytes() - before) as f64 / streams as f64;
    release.send(true).expect("the streams listen");
    for task in tasks {
        task.await.expect("a stream's task ends well");
    }
    first.sort();
    Round {
        first_events: first,
        bytes_per_stream,
    }
}

fn percentile(sorted: &[Duration], percent: f64) -> Duration {
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The medians over rounds of: the first event's p50 and p99 (ms), and bytes per stream.
fn summary(rounds: &[Round]) -> (f64, f64, f64) {
    let ms = |duration: Duration| duration.as_secs_f64() * 1_000.0;
    (
        median(
            rounds
                .iter()
                .map(|r| ms(percentile(&r.first_events, 50.0)))
                .collect(),
        ),
        median(
            rounds
                .iter()
                .map(|r| ms(percentile(&r.first_events, 99.0)))
                .collect(),
        ),
        median(rounds.iter().map(|r| r.bytes_per_stream).collect()),
    )
}

fn main() {
    let bench = std::env::args().any(|arg| arg == "--bench");
    let (streams, rounds) = if bench { (1_000, 7) } else { (20, 1) };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let sim = simulator(streams as u64).await;
        let bare = http_client::<Full<Bytes>>();
        let stack = ServiceBuilder::new()
            .together(limits(streams as u32))
            .service(http_client());
        // One small round of each first: connections, the bucket and the allocator warm.
        round(&bare, &sim.url(), 10).await;
        round(&stack, &sim.url(), 10).await;
        let (mut bare_rounds, mut stack_rounds) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            bare_rounds.push(round(&bare, &sim.url(), streams).await);
            stack_rounds.push(round(&stack, &sim.url(), streams).await);
        }
        sim.shutdown().await;
        let (bare, stack) = (summary(&bare_rounds), summary(&stack_rounds));
        println!("{streams} streams open at once, {rounds} rounds each (medians of the rounds)");
        println!("client    first event p50   first event p99   heap per open stream");
        for (name, (p50, p99, bytes)) in [("bare", bare), ("stack", stack)] {
            println!("{name:<8} {p50:>13.2} ms {p99:>14.2} ms {bytes:>16.0} B");
        }
        println!(
            "the stack adds {:.2} ms (p50), {:.2} ms (p99), {:.0} B a stream",
            stack.0 - bare.0,
            stack.1 - bare.1,
            stack.2 - bare.2
        );
    });
}
