//! Job slots: a fine-tune create holds one of its key's slots until its job ends.

use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{BoxError, Layer, ServiceExt};
use tower_test::mock;

use super::super::future::ResponseBody;
use super::{FINE_TUNES, LimitsBuilder, RateLimit, RateLimitLayer, request, static_limits, table};
use crate::quota::Rate;

type Mock = mock::Mock<Request<String>, Response<String>>;
type Handle = mock::Handle<Request<String>, Response<String>>;
type Service = RateLimit<Mock>;
type Answer = Result<Response<ResponseBody<String>>, BoxError>;

/// A limiter with two fine-tune slots per key, over a mock Together.
fn two_slots(limits: LimitsBuilder) -> (Service, Handle) {
    let (service, handle) = mock::pair::<Request<String>, Response<String>>();
    (RateLimitLayer::new(limits.build()).layer(service), handle)
}

fn limits() -> LimitsBuilder {
    static_limits(table(Rate::per_second(1)))
}

/// Sends a fine-tune create labelled `label`, from a task of its own.
fn create(service: &Service, label: &str) -> JoinHandle<Answer> {
    tokio::spawn(service.clone().oneshot(request(FINE_TUNES, "k", label)))
}

/// Answers the next request with `status` and `body`; returns the request's label.
async fn answer(handle: &mut Handle, status: u16, body: &str) -> String {
    let (request, reply) = handle.next_request().await.expect("a request");
    let mut response = Response::new(body.to_owned());
    *response.status_mut() = StatusCode::from_u16(status).unwrap();
    reply.send_response(response);
    request
        .headers()
        .get("x-label")
        .map_or_else(String::new, |label| label.to_str().unwrap().to_owned())
}

/// Waits for a call's answer and reads its body to the end, as a caller does.
async fn read(call: JoinHandle<Answer>) -> StatusCode {
    let response = call.await.unwrap().unwrap();
    let status = response.status();
    response.into_body().collect().await.unwrap();
    status
}

/// A read of jobs (`GET` of `path`), answered with `body`; its answer read to the end.
async fn read_jobs(service: &Service, handle: &mut Handle, path: &str, body: &str) {
    let request = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(AUTHORIZATION, "Bearer k")
        .body(String::new())
        .unwrap();
    let call = tokio::spawn(service.clone().oneshot(request));
    answer(handle, 200, body).await;
    assert_eq!(read(call).await, StatusCode::OK);
}

/// Whether a request reaches the mock within `within`.
async fn sent_within(handle: &mut Handle, within: Duration) -> bool {
    tokio::time::timeout(within, handle.next_request())
        .await
        .is_ok()
}

fn free_slots(service: &Service) -> usize {
    service
        .limits()
        .snapshot()
        .iter()
        .find_map(|bucket| bucket.free_slots)
        .expect("the fine-tune bucket")
}

