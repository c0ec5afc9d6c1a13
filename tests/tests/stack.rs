//! The whole stack (body buffer, retry, rate limit) around hyper-util's `Client`, against the
//! simulator on loopback.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use together_sim::{Algorithm, Class, ClassLimits, Faults, Hints, Sim, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::limit::{Adaptation, Limits};
use together_tower::quota::QuotaTable;
use together_tower::{ServiceBuilderExt, TogetherLayer};
use together_tower_tests::{JITTER_ALLOWANCE_MS, chat_request, http_client};
use tower::{Layer, ServiceBuilder, ServiceExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_is_waited_out_and_the_same_request_sent_again() {
    // One chat request a second, in fixed windows, with Retry-After on each 429 and no other
    // hint. The client believes in 600 a minute, so its second request is refused and must be
    // retried.
    let sim = Sim::start(SimConfig {
        algorithm: Algorithm::FixedWindow,
        hints: Hints::RetryAfter,
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(60))]),
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let together = ServiceBuilder::new()
        .together(Limits::default())
        .service(http_client());
    let first = together
        .clone()
        .oneshot(chat_request(&sim.url(), "tgp_v1_loopback-test-key"));
    let second = together.oneshot(chat_request(&sim.url(), "tgp_v1_loopback-test-key"));
    let (first, second) = tokio::join!(first, second);
    for response in [first.unwrap(), second.unwrap()] {
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(reply["object"], "chat.completion");
    }

    // The refused request was sent again whole: the server parsed it and answered 200.
    let chat = sim.stats().class(Class::Chat);
    assert_eq!((chat.ok, chat.rate_limited, chat.other_errors), (2, 1, 0));
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_stacks_built_from_one_handle_share_one_quota() {
    // 10 chat requests a second per key, strictly paced. Two stacks, each on a client of its
    // own, send 10 requests each with the same key, at once. Sharing the handle, they go out at
    // 10 a second between them; with a quota each, they would go at 20 and meet 429s. The
    // server gives no hints and the rates do not adapt, so only the sharing can keep the
    // server's 429s away.
    let sim = Sim::start(SimConfig {
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(600))]),
        hints: Hints::None,
        gcra_tolerance_ms: JITTER_ALLOWANCE_MS,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let limits = Limits::builder(QuotaTable::together_defaults())
        .adaptation(Adaptation::fixed())
        .build();
    let first = ServiceBuilder::new()
        .together(limits.clone())
        .service(http_client());
    let second =
        TogetherLayer::new(limits.clone()).layer(http_client::<BufferedBody<Full<Bytes>>>());
    let send = |stack: &_, request: Request<Full<Bytes>>| {
        tokio::spawn(ServiceExt::oneshot(Clone::clone(stack), request))
    };
    let mut calls = Vec::new();
    for _ in 0..10 {
        calls.push(send(&first, chat_request(&sim.url(), "shared-key")));
        calls.push(send(&second, chat_request(&sim.url(), "shared-key")));
    }
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }

    let chat = sim.stats().class(Class::Chat);
    assert_eq!((chat.ok, chat.rate_limited), (20, 0), "{chat:?}");
    assert_eq!(limits.snapshot().len(), 1, "one bucket for the key");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_create_answered_503_is_not_sent_again_but_a_chat_is() {
    let sim = Sim::start(SimConfig {
        faults: Faults {
            unavailable_rate: 1.0,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let together = ServiceBuilder::new()
        .together(Limits::new(QuotaTable::unlimited()))
        .service(http_client());
    let create = Request::post(format!("{}/v1/fine-tunes", sim.url()))
        .header("authorization", "Bearer k")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","training_file":"file-1"}"#,
        )))
        .unwrap();
    let response = together.clone().oneshot(create).await.unwrap();
    assert_eq!(response.status(), 503);
    let chat = together
        .oneshot(chat_request(&sim.url(), "k"))
        .await
        .unwrap();
    assert_eq!(chat.status(), 503);

    let stats = sim.stats();
    // The server may have created the job before it failed: sending it again could pay twice.
    assert_eq!(stats.class(Class::FineTunes).unavailable, 1);
    // A chat is safe to repeat: the first send and the default four retries.
    assert_eq!(stats.class(Class::Chat).unavailable, 5);
    sim.shutdown().await;
}
