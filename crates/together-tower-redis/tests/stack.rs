//! Two stacks with limits of their own, as two processes have, sharing one quota through one
//! Redis, against the simulator on loopback.

mod common;

use std::collections::BTreeMap;

use bytes::Bytes;
use common::RedisServer;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, ClassLimits, Hints, Sim, SimConfig, SimHandle};
use together_tower::body::BufferedBody;
use together_tower::limit::{Adaptation, Backend, Limits, LocalBackend};
use together_tower::quota::QuotaTable;
use together_tower::{ServiceBuilderExt, TogetherService};
use together_tower_redis::{RedisBackend, RedisSettings};
use tower::{ServiceBuilder, ServiceExt};

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, BufferedBody<Full<Bytes>>>;

/// Chat at 600 a minute per key, strictly paced, no hints: only a shared count keeps the
/// 429s away. A request may come 20 ms early, for a loaded machine's scheduling.
async fn simulator() -> SimHandle {
    simulator_at(600, Hints::None).await
}

/// Chat at `rpm` a minute per key, strictly paced, with `hints`.
async fn simulator_at(rpm: u64, hints: Hints) -> SimHandle {
    Sim::start(SimConfig {
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(rpm))]),
        hints,
        gcra_tolerance_ms: 20,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn stack<L: Backend>(
    limiter: L,
) -> TogetherService<Http, together_tower::classify::TogetherClassifier, L> {
    stack_adapting(limiter, Adaptation::fixed())
}

fn stack_adapting<L: Backend>(
    limiter: L,
    adaptation: Adaptation,
) -> TogetherService<Http, together_tower::classify::TogetherClassifier, L> {
    let limits = Limits::builder(QuotaTable::together_defaults())
        .adaptation(adaptation)
        .backend(limiter)
        .build();
    ServiceBuilder::new()
        .together(limits)
        .service(Client::builder(TokioExecutor::new()).build_http())
}

fn chat(sim: &SimHandle) -> Request<Full<Bytes>> {
    let body = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
    Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", "Bearer shared-key")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_one_redis_share_one_quota_and_meet_no_429() {
    let redis = RedisServer::start().await;
    let sim = simulator().await;
    let first = stack(
        RedisBackend::connect(&redis.url(), RedisSettings::default())
            .await
            .unwrap(),
    );
    let second = stack(
        RedisBackend::connect(&redis.url(), RedisSettings::default())
            .await
            .unwrap(),
    );
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(tokio::spawn(first.clone().oneshot(chat(&sim))));
        calls.push(tokio::spawn(second.clone().oneshot(chat(&sim))));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    let chat = sim.stats().class(Class::Chat);
    assert_eq!((chat.ok, chat.rate_limited), (20, 0), "{chat:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_two_processes_without_redis_meet_429s() {
    let sim = simulator().await;
    let first = stack(LocalBackend);
    let second = stack(LocalBackend);
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(tokio::spawn(first.clone().oneshot(chat(&sim))));
        calls.push(tokio::spawn(second.clone().oneshot(chat(&sim))));
    }
    for call in calls {
        call.await.unwrap().unwrap();
    }
    let chat = sim.stats().class(Class::Chat);
    assert!(chat.rate_limited > 0, "{chat:?}");
    sim.shutdown().await;
}

/// Ten chat requests at once through `stack` to `sim`, all answered.
async fn ten_at_once<S>(stack: &S, sim: &SimHandle)
where
    S: tower::Service<Request<Full<Bytes>>> + Clone + Send + 'static,
    S::Future: Send,
    S::Response: Send,
    S::Error: std::fmt::Debug + Send,
{
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(stack.clone().oneshot(chat(sim))))
        .collect();
    for call in calls {
        call.await.unwrap().unwrap();
    }
}

