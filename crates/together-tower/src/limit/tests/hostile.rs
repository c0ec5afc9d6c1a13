//! Hostile callers and servers: model names of any length and in any number, limits stated on
//! every answer.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tower::Layer;

use super::{Arrivals, CHAT, recorder, request};
use crate::body::RequestMeta;
use crate::classify::EndpointClass;
use crate::harness::send_one;
use crate::limit::error::TooManyBuckets;
use crate::limit::{Limits, RateLimitLayer};
use crate::quota::{GroupQuota, QuotaTable, Rate};

/// Chat at 1,000 a second, one bucket per (key, model), adaptive (the default).
fn per_model(max_buckets: usize) -> Limits {
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(1_000)).per_model(true),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table).max_buckets(max_buckets).build()
}

fn naming(key: &str, model: &str) -> Request<String> {
    let mut request = request(CHAT, key, "x");
    request.extensions_mut().insert(RequestMeta {
        model: Some(Arc::from(model)),
        ..RequestMeta::default()
    });
    request
}

#[tokio::test(start_paused = true)]
async fn a_bucket_keeps_a_bounded_model_name() {
    let limits = per_model(64);
    let mut service =
        RateLimitLayer::new(limits.clone()).layer(recorder(Arrivals::new(), super::ok));
    let huge = "m".repeat(256 * 1024);
    send_one(&mut service, naming("k", &huge)).await.unwrap();
    let snapshot = limits.snapshot();
    let kept = snapshot[0].model.as_deref().unwrap();
    assert!(kept.len() <= 128, "the bucket keeps {} bytes", kept.len());
    assert!(kept.starts_with("mmmm"));
}

#[tokio::test(start_paused = true)]
async fn a_model_name_flood_with_stated_limits_never_locks_new_keys_out() {
    // Every answer states the limit, the table's own, as Together's answers do.
    let stated = |_: usize| {
        let mut response = Response::new(String::new());
        response
            .headers_mut()
            .insert("x-ratelimit-limit", "1000".parse().unwrap());
        response
    };
    // A bucket is back at rest a millisecond after its request: without the headers, a map
    // of 64 never fills.
    let mut service = RateLimitLayer::new(per_model(64)).layer(recorder(Arrivals::new(), stated));
    let mut locked_out = 0;
    // A new model name every two milliseconds, each asked twice (two readings of the limit
    // are what it takes to learn it); every tenth request, a new key.
    for i in 0..3_000 {
        let request = if i % 10 == 0 {
            naming(
                &format!("tenant-{i}"),
                "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            )
        } else {
            naming("flooder", &format!("model-{}", i / 2))
        };
        let answer = send_one(&mut service, request).await;
        if i % 10 == 0 {
            match answer {
                Ok(_) => {}
                Err(error) if error.is::<TooManyBuckets>() => locked_out += 1,
                Err(error) => panic!("{error}"),
            }
        }
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    assert_eq!(locked_out, 0, "new keys refused TooManyBuckets");
}
