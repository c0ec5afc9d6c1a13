//! Job slots against the simulator on loopback: the whole stack around hyper-util's `Client`
//! keeps a key within its running fine-tune jobs, so the server never answers 409 to a create
//! the stack could have held back.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use together_sim::{Class, JobSettings, Sim, SimConfig, SimHandle};
use together_tower::ServiceBuilderExt;
use together_tower::limit::Limits;
use together_tower::quota::QuotaTable;
use together_tower_tests::http_client;
use tokio::sync::mpsc;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

type Stack = BoxCloneSyncService<Request<Full<Bytes>>, (StatusCode, serde_json::Value), BoxError>;

const KEY: &str = "tgp_v1_jobs-test-key";
const CREATE: &str =
    r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","training_file":"file-1"}"#;

/// The simulator, running three fine-tunes per key at once, each for `duration`.
async fn simulator(duration: Duration) -> SimHandle {
    Sim::start(SimConfig {
        fine_tunes: JobSettings {
            concurrent: 3,
            duration_ms: duration.as_millis() as u64,
        },
        ..SimConfig::default()
    })
    .await
    .unwrap()
}

/// The whole stack with Together's table (three fine-tune slots per key), answering with the
/// status and the JSON body, read to its end as a caller would.
fn stack(limits: Limits) -> Stack {
    let together = ServiceBuilder::new()
        .together(limits)
        .service(http_client())
        .map_response(|response| async move {
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, serde_json::from_slice(&body).unwrap_or_default()))
        })
        .and_then(|future| future);
    BoxCloneSyncService::new(together)
}

fn request(
    sim: &SimHandle,
    method: Method,
    path: &str,
    body: &'static str,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(format!("{}/v1/{path}", sim.url()))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// Sends `count` fine-tune creates at once; each job's id comes out of the channel as its
/// create is answered.
fn create_jobs(stack: &Stack, sim: &SimHandle, count: usize) -> mpsc::UnboundedReceiver<String> {
    let (ids, answered) = mpsc::unbounded_channel();
    for _ in 0..count {
        let (stack, ids) = (stack.clone(), ids.clone());
        let create = request(sim, Method::POST, "fine-tunes", CREATE);
        tokio::spawn(async move {
            let (status, job) = stack.oneshot(create).await.unwrap();
            assert_eq!(status, StatusCode::OK, "{job}");
            ids.send(job["id"].as_str().unwrap().to_owned()).unwrap();
        });
    }
    answered
}

/// Calls under `/v1/fine-tunes` the server has seen: creates, reads and cancels.
fn fine_tune_calls(sim: &SimHandle) -> u64 {
    sim.stats().class(Class::FineTunes).requests
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_creates_with_three_slots_send_three_and_the_rest_as_jobs_end() {
    let sim = simulator(Duration::from_secs(600)).await;
    let stack = stack(Limits::new(QuotaTable::together_defaults()));
    let mut answered = create_jobs(&stack, &sim, 5);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(answered.recv().await.unwrap());
    }
    // Three jobs run for ten minutes: the other two creates wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fine_tune_calls(&sim), 3);
    assert!(answered.try_recv().is_err());

    // Each cancel, answered "cancelled" through the stack, lets exactly one more create go.
    // Calls seen after each: one cancel and one create more.
    for (cancelled, expected) in ids[..2].iter().zip([5, 7]) {
        let cancel = request(
            &sim,
            Method::POST,
            &format!("fine-tunes/{cancelled}/cancel"),
            "",
        );
        let (status, job) = stack.clone().oneshot(cancel).await.unwrap();
        assert_eq!(
            (status, job["status"].as_str()),
            (StatusCode::OK, Some("cancelled"))
        );
        answered.recv().await.unwrap();
        assert_eq!(fine_tune_calls(&sim), expected);
    }
    let fine_tunes = sim.stats().class(Class::FineTunes);
    assert_eq!(fine_tunes.conflict, 0, "{fine_tunes:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_another_client_are_counted_from_a_list_or_a_409_and_no_create_fails() {
    let sim = simulator(Duration::from_millis(1_500)).await;
    // Another client of the same key, without the stack, starts three jobs.
    let bare = ServiceBuilder::new()
        .map_request(|request: Request<Full<Bytes>>| request)
        .service(http_client::<Full<Bytes>>());
    for _ in 0..3 {
        let create = request(&sim, Method::POST, "fine-tunes", CREATE);
        assert_eq!(bare.clone().oneshot(create).await.unwrap().status(), 200);
    }

    // Seeded by one list at start-up, the stack's create waits for a slot without a 409,
    // and goes once a later list shows the other client's jobs ended.
    let seeded_limits = Limits::new(QuotaTable::together_defaults());
    let stack_seeded = stack(seeded_limits.clone());
    let (status, list) = stack_seeded
        .clone()
        .oneshot(request(&sim, Method::GET, "fine-tunes", ""))
        .await
        .unwrap();
    assert_eq!(
        (status, list["data"].as_array().map(Vec::len)),
        (StatusCode::OK, Some(3))
    );
    let mut answered = create_jobs(&stack_seeded, &sim, 1);
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    // The other client's three creates and the list: the create waited for a slot.
    assert_eq!(fine_tune_calls(&sim), 4);
    assert_eq!(seeded_limits.snapshot()[0].waiting, 1);
    stack_seeded
        .clone()
        .oneshot(request(&sim, Method::GET, "fine-tunes", ""))
        .await
        .unwrap();
    answered.recv().await.unwrap();
    assert_eq!(sim.stats().class(Class::FineTunes).conflict, 0);

    // Not seeded, a fresh stack learns of the running jobs from a 409: it takes every slot
    // until the recheck, and the create, retried, goes once they have ended.
    let limits = Limits::builder(QuotaTable::together_defaults())
        .job_recheck(Duration::from_millis(500))
        .build();
    let stack_unseeded = stack(limits);
    let mut answered = create_jobs(&stack_unseeded, &sim, 3);
    for _ in 0..3 {
        answered.recv().await.unwrap();
    }
    let fine_tunes = sim.stats().class(Class::FineTunes);
    // The other client's three creates, two lists, the seeded stack's create and three
    // more: every create was answered 2xx in the end. The unseeded stack met the seeded
    // job still running, and learned of it from 409s.
    assert_eq!(fine_tunes.ok, 3 + 2 + 1 + 3, "{fine_tunes:?}");
    assert!(fine_tunes.conflict >= 1, "{fine_tunes:?}");
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_never_heard_of_again_frees_its_slot_after_its_time_to_live() {
    let sim = simulator(Duration::from_secs(1)).await;
    let limits = Limits::builder(QuotaTable::together_defaults())
        .job_ttl(Duration::from_millis(1_500))
        .build();
    let stack = stack(limits);
    let started = std::time::Instant::now();
    let mut answered = create_jobs(&stack, &sim, 4);
    for _ in 0..4 {
        answered.recv().await.unwrap();
    }
    // The fourth went when the first job's time to live ran out, after the jobs ended.
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    let fine_tunes = sim.stats().class(Class::FineTunes);
    assert_eq!(
        (fine_tunes.ok, fine_tunes.conflict),
        (4, 0),
        "{fine_tunes:?}"
    );
    sim.shutdown().await;
}
