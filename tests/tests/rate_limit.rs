//! `RateLimitLayer` around hyper-util's `Client`, against the simulator on loopback.

use std::collections::BTreeMap;

use together_sim::{Algorithm, Class, ClassLimits, Hints, Sim, SimConfig, key_label};
use together_tower::classify::EndpointClass;
use together_tower::limit::{Adaptation, Limits, RateLimitLayer};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_tests::{JITTER_ALLOWANCE_MS, chat_request, http_client};
use tower::{ServiceBuilder, ServiceExt};

fn chat_table(rate: Rate) -> QuotaTable {
    QuotaTable::builder()
        .group("chat", GroupQuota::rate(rate))
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap()
}

/// The simulator with chat at `rpm` per key, enforced by `algorithm` over one second, and
/// saying so with `hints`.
async fn simulator(rpm: u64, algorithm: Algorithm, hints: Hints) -> together_sim::SimHandle {
    Sim::start(SimConfig {
        algorithm,
        hints,
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(rpm))]),
        gcra_tolerance_ms: JITTER_ALLOWANCE_MS,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_use_their_whole_quota_and_never_see_a_429() {
    // 10 a second per key, by GCRA with a burst of one: the strictest pacing there is.
    let sim = simulator(600, Algorithm::Gcra, Hints::All).await;
    let client = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Limits::new(chat_table(
            Rate::per_second(10),
        ))))
        .service(http_client());
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let key = if i % 2 == 0 { "key-even" } else { "key-odd" };
            tokio::spawn(client.clone().oneshot(chat_request(&sim.url(), key)))
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }

    let stats = sim.stats();
    for key in ["key-even", "key-odd"] {
        let chat = stats.keys[&key_label(key)]["chat"];
        assert_eq!((chat.ok, chat.rate_limited), (15, 0), "{key}: {chat:?}");
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_holds_back_every_waiter_of_the_bucket_until_the_window_turns() {
    // The server allows one request a second, in fixed windows, and says only, on a 429, when
    // the next window starts (`Retry-After`). The client believes in 50 a second and does not
    // adapt its rate, so only that word holds it back. Six requests at once, with no retries.
    let sim = simulator(60, Algorithm::FixedWindow, Hints::RetryAfter).await;
    let limits = Limits::builder(chat_table(Rate::per_second(50)))
        .adaptation(Adaptation::fixed())
        .build();
    let client = ServiceBuilder::new()
        .layer(RateLimitLayer::new(limits))
        .service(http_client());
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(client.clone().oneshot(chat_request(&sim.url(), "k"))))
        .collect();
    let mut refused = 0;
    for call in calls {
        refused += usize::from(call.await.unwrap().unwrap().status() == 429);
    }

    // Each window lets one request in and refuses the next, 20 ms behind it, which closes the
    // bucket until the window turns. Had the 429 held back only the request that met it, the
    // other four would have followed at 50 a second into the same closed window.
    let chat = sim.stats().class(Class::Chat);
    assert_eq!((chat.ok, chat.rate_limited), (3, 3), "{chat:?}");
    assert_eq!(refused, 3);
    sim.shutdown().await;
}