#[tokio::test(start_paused = true)]
async fn a_created_job_holds_its_slot_until_an_answer_shows_it_ended() {
    let (service, mut handle) = two_slots(limits().max_wait(Duration::from_secs(3_600)));
    let first = create(&service, "first");
    let second = create(&service, "second");
    assert_eq!(
        answer(&mut handle, 200, r#"{"id":"ft-1","status":"pending"}"#).await,
        "first"
    );
    assert_eq!(answer(&mut handle, 500, "").await, "second");
    assert_eq!(read(first).await, StatusCode::OK);
    assert_eq!(read(second).await, StatusCode::INTERNAL_SERVER_ERROR);
    // The failed create made no job: its slot is back. The first job holds its own.
    assert_eq!(free_slots(&service), 1);

    let third = create(&service, "third");
    assert_eq!(
        answer(&mut handle, 200, r#"{"id":"ft-3","status":"pending"}"#).await,
        "third"
    );
    assert_eq!(read(third).await, StatusCode::OK);
    let fourth = create(&service, "fourth");
    assert!(
        !sent_within(&mut handle, Duration::from_secs(600)).await,
        "a third job was created while two ran"
    );

    // The job is still running when asked; then it is seen completed.
    let job = "/v1/fine-tunes/ft-1";
    read_jobs(
        &service,
        &mut handle,
        job,
        r#"{"id":"ft-1","status":"running"}"#,
    )
    .await;
    assert_eq!(free_slots(&service), 0);
    read_jobs(
        &service,
        &mut handle,
        job,
        r#"{"id":"ft-1","status":"completed"}"#,
    )
    .await;
    assert_eq!(answer(&mut handle, 200, r#"{"id":"ft-4"}"#).await, "fourth");
    assert_eq!(read(fourth).await, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_job_not_heard_of_for_its_time_to_live_gives_its_slot_back() {
    let ttl = Duration::from_secs(600);
    let (service, mut handle) =
        two_slots(limits().job_ttl(ttl).max_wait(Duration::from_secs(3_600)));
    let started = Instant::now();
    let calls = [create(&service, "a"), create(&service, "b")];
    // The late create waits from before the jobs hold their slots, so it learns of their
    // time to live while it waits.
    let late = create(&service, "late");
    for (call, label) in calls.into_iter().zip(["a", "b"]) {
        answer(&mut handle, 200, &format!(r#"{{"id":"ft-{label}"}}"#)).await;
        read(call).await;
    }
    let (request, reply) = handle.next_request().await.unwrap();
    assert_eq!(request.headers()["x-label"], "late");
    assert_eq!(
        started.elapsed(),
        ttl,
        "sent as the first job's time ran out"
    );
    reply.send_response(Response::new(String::new()));
    read(late).await;
}

#[tokio::test(start_paused = true)]
async fn a_409_takes_the_free_slots_until_a_list_shows_what_runs() {
    let (service, mut handle) = two_slots(limits().max_wait(Duration::from_secs(3_600)));
    // Another process runs two jobs of this key: the create meets a 409.
    let refused = create(&service, "refused");
    answer(&mut handle, 409, r#"{"error":{"message":"too many jobs"}}"#).await;
    assert_eq!(read(refused).await, StatusCode::CONFLICT);
    assert_eq!(free_slots(&service), 0, "the 409 said every slot is in use");

    // The next create waits rather than meet another 409, until a list shows one of the other
    // process's jobs ended.
    let waiting = create(&service, "waiting");
    assert!(!sent_within(&mut handle, Duration::from_secs(10)).await);
    let list = r#"{"object":"list","data":[
        {"id":"theirs-1","status":"running"},
        {"id":"theirs-2","status":"completed"}]}"#;
    read_jobs(&service, &mut handle, FINE_TUNES, list).await;
    assert_eq!(
        answer(&mut handle, 200, r#"{"id":"ft-mine"}"#).await,
        "waiting"
    );
    read(waiting).await;
    assert_eq!(free_slots(&service), 0, "their running job and mine");
}

#[tokio::test(start_paused = true)]
async fn placeholders_of_a_409_go_at_the_recheck_time_without_a_list() {
    let recheck = Duration::from_secs(30);
    let (service, mut handle) = two_slots(
        limits()
            .job_recheck(recheck)
            .max_wait(Duration::from_secs(3_600)),
    );
    let refused = create(&service, "refused");
    let started = Instant::now();
    answer(&mut handle, 409, "").await;
    read(refused).await;
    let again = create(&service, "again");
    assert_eq!(answer(&mut handle, 200, "{}").await, "again");
    assert_eq!(started.elapsed(), recheck);
    read(again).await;
}

#[tokio::test(start_paused = true)]
async fn one_list_at_start_up_counts_the_jobs_already_running() {
    let (service, mut handle) = two_slots(limits().max_wait(Duration::from_secs(5)));
    let list = r#"{"object":"list","data":[
        {"id":"old-1","status":"running"},
        {"id":"old-2","status":"pending"},
        {"id":"old-0","status":"cancelled"}]}"#;
    read_jobs(&service, &mut handle, FINE_TUNES, list).await;
    assert_eq!(free_slots(&service), 0);
    let error = service
        .clone()
        .oneshot(request(FINE_TUNES, "k", "new"))
        .await
        .unwrap_err();
    assert!(error.is::<super::SlotsBusy>(), "{error}");
}
