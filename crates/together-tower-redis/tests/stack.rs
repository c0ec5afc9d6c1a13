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
use together_tower::limit::{Adaptation, Limiter, Limits, LocalLimiter};
use together_tower::quota::QuotaTable;
use together_tower::{ServiceBuilderExt, TogetherService};
use together_tower_redis::{RedisLimiter, RedisSettings};
use tower::{ServiceBuilder, ServiceExt};

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, BufferedBody<Full<Bytes>>>;

/// Chat at 600 a minute per key, strictly paced, no hints: only a shared count keeps the
/// 429s away. A request may come 20 ms early, for a loaded machine's scheduling.
async fn simulator() -> SimHandle {
    Sim::start(SimConfig {
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(600))]),
        hints: Hints::None,
        gcra_tolerance_ms: 20,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn stack<L: Limiter>(
    limiter: L,
) -> TogetherService<Http, together_tower::classify::TogetherClassifier, L> {
    let limits = Limits::builder(QuotaTable::together_defaults())
        .adaptation(Adaptation::fixed())
        .limiter(limiter)
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
        RedisLimiter::connect(&redis.url(), RedisSettings::default())
            .await
            .unwrap(),
    );
    let second = stack(
        RedisLimiter::connect(&redis.url(), RedisSettings::default())
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
    let first = stack(LocalLimiter);
    let second = stack(LocalLimiter);
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
