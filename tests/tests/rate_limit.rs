//! `RateLimitLayer` around hyper-util's `Client`, against a server on loopback.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use together_tower::RateLimitLayer;
use together_tower::classify::EndpointClass;
use together_tower::limit::Limits;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower_tests::{LoopbackServer, Seen, http_client, json};
use tower::{ServiceBuilder, ServiceExt};

const OK_BODY: &str = r#"{"object":"chat.completion","choices":[]}"#;
const LIMITED_BODY: &str = r#"{"error":{"message":"rate limited","type":"dynamic_request_limited","param":null,"code":null}}"#;

fn chat_request(base: &str, key: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"m","messages":[]}"#,
        )))
        .unwrap()
}

fn chat_table(rate: Rate) -> QuotaTable {
    QuotaTable::builder()
        .group("chat", GroupQuota::rate(rate))
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap()
}

/// The server's own GCRA: one request per `interval` for each key, with `tolerance` for
/// network jitter; anything faster is answered 429.
fn gcra_verdicts(seen: &[Seen], interval: Duration, tolerance: Duration) -> Vec<bool> {
    let mut next_allowed = std::collections::HashMap::new();
    seen.iter()
        .map(|request| {
            let next = next_allowed
                .entry(request.authorization.clone())
                .or_insert(request.at);
            let allowed = request.at + tolerance >= *next;
            if allowed {
                *next = request.at.max(*next) + interval;
            }
            allowed
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_keys_use_their_whole_quota_and_never_see_a_429() {
    let interval = Duration::from_millis(100);
    let server = LoopbackServer::start(move |request, seen| {
        // Judge this request as the server would, with everything seen before it.
        let mut all = seen.to_vec();
        all.push(Seen {
            at: std::time::Instant::now(),
            path: String::new(),
            authorization: request
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            status: 0,
            body: Bytes::new(),
        });
        let allowed = *gcra_verdicts(&all, interval, interval / 2).last().unwrap();
        match allowed {
            true => json(200, &[], OK_BODY),
            false => json(429, &[("retry-after", "1")], LIMITED_BODY),
        }
    })
    .await
    .unwrap();

    let client = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Limits::new(chat_table(
            Rate::per_second(10),
        ))))
        .service(http_client());
    let calls: Vec<_> = (0..30)
        .map(|i| {
            let key = if i % 2 == 0 { "key-even" } else { "key-odd" };
            tokio::spawn(client.clone().oneshot(chat_request(&server.url(), key)))
        })
        .collect();
    for call in calls {
        let response = call.await.unwrap().unwrap();
        assert_eq!(response.status(), 200);
    }

    let seen = server.seen();
    assert_eq!(seen.len(), 30);
    assert!(
        seen.iter().all(|request| request.status == 200),
        "the server answered 429"
    );
    // Each key sent 15 requests at 10/s.
    for key in ["Bearer key-even", "Bearer key-odd"] {
        let times: Vec<_> = seen
            .iter()
            .filter(|r| r.authorization.as_deref() == Some(key))
            .map(|r| r.at)
            .collect();
        assert_eq!(times.len(), 15);
        // Fourteen intervals after the first, less the pacing tolerance a turn may come early by.
        let least = Duration::from_millis(1_400) - Rate::per_second(10).tolerance();
        assert!(
            times[14] - times[0] >= least,
            "{key} went faster than its quota"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_with_retry_after_holds_back_every_waiter_of_the_bucket() {
    // The first request is refused for one second; the rest are welcome.
    let server = LoopbackServer::start(|_, seen| match seen.len() {
        0 => json(429, &[("retry-after", "1")], LIMITED_BODY),
        _ => json(200, &[], OK_BODY),
    })
    .await
    .unwrap();

    let client = ServiceBuilder::new()
        .layer(RateLimitLayer::new(Limits::new(chat_table(
            Rate::per_second(50),
        ))))
        .service(http_client());
    let calls: Vec<_> = (0..6)
        .map(|_| tokio::spawn(client.clone().oneshot(chat_request(&server.url(), "k"))))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await.unwrap().unwrap().status().as_u16());
    }
    assert_eq!(statuses.iter().filter(|&&status| status == 429).count(), 1);

    let seen = server.seen();
    assert_eq!(seen.len(), 6);
    let refused_at = seen[0].at;
    // The client waits a full second from when it read the 429, which is after the server
    // sent it: nothing may arrive within that second.
    let early: Vec<_> = seen[1..]
        .iter()
        .filter(|request| request.at < refused_at + Duration::from_secs(1))
        .collect();
    assert!(
        early.is_empty(),
        "{} requests arrived while the bucket was closed",
        early.len()
    );
}
