//! Against a real `redis-server` that the test starts on a free loopback port.

mod common;

use std::time::Duration;

use common::RedisServer;
use together_tower::key::ApiKeyId;
use together_tower::limit::{Backend, BucketSpec, Cost, Decision, Immediate, Pace, Rates};
use together_tower_redis::{RedisBackend, RedisBackendError, RedisSettings, Unreachable};

fn ten_a_second() -> Rates {
    Rates {
        requests: Some(Pace::new(Duration::from_millis(100), Duration::ZERO)),
        tokens: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_on_one_redis_share_one_bucket() {
    let redis = RedisServer::start().await;
    let first = RedisBackend::connect(&redis.url(), RedisSettings::default())
        .await
        .unwrap();
    let second = RedisBackend::connect(&redis.url(), RedisSettings::default())
        .await
        .unwrap();
    let spec = || BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, ten_a_second());
    let (a, b) = (first.bucket(spec()), second.bucket(spec()));
    let one = Cost {
        requests: 1,
        tokens: 0,
    };
    assert_eq!(
        first
            .acquire(&a, one, Duration::ZERO, Duration::ZERO)
            .await
            .unwrap(),
        Decision::Allow
    );
    // The other process sees the turn taken: its request must wait about one interval.
    match second
        .acquire(&b, one, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap()
    {
        Decision::Wait(wait) => assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        ),
        other => panic!("expected a wait, got {other:?}"),
    }
}

const ONE: Cost = Cost {
    requests: 1,
    tokens: 0,
};

type Bucket = <RedisBackend as Backend>::Bucket;

/// One request's decision, reserving nothing.
async fn decide(limiter: &RedisBackend, bucket: &Bucket) -> Decision {
    reserve(limiter, bucket, Duration::ZERO).await
}

/// One request's decision, reserving a turn up to `max_wait` ahead.
async fn reserve(limiter: &RedisBackend, bucket: &Bucket, max_wait: Duration) -> Decision {
    limiter
        .acquire(bucket, ONE, Duration::ZERO, max_wait)
        .await
        .unwrap()
}

fn settings(unreachable: Unreachable) -> RedisSettings {
    RedisSettings {
        call_timeout: Duration::from_millis(200),
        retry_after: Duration::from_millis(300),
        unreachable,
        ..RedisSettings::default()
    }
}

/// A limiter on `redis` with `settings`, and the anonymous key's chat bucket at 10 a second.
async fn chat_bucket(redis: &RedisServer, settings: RedisSettings) -> (RedisBackend, Bucket) {
    let limiter = RedisBackend::connect(&redis.url(), settings).await.unwrap();
    let spec = BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, ten_a_second());
    let bucket = limiter.bucket(spec);
    (limiter, bucket)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_falls_back_within_the_timeout_and_a_restarted_one_is_used_again() {
    let redis = RedisServer::start().await;
    let (limiter, bucket) =
        chat_bucket(&redis, settings(Unreachable::FallBack { replicas: 2 })).await;
    assert_eq!(decide(&limiter, &bucket).await, Decision::Allow);

    let port = redis.stop().await;
    let started = std::time::Instant::now();
    // Decided in this process, at half the quota, with the burst taken as spent (what Redis
    // granted just before is not known here): one interval of the share, 200 ms, first.
    let first = decide(&limiter, &bucket).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(first, Decision::Wait(Duration::from_millis(200)));
    assert!(limiter.is_falling_back());
    let at = Duration::from_millis(200);
    assert_eq!(
        limiter.try_acquire(&bucket, ONE, at),
        Some(Immediate::Allow)
    );
    assert_eq!(
        limiter.try_acquire(&bucket, ONE, at),
        Some(Immediate::Wait(Duration::from_millis(200)))
    );

    // Redis is back: after `retry_after`, decisions go to it again.
    let redis = RedisServer::start_on(port).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut back = false;
    for _ in 0..20 {
        let decision = limiter
            .acquire(&bucket, ONE, Duration::from_secs(10), Duration::ZERO)
            .await;
        if decision.is_ok() && !limiter.is_falling_back() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the limiter did not return to redis");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_fail_policy_a_dead_redis_is_a_typed_error() {
    let redis = RedisServer::start().await;
    let (limiter, bucket) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    redis.stop().await;
    let error = limiter
        .acquire(&bucket, ONE, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(error.is::<RedisBackendError>(), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_script_is_loaded_again() {
    let redis = RedisServer::start().await;
    let (limiter, bucket) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    assert_eq!(decide(&limiter, &bucket).await, Decision::Allow);
    redis.command(&["SCRIPT", "FLUSH"]).await;
    // NOSCRIPT, then the script is loaded again: the bucket's state was kept.
    assert!(matches!(decide(&limiter, &bucket).await, Decision::Wait(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_meets_the_call_timeout() {
    let redis = RedisServer::start().await;
    let (limiter, bucket) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    // Redis busy for a second.
    let sleeper = tokio::spawn({
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let slept: redis::RedisResult<redis::Value> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1")
                .query_async(&mut connection)
                .await;
            // Its own connection may give up first; Redis sleeps either way.
            drop(slept);
        }
    });
    // Long enough for the sleeper to connect and put Redis to sleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    let error = limiter
        .acquire(&bucket, ONE, Duration::ZERO, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "{:?}",
        started.elapsed()
    );
    // The connection's response timeout, or ours: either way, within the call timeout.
    assert!(error.is::<RedisBackendError>(), "{error}");
    sleeper.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_name_the_fingerprint_never_the_key() {
    let redis = RedisServer::start().await;
    let limiter = RedisBackend::connect(&redis.url(), settings(Unreachable::Fail))
        .await
        .unwrap();
    let key = together_tower::key::KeyHasher::new().fingerprint(b"tgp_v1_SecretKeyPart123");
    let bucket = limiter.bucket(BucketSpec::new(key, "chat", Some("m"), ten_a_second()));
    decide(&limiter, &bucket).await;
    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with("together-tower:{") && keys[0].contains(&key.to_string()),
        "{keys:?}"
    );
    assert!(!keys[0].contains("Secret"), "{keys:?}");
}

/// The wait a decision asks for: a reservation's, or a wait's.
fn wait_of(decision: Decision) -> Duration {
    match decision {
        Decision::Reserved(wait)
        | Decision::Wait(wait)
        | Decision::WaitForTokens { tokens: wait, .. } => wait,
        Decision::Allow => Duration::ZERO,
        other => panic!("unexpected {other:?}"),
    }
}

fn about(wait: Duration, millis: u64) -> bool {
    let expected = Duration::from_millis(millis);
    wait <= expected && wait + Duration::from_millis(70) > expected
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_reserve_their_turns_in_the_order_they_asked_across_processes() {
    let redis = RedisServer::start().await;
    let (first, a) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    let (second, b) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    let max_wait = Duration::from_secs(1);
    assert_eq!(reserve(&first, &a, max_wait).await, Decision::Allow);
    // Each waiter's turn is taken now, for the time it is due: it need not ask again.
    let b_turn = reserve(&second, &b, max_wait).await;
    let a_turn = reserve(&first, &a, max_wait).await;
    assert!(matches!(b_turn, Decision::Reserved(_)), "{b_turn:?}");
    assert!(matches!(a_turn, Decision::Reserved(_)), "{a_turn:?}");
    assert!(about(wait_of(b_turn), 100), "{b_turn:?}");
    assert!(about(wait_of(a_turn), 200), "{a_turn:?}");
    // Beyond the max wait nothing is reserved: a plain wait, and the turn stays free.
    let short = Duration::from_millis(250);
    let refused = reserve(&second, &b, short).await;
    assert!(
        matches!(refused, Decision::Wait(wait) if wait > short),
        "{refused:?}"
    );
    let next = reserve(&second, &b, max_wait).await;
    assert!(about(wait_of(next), 300), "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_reservation_comes_back_only_if_no_turn_was_taken_after_it() {
    let redis = RedisServer::start().await;
    let (first, a) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    let (second, b) = chat_bucket(&redis, settings(Unreachable::Fail)).await;
    let max_wait = Duration::from_secs(1);
    reserve(&first, &a, max_wait).await;
    // The last turn taken, given back: the next asker gets the same time.
    let reserved = reserve(&second, &b, max_wait).await;
    assert!(about(wait_of(reserved), 100), "{reserved:?}");
    second.release(&b, ONE, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let again = reserve(&first, &a, max_wait).await;
    assert!(about(wait_of(again), 100), "{again:?}");
    // A turn others reserved after: giving it back would let two go at once, so it is lost.
    let after = reserve(&second, &b, max_wait).await;
    assert!(about(wait_of(after), 200), "{after:?}");
    first.release(&a, ONE, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let last = reserve(&second, &b, max_wait).await;
    assert!(about(wait_of(last), 300), "{last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_one_process_cut_paces_every_process_until_it_is_withdrawn_or_expires() {
    let redis = RedisServer::start().await;
    let settings = RedisSettings {
        rates_ttl: Duration::from_millis(600),
        ..settings(Unreachable::Fail)
    };
    let (first, a) = chat_bucket(&redis, settings.clone()).await;
    let (second, b) = chat_bucket(&redis, settings).await;
    let five_a_second = Rates {
        requests: Some(Pace::new(Duration::from_millis(200), Duration::ZERO)),
        tokens: None,
    };
    // The first process cuts its rate (after a 503, say); the second still has the table's.
    first.set_rates(&a, five_a_second, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let spacing = |decision: Decision| wait_of(decision);
    assert_eq!(decide(&second, &b).await, Decision::Allow);
    let paced = decide(&second, &b).await;
    assert!(about(spacing(paced), 200), "{paced:?}");

    // Back at the table's rate: withdrawn, and the second process paces at 10 a second.
    first.set_rates(&a, ten_a_second(), Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(250)).await;
    decide(&second, &b).await;
    let table = decide(&second, &b).await;
    assert!(about(spacing(table), 100), "{table:?}");

    // Cut again, and the process dies without withdrawing: the cut lasts `rates_ttl` only.
    first.set_rates(&a, five_a_second, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop((first, a));
    tokio::time::sleep(Duration::from_millis(700)).await;
    decide(&second, &b).await;
    let expired = decide(&second, &b).await;
    assert!(about(spacing(expired), 100), "{expired:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_change_keeps_the_used_share_and_hands_out_no_burst() {
    let redis = RedisServer::start().await;
    let limiter = RedisBackend::connect(&redis.url(), settings(Unreachable::Fail))
        .await
        .unwrap();
    // 10 a second with a burst of 5.
    let burst_of_five = |interval: u64| Rates {
        requests: Some(Pace::new(
            Duration::from_millis(interval),
            Duration::from_millis(4 * interval),
        )),
        tokens: None,
    };
    let bucket = limiter.bucket(BucketSpec::new(
        ApiKeyId::ANONYMOUS,
        "chat",
        None,
        burst_of_five(100),
    ));
    for _ in 0..5 {
        let decision = decide(&limiter, &bucket).await;
        assert_eq!(decision, Decision::Allow);
    }
    // Half the rate: the drained bucket stays drained (its debt doubles with the interval),
    // where keeping the arrival time as it was would let three more go at once.
    limiter.set_rates(&bucket, burst_of_five(200), Duration::ZERO);
    let after = decide(&limiter, &bucket).await;
    assert!(about(wait_of(after), 200), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_not_used_come_back_and_tokens_used_beyond_the_estimate_are_charged() {
    let redis = RedisServer::start().await;
    let limiter = RedisBackend::connect(&redis.url(), settings(Unreachable::Fail))
        .await
        .unwrap();
    // 1,000 tokens a second, 100 at once; no request rate.
    let rates = Rates {
        requests: None,
        tokens: Some(Pace::new(
            Duration::from_millis(1),
            Duration::from_millis(99),
        )),
    };
    let bucket = limiter.bucket(BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, rates));
    let tokens = |tokens| Cost {
        requests: 1,
        tokens,
    };
    let decide_tokens = |cost| limiter.acquire(&bucket, cost, Duration::ZERO, Duration::ZERO);
    assert_eq!(decide_tokens(tokens(100)).await.unwrap(), Decision::Allow);
    assert!(matches!(
        decide_tokens(tokens(50)).await.unwrap(),
        Decision::WaitForTokens { .. } | Decision::Wait(_)
    ));
    // Charged 100, used 20: 80 come back, and 50 fit at once.
    limiter.correct_tokens(&bucket, 100, 20, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(decide_tokens(tokens(50)).await.unwrap(), Decision::Allow);
    // Charged 10, used 200: 190 more are owed (190 ms at this rate, less the 99 of slack),
    // so even one token waits.
    limiter.correct_tokens(&bucket, 10, 200, Duration::ZERO);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let owed = decide_tokens(tokens(1)).await.unwrap();
    assert!(wait_of(owed) > Duration::from_millis(100), "{owed:?}");
    // More than the bucket ever holds.
    assert_eq!(
        decide_tokens(tokens(101)).await.unwrap(),
        Decision::TooLarge
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faster_rate_never_puts_a_turn_closer_to_a_reserved_one_than_its_interval() {
    let redis = RedisServer::start().await;
    let slow = Rates {
        requests: Some(Pace::new(Duration::from_millis(200), Duration::ZERO)),
        tokens: None,
    };
    let limiter = RedisBackend::connect(&redis.url(), settings(Unreachable::Fail))
        .await
        .unwrap();
    let bucket = limiter.bucket(BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, slow));
    let max_wait = Duration::from_secs(1);
    assert_eq!(decide(&limiter, &bucket).await, Decision::Allow);
    // A turn reserved 200 ms ahead, then the rate doubles (a recovery after a cut).
    let reserved = reserve(&limiter, &bucket, max_wait).await;
    assert!(about(wait_of(reserved), 200), "{reserved:?}");
    limiter.set_rates(&bucket, ten_a_second(), Duration::ZERO);
    // The next turn is at least one new interval after the reserved one, not 100 ms after
    // the start as a shrunk debt would have it.
    let next = reserve(&limiter, &bucket, max_wait).await;
    assert!(
        wait_of(next) >= wait_of(reserved) + Duration::from_millis(90),
        "{next:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_taken_in_this_process_goes_back_here_never_to_redis() {
    let redis = RedisServer::start().await;
    let limiter = RedisBackend::connect(
        &redis.url(),
        settings(Unreachable::FallBack { replicas: 2 }),
    )
    .await
    .unwrap();
    // One turn every 10 s, so a turn wrongly given back to Redis shows.
    let slow = Rates {
        requests: Some(Pace::new(Duration::from_secs(10), Duration::ZERO)),
        tokens: None,
    };
    let bucket = limiter.bucket(BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, slow));
    let other = limiter.bucket(BucketSpec::new(
        ApiKeyId::ANONYMOUS,
        "embeddings",
        None,
        slow,
    ));
    // A turn in Redis, used.
    assert_eq!(decide(&limiter, &bucket).await, Decision::Allow);
    // Redis asleep for a second: it keeps its state, but does not answer in time.
    let sleeper = tokio::spawn({
        let url = redis.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut connection = client.get_multiplexed_async_connection().await.unwrap();
            let _: redis::RedisResult<redis::Value> = redis::cmd("DEBUG")
                .arg("SLEEP")
                .arg("1")
                .query_async(&mut connection)
                .await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Another bucket finds Redis unreachable; this one decides in this process from then on.
    decide(&limiter, &other).await;
    assert!(limiter.is_falling_back());
    // A turn taken here (its first decision finds the burst spent; one interval of its share
    // later, it goes), and not used.
    assert!(matches!(
        limiter.try_acquire(&bucket, ONE, Duration::from_secs(20)),
        Some(Immediate::Wait(_))
    ));
    let later = Duration::from_secs(40);
    assert_eq!(
        limiter.try_acquire(&bucket, ONE, later),
        Some(Immediate::Allow)
    );
    sleeper.await.unwrap();
    // Redis answers again (the other bucket's decisions go there). Up to five seconds: on a
    // loaded two-core machine the reconnection after the sleep can take more than two.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        decide(&limiter, &other).await;
        if !limiter.is_falling_back() {
            break;
        }
    }
    limiter.release(&bucket, ONE, later);
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Redis still holds the turn used before the outage. Asked until Redis decides: on a
    // loaded machine one call can pass the 200 ms timeout and be decided here instead.
    let mut next = decide(&limiter, &bucket).await;
    for _ in 0..50 {
        if !limiter.is_falling_back() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        next = decide(&limiter, &bucket).await;
    }
    assert!(!limiter.is_falling_back());
    assert!(
        matches!(next, Decision::Wait(wait) if wait > Duration::from_secs(8)),
        "{next:?}"
    );
}
