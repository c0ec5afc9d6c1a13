//! Decisions per second of one process against a Redis, with 1 and with 64 concurrent callers,
//! and Redis's own CPU per decision (from `INFO commandstats`).
//!
//! ```text
//! redis-server --port 6390 --save "" &
//! cargo run --release -p together-tower-redis --example decisions -- redis://127.0.0.1:6390/
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use together_tower::key::ApiKeyId;
use together_tower::limit::{Backend, BucketSpec, Cost, Pace, Rates};
use together_tower_redis::{RedisBackend, RedisSettings, Unreachable};

const RUN: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let settings = RedisSettings {
        unreachable: Unreachable::Fail,
        ..RedisSettings::default()
    };
    let limiter = RedisBackend::connect(&url, settings).await?;
    // A quota that never binds: every decision is a full script run that allows.
    let rates = Rates {
        requests: Some(Pace::new(
            Duration::from_micros(1),
            Duration::from_secs(3_600),
        )),
        tokens: None,
    };
    let bucket =
        Arc::new(limiter.bucket(BucketSpec::new(ApiKeyId::ANONYMOUS, "bench", None, rates)));
    let cost = Cost {
        requests: 1,
        tokens: 0,
    };
    println!(
        "{:>8} {:>14} {:>22}",
        "callers", "decisions/s", "redis CPU/decision"
    );
    for callers in [1, 64] {
        let before = evalsha_stats(&url).await?;
        let done = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let tasks: Vec<_> = (0..callers)
            .map(|_| {
                let (limiter, bucket, done) =
                    (limiter.clone(), Arc::clone(&bucket), Arc::clone(&done));
                tokio::spawn(async move {
                    while started.elapsed() < RUN {
                        limiter
                            .acquire(&bucket, cost, Duration::ZERO, Duration::ZERO)
                            .await
                            .expect("a decision");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let after = evalsha_stats(&url).await?;
        let decisions = done.load(Ordering::Relaxed);
        let calls = (after.0 - before.0).max(1);
        println!(
            "{callers:>8} {:>14.0} {:>19.2} µs",
            decisions as f64 / seconds,
            (after.1 - before.1) as f64 / calls as f64
        );
    }
    Ok(())
}

/// `EVALSHA` calls and the microseconds Redis spent in them, so far.
async fn evalsha_stats(url: &str) -> Result<(u64, u64), Box<dyn std::error::Error>> {
    let client = redis::Client::open(url)?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut connection)
        .await?;
    let line = info
        .lines()
        .find(|line| line.starts_with("cmdstat_evalsha:"));
    let field = |name: &str| -> u64 {
        line.and_then(|line| {
            line.split([':', ','])
                .find_map(|part| part.strip_prefix(name)?.parse().ok())
        })
        .unwrap_or(0)
    };
    Ok((field("calls="), field("usec=")))
}
