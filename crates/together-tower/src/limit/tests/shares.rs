//! Priorities and fair shares: the order of a bucket's waiters when its turns are scarce.

use std::time::Duration;

use http::Request;
use tower::Layer;

use crate::harness::send_all;
use crate::limit::error::RateLimited;
use crate::limit::{Priority, RateLimitLayer, Tenant};
use crate::quota::Rate;

use super::*;

/// A chat request labelled `label`, for `tenant` at `priority`.
fn for_whom(tenant: &str, priority: Priority, label: String) -> Request<String> {
    let mut request = request(CHAT, "k", label);
    request.extensions_mut().insert(Tenant::new(tenant));
    request.extensions_mut().insert(priority);
    request
}

/// `count` requests of `tenant`, labelled by the tenant's name.
fn flood(tenant: &str, priority: Priority, count: usize) -> Vec<Request<String>> {
    (0..count)
        .map(|_| for_whom(tenant, priority, tenant.to_owned()))
        .collect()
}

/// How many of `results` are refusals of type `E`.
fn refused_with<E: std::error::Error + 'static, B>(
    results: &[Result<http::Response<B>, tower::BoxError>],
) -> usize {
    results
        .iter()
        .filter(|result| {
            result
                .as_ref()
                .is_err_and(|error| error.downcast_ref::<E>().is_some())
        })
        .count()
}

/// How many of `labels` are `label`.
fn count(labels: &[String], label: &str) -> usize {
    labels.iter().filter(|seen| *seen == label).count()
}

