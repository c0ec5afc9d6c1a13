//! An audit of the turns Redis grants: several processes reserve, cancel, and change their
//! rate at random, and no two turns that went are ever closer than the faster interval.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::RedisServer;
use together_tower::key::ApiKeyId;
use together_tower::limit::{Backend, BucketSpec, Cost, Decision, Pace, Rates};
use together_tower_redis::{RedisBackend, RedisSettings, Unreachable};

const ONE: Cost = Cost {
    requests: 1,
    tokens: 0,
};

/// Microseconds since the epoch: the clock Redis's `TIME` reads on this machine.
fn micros_now() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_micros()).unwrap()
}

fn every(millis: u64) -> Rates {
    Rates {
        requests: Some(Pace::new(Duration::from_millis(millis), Duration::ZERO)),
        tokens: None,
    }
}

/// A turn that went: the earliest and the latest it can have been, in microseconds.
type Sent = (u64, u64);

/// One process: asks for turns, gives some up before their time, and now and then moves its
/// rate between 50 and 40 ms intervals, as a controller cutting and recovering does.
async fn process(limiter: RedisBackend, seed: u64, sent: Arc<Mutex<Vec<Sent>>>) {
    let mut random = fastrand::Rng::with_seed(seed);
    let bucket = limiter.bucket(BucketSpec::new(
        ApiKeyId::ANONYMOUS,
        "chat",
        None,
        every(50),
    ));
    let max_wait = Duration::from_millis(400);
    for _ in 0..20 {
        if random.u8(..) < 64 {
            let interval = if random.bool() { 50 } else { 40 };
            limiter.set_rates(&bucket, every(interval), Duration::ZERO);
        }
        let before = micros_now();
        let decision = limiter
            .acquire(&bucket, ONE, Duration::ZERO, max_wait)
            .await
            .unwrap();
        let after = micros_now();
        let wait = match decision {
            Decision::Allow => Duration::ZERO,
            Decision::Reserved(wait) => wait,
            Decision::Wait(wait) => {
                tokio::time::sleep(wait).await;
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        let wait = u64::try_from(wait.as_micros()).unwrap();
        if random.u8(..) < 48 {
            // Given up before its time: it never goes.
            tokio::time::sleep(Duration::from_micros(wait / 2)).await;
            limiter.release(&bucket, ONE, Duration::ZERO);
            continue;
        }
        tokio::time::sleep(Duration::from_micros(wait)).await;
        sent.lock().unwrap().push((before + wait, after + wait));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_two_turns_that_went_are_closer_than_the_faster_interval() {
    let redis = RedisServer::start().await;
    let sent = Arc::new(Mutex::new(Vec::new()));
    let mut processes = Vec::new();
    for seed in 0..4 {
        let settings = RedisSettings {
            unreachable: Unreachable::Fail,
            ..RedisSettings::default()
        };
        let limiter = RedisBackend::connect(&redis.url(), settings).await.unwrap();
        processes.push(tokio::spawn(process(limiter, seed, Arc::clone(&sent))));
    }
    for process in processes {
        process.await.unwrap();
    }
    let mut sent = sent.lock().unwrap().clone();
    sent.sort_unstable();
    assert!(sent.len() > 40, "{} turns went", sent.len());
    for pair in sent.windows(2) {
        let ((earliest_first, _), (_, latest_second)) = (pair[0], pair[1]);
        // Even if the first was granted as early and the second as late as the calls allow,
        // they are an interval apart (40 ms at the faster rate), less a millisecond for
        // Redis's reading of the clock within the call.
        let widest = latest_second.saturating_sub(earliest_first);
        assert!(
            widest + 1_000 >= 40_000,
            "turns {widest} µs apart at most: {pair:?}"
        );
    }
}
