//! Three replicas of a service share one API key's quota through Redis.
//!
//! Each replica builds its own `Limits`, told the whole quota (600 chat requests a minute), as
//! separate processes would; their buckets live in one Redis, so together they send no faster
//! than the quota. The simulated Together enforces that quota per key and counts the 429s. The
//! same three with limiters of their own send three times the quota, and meet 429s (the stack
//! waits them out and sends again).
//!
//! Redis comes from `REDIS_URL`; without it the example starts `redis-server` on a free loopback
//! port (no persistence) and stops it at the end.
//!
//! ```text
//! cargo run -p together-tower-examples --example redis_replicas
//! ```

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::classify::TogetherClassifier;
use together_tower::limit::{Backend, LocalBackend};
use together_tower::quota::QuotaTable;
use together_tower::{Limits, TogetherLayer, TogetherService};
use together_tower_examples::{chat_body, send_chat_requests, simulator};
use together_tower_redis::{RedisBackend, RedisSettings, Unreachable};
use tower::{BoxError, ServiceBuilder};

const REPLICAS: u32 = 3;
const REQUESTS_EACH: usize = 10;

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, BufferedBody<Full<Bytes>>>;

/// A `redis-server` this example started, stopped when dropped.
struct OwnRedis(Child);

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `REDIS_URL`, or a `redis-server` of our own on a free loopback port.
async fn redis() -> Result<(String, Option<OwnRedis>), BoxError> {
    if let Ok(url) = std::env::var("REDIS_URL") {
        return Ok((url, None));
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|error| {
            format!("redis-server: {error} (set REDIS_URL, or install redis-server)")
        })?;
    let own = OwnRedis(child);
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((format!("redis://127.0.0.1:{port}/"), Some(own)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("redis-server did not start".into())
}

/// Each replica's stack: its own `Limits` on `limiter`, told the whole quota.
fn stack<L: Backend>(limiter: L) -> TogetherService<Http, TogetherClassifier, L> {
    let limits = Limits::builder(QuotaTable::together_defaults())
        .backend(limiter)
        .build();
    let client = Client::builder(TokioExecutor::new()).build_http();
    ServiceBuilder::new()
        .layer(TogetherLayer::new(limits))
        .service(client)
}

/// Every replica sends its requests at once, against a simulator of its own run; returns the
/// requests the callers got answered, and the server's 429s.
async fn run<L: Backend>(label: &str, replicas: Vec<L>) -> Result<(usize, u64), BoxError> {
    let sim = simulator(600, SimConfig::default()).await?;
    println!("{label}:");
    let runs: Vec<_> = replicas
        .into_iter()
        .map(|limiter| {
            let (stack, url) = (stack(limiter), sim.url());
            tokio::spawn(async move {
                send_chat_requests(stack, &url, "shared-key", REQUESTS_EACH, || {
                    Full::new(Bytes::from(chat_body("hello")))
                })
                .await
            })
        })
        .collect();
    let mut answered = 0;
    for (replica, run) in runs.into_iter().enumerate() {
        let tally = run.await?;
        println!(
            "  replica {replica}: {} ok, {} failed, done in {:.1} s",
            tally.ok,
            tally.failed + tally.too_many,
            tally.seconds
        );
        answered += tally.ok;
    }
    let chat = sim.stats().class(Class::Chat);
    println!(
        "  server: {} requests, {} ok, {} answered 429\n",
        chat.requests, chat.ok, chat.rate_limited
    );
    sim.shutdown().await;
    Ok((answered, chat.rate_limited))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let (url, _own_redis) = redis().await?;
    println!("simulated Together: 600 chat requests a minute per key; Redis at {url}\n");

    let mut on_redis = Vec::new();
    for _ in 0..REPLICAS {
        // What each process does at start: connect, and build its limits on Redis. Should
        // Redis stop answering, each decides alone at a third of the quota until it is back.
        let settings = RedisSettings {
            unreachable: Unreachable::FallBack { replicas: REPLICAS },
            ..RedisSettings::default()
        };
        on_redis.push(RedisBackend::connect(&url, settings).await?);
    }
    let (shared_ok, shared_429s) = run("one quota in Redis", on_redis).await?;
    let alone = (0..REPLICAS).map(|_| LocalBackend).collect();
    let (_, alone_429s) = run("each replica with a limiter of its own", alone).await?;

    if shared_ok != REPLICAS as usize * REQUESTS_EACH || shared_429s >= alone_429s {
        return Err("the replicas did not keep to the one quota".into());
    }
    Ok(())
}