#[tokio::test(start_paused = true)]
async fn three_flooding_tenants_weighted_1_1_2_get_a_quarter_a_quarter_and_a_half() {
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .tenant_weight("c", 2)
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    // Each tenant's flood arrives whole before the next: the order is not the arrival's.
    let mut requests = flood("a", Priority::Normal, 40);
    requests.extend(flood("b", Priority::Normal, 40));
    requests.extend(flood("c", Priority::Normal, 80));
    let results = send_all(&service, requests).await;
    assert!(results.iter().all(Result::is_ok));
    let labels = arrivals.labels();
    // While all three wait (the first 120 turns), every round of four turns is a, b, c, c
    // in some order, to within one turn.
    for (round, turns) in labels[..120].chunks(4).enumerate().skip(1) {
        let counts = [count(turns, "a"), count(turns, "b"), count(turns, "c")];
        assert!(
            counts[0].abs_diff(1) <= 1 && counts[1].abs_diff(1) <= 1 && counts[2].abs_diff(2) <= 1,
            "round {round}: {counts:?}"
        );
    }
    let shares = [
        count(&labels[..120], "a"),
        count(&labels[..120], "b"),
        count(&labels[..120], "c"),
    ];
    assert!(
        shares[0].abs_diff(30) <= 1 && shares[1].abs_diff(30) <= 1,
        "{shares:?}"
    );
    assert!(shares[2].abs_diff(60) <= 1, "{shares:?}");
    // No burst from any of it: one turn every 100 ms.
    let expected: Vec<u128> = (0..160).map(|turn| turn * 100).collect();
    assert_eq!(arrivals.times_ms(), expected);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_that_joins_late_gets_its_share_within_two_turns() {
    let arrivals = Arrivals::new();
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
        .layer(recorder(arrivals.clone(), ok));
    let mut requests = flood("a", Priority::Normal, 60);
    requests.extend(flood("b", Priority::Normal, 60));
    let early = {
        let service = service.clone();
        tokio::spawn(async move { send_all(&service, requests).await })
    };
    // Two seconds in, a and b have 100 requests still waiting between them.
    tokio::time::sleep(Duration::from_millis(2_050)).await;
    let late = send_all(&service, flood("c", Priority::Normal, 10)).await;
    assert!(late.iter().all(Result::is_ok));
    assert!(early.await.unwrap().iter().all(Result::is_ok));
    let seen = arrivals.seen.lock().unwrap().clone();
    let first_c = seen
        .iter()
        .position(|(_, label)| label == "c")
        .expect("c was served");
    // c joined between turns 20 and 21: its first request goes at one of the next two.
    assert!(first_c <= 22, "c's first turn was turn {first_c}");
    // Then it gets a third of the turns, not what is left after a's and b's backlog.
    let labels: Vec<String> = seen[first_c..first_c + 27]
        .iter()
        .map(|(_, label)| label.clone())
        .collect();
    assert!(count(&labels, "c").abs_diff(9) <= 1, "{labels:?}");
}

#[tokio::test(start_paused = true)]
async fn background_keeps_its_minimum_share_under_a_flood_of_interactive() {
    let arrivals = Arrivals::new();
    let service = RateLimitLayer::new(static_limits(table(Rate::per_second(10))).build())
        .layer(recorder(arrivals.clone(), ok));
    let mut requests = flood("batch", Priority::Background, 50);
    requests.extend(flood("chat", Priority::Interactive, 100));
    send_all(&service, requests).await;
    let labels = arrivals.labels();
    // The first turn went before anyone waited; then interactive goes, but one turn in ten
    // is background's, the default minimum share.
    let background = count(&labels[1..101], "batch");
    assert!((9..=10).contains(&background), "{background} of 100 turns");
    // Once interactive is done (100 turns and its tenth for background), background has the
    // bucket to itself.
    let last_interactive = labels.iter().rposition(|label| label == "chat").unwrap();
    assert!(
        last_interactive <= 112,
        "interactive done at turn {last_interactive}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_interactive_request_behind_a_thousand_background_waiters_goes_at_the_next_turn() {
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .max_queue(2_000)
        .max_wait(Duration::from_secs(1_000))
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    let batch = {
        let service = service.clone();
        let requests = flood("batch", Priority::Background, 1_000);
        tokio::spawn(async move { send_all(&service, requests).await })
    };
    tokio::time::sleep(Duration::from_millis(1_050)).await;
    let sent = arrivals.start.elapsed();
    let urgent = send_all(&service, flood("chat", Priority::Interactive, 1)).await;
    assert!(urgent[0].is_ok());
    let seen = arrivals.seen.lock().unwrap().clone();
    let (at, _) = seen
        .iter()
        .find(|(_, label)| label == "chat")
        .expect("served");
    assert_eq!(
        (*at - sent).as_millis(),
        50,
        "at the next turn, 1.1 s in: the background request whose turn it was waits one more"
    );
    batch.abort();
}

#[tokio::test(start_paused = true)]
async fn each_priority_may_have_its_own_max_wait() {
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .priority_max_wait(Priority::Interactive, Duration::from_millis(250))
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    // Ten interactive requests queue: the fourth would wait 300 ms, over its priority's 250.
    let results = send_all(&service, flood("chat", Priority::Interactive, 10)).await;
    let refused = refused_with::<RateLimited, _>(&results);
    assert_eq!(refused, 7, "three within 250 ms, the first at once");
    // The same wait is fine for a normal request, under the limits' 30 s.
    let results = send_all(&service, flood("batch", Priority::Normal, 10)).await;
    assert!(results.iter().all(Result::is_ok));
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_counts_the_waiters_by_priority_and_tenant() {
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(1))).build();
    let service = RateLimitLayer::new(limits.clone()).layer(recorder(arrivals.clone(), ok));
    let mut requests = flood("a", Priority::Background, 3);
    requests.extend(flood("b", Priority::Interactive, 2));
    requests.push(request(CHAT, "k", "nobody".to_owned()));
    let calls = tokio::spawn(async move { send_all(&service, requests).await });
    tokio::time::sleep(Duration::from_millis(10)).await;
    let snapshot = limits.snapshot().pop().expect("one bucket");
    // The first background request went at once.
    assert_eq!(snapshot.waiting, 5);
    assert_eq!(
        snapshot.waiting_by_priority,
        [
            (Priority::Interactive, 2),
            (Priority::Normal, 1),
            (Priority::Background, 2)
        ]
    );
    let mut by_tenant = snapshot.waiting_by_tenant;
    by_tenant.sort();
    assert_eq!(by_tenant, [("a".to_owned(), 2), ("b".to_owned(), 2)]);
    assert!(calls.await.unwrap().iter().all(Result::is_ok));
}

#[tokio::test(start_paused = true)]
async fn tenants_and_priorities_may_be_read_from_headers() {
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .tenant_from(|headers| {
            let team = headers.get("x-team")?.to_str().ok()?;
            Some(Tenant::new(team))
        })
        .priority_from(|headers| {
            headers
                .contains_key("x-urgent")
                .then_some(Priority::Interactive)
        })
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    let team = |name: &str, urgent: bool| {
        let mut request = request(CHAT, "k", name.to_owned());
        request
            .headers_mut()
            .insert("x-team", name.parse().unwrap());
        if urgent {
            request
                .headers_mut()
                .insert("x-urgent", "1".parse().unwrap());
        }
        request
    };
    let mut requests: Vec<_> = (0..20).map(|_| team("a", false)).collect();
    requests.extend((0..20).map(|_| team("b", false)));
    requests.push(team("c", true));
    send_all(&service, requests).await;
    let labels = arrivals.labels();
    // The urgent one goes at the first turn after the one that went at once; then a and b
    // take turns.
    assert_eq!(labels[1], "c");
    assert_eq!(count(&labels[2..22], "a"), 10, "{labels:?}");
}

#[tokio::test(start_paused = true)]
async fn one_tenant_cannot_fill_the_queue_for_all() {
    use crate::limit::error::QueueFull;
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .max_queue_per_tenant(5)
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    let mut requests = flood("flood", Priority::Normal, 20);
    requests.extend(flood("quiet", Priority::Normal, 3));
    let results = send_all(&service, requests).await;
    let full = refused_with::<QueueFull, _>(&results);
    // One went at once and five waited; the other fourteen were refused, and the quiet
    // tenant's three all had room.
    assert_eq!(full, 14);
    assert_eq!(count(&arrivals.labels(), "quiet"), 3);
}

#[tokio::test(start_paused = true)]
async fn a_capped_tenant_never_takes_more_than_its_cap_even_alone() {
    use crate::limit::TenantCap;
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .tenant_cap("small", TenantCap::Rate(Rate::per_second(2)))
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    let results = send_all(&service, flood("small", Priority::Normal, 5)).await;
    assert!(results.iter().all(Result::is_ok));
    // Two a second, though the bucket has room for ten.
    assert_eq!(arrivals.times_ms(), [0, 500, 1_000, 1_500, 2_000]);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_capped_at_a_share_leaves_the_rest_to_the_others_without_holding_them_up() {
    use crate::limit::TenantCap;
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .tenant_cap("capped", TenantCap::Share(0.25))
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    let mut requests = flood("capped", Priority::Normal, 40);
    requests.extend(flood("free", Priority::Normal, 60));
    let results = send_all(&service, requests).await;
    assert!(results.iter().all(Result::is_ok));
    let labels = arrivals.labels();
    // While both wait (the first 60 turns), the capped tenant has a quarter at most.
    let capped = count(&labels[..60], "capped");
    assert!((14..=16).contains(&capped), "{capped} of 60");
    // And the bucket never idles for it while the other tenant waits.
    let times = arrivals.times_ms();
    assert!(
        times[..60].windows(2).all(|pair| pair[1] - pair[0] == 100),
        "{times:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_capped_request_that_would_wait_too_long_is_refused_and_one_dropped_gives_its_turn_back()
{
    use crate::limit::TenantCap;
    let arrivals = Arrivals::new();
    let limits = static_limits(table(Rate::per_second(10)))
        .tenant_cap("small", TenantCap::Rate(Rate::per_second(1)))
        .max_wait(Duration::from_millis(1_500))
        .build();
    let service = RateLimitLayer::new(limits).layer(recorder(arrivals.clone(), ok));
    // At 0 s, 1 s, then 2 s would be past its 1.5 s.
    let results = send_all(&service, flood("small", Priority::Normal, 3)).await;
    let refused = refused_with::<RateLimited, _>(&results);
    assert_eq!(refused, 1);
    // A request that gives up while it waits for its cap's turn gives the turn back.
    tokio::time::sleep(Duration::from_secs(5)).await;
    send_all(&service, flood("small", Priority::Normal, 1)).await;
    let mut request = flood("small", Priority::Normal, 1);
    let waiting = tokio::spawn(tower::ServiceExt::oneshot(
        service.clone(),
        request.remove(0),
    ));
    tokio::time::sleep(Duration::from_millis(100)).await;
    waiting.abort();
    assert!(waiting.await.is_err(), "given up");
    let before = arrivals.times_ms().len();
    let start = tokio::time::Instant::now();
    send_all(&service, flood("small", Priority::Normal, 1)).await;
    assert_eq!(arrivals.times_ms().len(), before + 1);
    // The dropped request's turn (one second after the last) is this one's: not two seconds.
    assert!(
        start.elapsed() <= Duration::from_millis(1_000),
        "{:?}",
        start.elapsed()
    );
}
