//! The Redis backend on a real Redis Cluster: three masters on loopback, each a
//! `redis-server` of its own. Buckets of many keys land on every node; processes still share
//! one quota; a node that goes away is an outage the backend decides through, never a hang;
//! and a single connection to a cluster node is a typed error, not a quiet fallback.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::{RedisCluster, RedisServer};
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, ClassLimits, Hints, Sim, SimConfig, SimHandle};
use together_tower::ServiceBuilderExt;
use together_tower::body::BufferedBody;
use together_tower::limit::{Adaptation, Backend, Limits};
use together_tower::quota::QuotaTable;
use together_tower_redis::{RedisBackend, RedisBackendError, RedisSettings, Unreachable};
use tower::{BoxError, ServiceBuilder, ServiceExt};

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, BufferedBody<Full<Bytes>>>;

/// How long a request may wait for its turn in these tests.
const MAX_WAIT: Duration = Duration::from_secs(5);

/// Keys enough that their buckets land on every node of the cluster.
const KEYS: usize = 24;

/// One cluster test at a time: each runs three Redis nodes and hundreds of requests.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Chat at 600 a minute per key, paced (a request may come 50 ms early: these tests run
/// beside others on two cores, and a turn two processes were both given would come 0 ms
/// apart), no hints: only a shared count keeps the 429s away.
async fn simulator() -> SimHandle {
    Sim::start(SimConfig {
        limits: BTreeMap::from([(Class::Chat, ClassLimits::rpm(600))]),
        hints: Hints::None,
        gcra_tolerance_ms: 50,
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

fn stack<L: Backend>(
    limiter: L,
) -> together_tower::TogetherService<Http, together_tower::classify::TogetherClassifier, L> {
    let limits = Limits::builder(QuotaTable::together_defaults())
        .adaptation(Adaptation::fixed())
        .max_wait(MAX_WAIT)
        .backend(limiter)
        .build();
    ServiceBuilder::new()
        .together(limits)
        .service(Client::builder(TokioExecutor::new()).build_http())
}

fn chat(sim: &SimHandle, key: usize) -> Request<Full<Bytes>> {
    let body = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[{"role":"user","content":"hi"}],"max_tokens":8}"#;
    Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", format!("Bearer cluster-key-{key}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Two processes' limiters on the cluster, each connected through a different node.
async fn two_processes(cluster: &RedisCluster, settings: RedisSettings) -> [RedisBackend; 2] {
    let urls = cluster.urls();
    let first = RedisBackend::connect_cluster([&urls[0]], settings.clone());
    let second = RedisBackend::connect_cluster([&urls[2]], settings);
    [first.await.unwrap(), second.await.unwrap()]
}

/// `per_key` requests for each key from each of the two stacks, all at once; every one must
/// finish within its max wait (and a call timeout), answered or refused.
async fn send<S, B>(stacks: &[S; 2], sim: &SimHandle, per_key: usize) -> Vec<Result<u16, String>>
where
    S: tower::Service<Request<Full<Bytes>>, Response = http::Response<B>> + Clone + Send + 'static,
    B: Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
{
    let mut calls = Vec::new();
    for key in 0..KEYS {
        for _ in 0..per_key {
            for stack in stacks {
                let call = stack.clone().oneshot(chat(sim, key));
                calls.push(tokio::spawn(tokio::time::timeout(
                    MAX_WAIT + Duration::from_secs(2),
                    call,
                )));
            }
        }
    }
    let mut answers = Vec::new();
    for call in calls {
        let answer = call
            .await
            .unwrap()
            .expect("a request hung past its max wait");
        answers.push(
            answer
                .map(|response| response.status().as_u16())
                .map_err(|error| error.into().to_string()),
        );
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_connection_to_a_cluster_node_is_a_typed_error_at_start_up() {
    let cluster = RedisCluster::start().await;
    let error = RedisBackend::connect(&cluster.urls()[0], RedisSettings::default())
        .await
        .unwrap_err();
    assert!(
        matches!(error, RedisBackendError::Misconfigured(_)),
        "{error}"
    );
    assert!(error.to_string().contains("connect_cluster"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_client_on_a_lone_redis_is_an_error_at_start_up() {
    let redis = RedisServer::start().await;
    let connected = RedisBackend::connect_cluster([redis.url()], RedisSettings::default()).await;
    assert!(connected.is_err(), "a lone Redis is no cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_on_a_cluster_share_one_quota_per_key_on_every_node() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let cluster = RedisCluster::start().await;
    let sim = simulator().await;
    let settings = RedisSettings {
        unreachable: Unreachable::Fail,
        ..RedisSettings::default()
    };
    let [first, second] = two_processes(&cluster, settings).await;
    let answers = send(&[stack(first), stack(second)], &sim, 5).await;
    assert!(
        answers.iter().all(|answer| answer == &Ok(200)),
        "{answers:?}"
    );
    let chat = sim.stats().class(Class::Chat);
    assert_eq!(
        (chat.ok, chat.rate_limited),
        (2 * 5 * KEYS as u64, 0),
        "{chat:?}"
    );
    // Every node decided for some of the buckets: the keys really were spread.
    for url in cluster.urls() {
        let client = redis::Client::open(url).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut connection)
            .await
            .unwrap();
        assert!(
            stats.contains("cmdstat_evalsha:calls="),
            "a node decided nothing: {stats}"
        );
    }
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_mid_run_hangs_no_request_and_keeps_the_quota() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let mut cluster = RedisCluster::start().await;
    let sim = simulator().await;
    // Two processes; while the cluster does not answer, each decides at half the quota.
    let settings = RedisSettings {
        unreachable: Unreachable::FallBack { replicas: 2 },
        ..RedisSettings::default()
    };
    let [first, second] = two_processes(&cluster, settings).await;
    let stacks = [stack(first), stack(second)];
    let refused = |sim: &SimHandle| sim.stats().class(Class::Chat).rate_limited;
    let before = send(&stacks, &sim, 2).await;
    let refused_before = refused(&sim);
    cluster.stop(1).await;
    let during = send(&stacks, &sim, 2).await;
    let refused_during = refused(&sim) - refused_before;
    cluster.restart(1).await;
    let after = send(&stacks, &sim, 2).await;
    let refused_after = refused(&sim) - refused_during - refused_before;
    for (phase, answers) in [("before", &before), ("during", &during), ("after", &after)] {
        let answered = answers.iter().filter(|answer| answer.is_ok()).count();
        assert_eq!(answered, answers.len(), "{phase}: {answers:?}");
    }
    let counts =
        format!("429s: {refused_before} before, {refused_during} during, {refused_after} after");
    // With the cluster whole, the two share one quota exactly.
    assert_eq!(refused_before, 0, "{counts}");
    // While the node is away, its buckets are decided in each process at half the quota,
    // in phases nobody coordinates: a strict server (burst 1) refuses their collisions,
    // as it does when a lone Redis is away (the README's fault runs). The retry layer waits
    // them out, and the total rate stays the quota's.
    assert!(refused_during <= during.len() as u64 / 2, "{counts}");
    // Back, the node has lost its state (no persistence): at most one turn a bucket overlaps.
    assert!(refused_after <= KEYS as u64, "{counts}");
    sim.shutdown().await;
}