/// One process reads the server's stated limit (half the table's); another, whose server
/// states nothing and enforces that same limit, paces at it from its first request.
async fn what_one_process_learned(share: bool) -> u64 {
    let redis = RedisServer::start().await;
    let namespace = |name: &str| RedisSettings {
        namespace: name.to_owned(),
        ..RedisSettings::default()
    };
    let url = redis.url();
    let connect = |settings| RedisBackend::connect(&url, settings);
    let (learner, other) = if share {
        (namespace("one"), namespace("one"))
    } else {
        (namespace("one"), namespace("two"))
    };
    let learner = stack_adapting(connect(learner).await.unwrap(), Adaptation::adaptive());
    let other = stack_adapting(connect(other).await.unwrap(), Adaptation::adaptive());
    // 300 a minute, stated on every answer (x-ratelimit-limit: 5 a second).
    let stating = simulator_at(300, Hints::Together).await;
    for _ in 0..3 {
        learner.clone().oneshot(chat(&stating)).await.unwrap();
    }
    // The learner publishes its new rate in the background.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let silent = simulator_at(300, Hints::None).await;
    ten_at_once(&other, &silent).await;
    let refused = silent.stats().class(Class::Chat).rate_limited;
    stating.shutdown().await;
    silent.shutdown().await;
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_one_process_learned_paces_the_others() {
    assert_eq!(what_one_process_learned(true).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_it_the_other_process_meets_429s() {
    assert!(what_one_process_learned(false).await > 0);
}

/// Hardening: one answer that reports an absurd `usage` (1e12 tokens, or `u64::MAX`) leaves
/// the shared tokens key owing one token burst at most, so no process is blocked for years.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_usage_leaves_the_shared_tokens_a_burst_of_debt_at_most() {
    let redis = RedisServer::start().await;
    for reported in [1_000_000_000_000, u64::MAX] {
        redis.command(&["FLUSHALL"]).await;
        let ttl_ms = tokens_ttl_after_usage(&redis, reported).await;
        // A burst of debt, and the time to refill the burst after it: two seconds at most.
        assert!(
            (100..=2_000).contains(&ttl_ms),
            "after usage {reported}, the tokens key expires in {ttl_ms} ms"
        );
    }
}

/// Sends one request charged 10 tokens whose answer reports `reported`, and returns the time
/// to live of the bucket's tokens key once the correction has reached Redis.
async fn tokens_ttl_after_usage(redis: &RedisServer, reported: u64) -> i64 {
    use together_tower::classify::EndpointClass;
    use together_tower::limit::{RateLimitLayer, TokenRequest};
    use together_tower::quota::{GroupQuota, Rate};
    use tower::Layer;

    let limiter = RedisBackend::connect(&redis.url(), RedisSettings::default())
        .await
        .unwrap();
    // 1,000 tokens a second, a burst of 1,000: a burst of debt is one second.
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(10))
                .with_tokens(Rate::per_second(1_000).with_burst(1_000)),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    let limits = Limits::builder(table)
        .adaptation(Adaptation::fixed())
        .backend(limiter)
        .token_estimate(|_: &TokenRequest<'_>| 10)
        .build();
    let absurd = tower::service_fn(move |_: Request<String>| async move {
        let body = format!(r#"{{"usage":{{"total_tokens":{reported}}}}}"#);
        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
    });
    let service = RateLimitLayer::new(limits).layer(absurd);
    let request = Request::post("http://together.test/v1/chat/completions")
        .header("authorization", "Bearer shared-key")
        .body(String::new())
        .unwrap();
    let answer = service.oneshot(request).await.unwrap();
    http_body_util::BodyExt::collect(answer.into_body())
        .await
        .unwrap();

    let client = redis::Client::open(redis.url()).unwrap();
    let mut connection = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:tokens")
        .query_async(&mut connection)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    // The correction goes to Redis in the background: wait until the key owes more than the
    // 10 tokens charged before sending (10 ms), then see how much.
    let mut ttl_ms: i64 = 0;
    for _ in 0..100 {
        ttl_ms = redis::cmd("PTTL")
            .arg(&keys[0])
            .query_async(&mut connection)
            .await
            .unwrap();
        if ttl_ms > 100 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    ttl_ms
}
