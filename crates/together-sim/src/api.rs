//! Answering requests as Together would.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::config::{Class, ClassLimits, Hints, SimConfig};
use crate::state::{Job, JobStatus, LimitOutcome, State, key_label};
use crate::stream::{EventStream, StreamPace};

/// An answer's body: whole, or a stream of events.
pub(crate) type SimBody = UnsyncBoxBody<Bytes, std::io::Error>;

/// The largest request body the simulator reads.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// What every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    config: SimConfig,
    started: Instant,
    state: Mutex<State>,
    rng: Mutex<fastrand::Rng>,
}

impl Shared {
    pub(crate) fn new(config: SimConfig) -> Self {
        Self {
            state: Mutex::new(State::new(&config)),
            rng: Mutex::new(fastrand::Rng::with_seed(config.seed)),
            started: Instant::now(),
            config,
        }
    }

    pub(crate) fn config(&self) -> &SimConfig {
        &self.config
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now(&self) -> Duration {
        self.started.elapsed()
    }

    pub(crate) fn stats(&self) -> crate::state::Stats {
        self.state().stats().clone()
    }

    pub(crate) fn limits(&self) -> BTreeMap<Class, ClassLimits> {
        let now = self.now();
        let mut state = self.state();
        state.apply_schedule(now);
        state.limits().clone()
    }

    /// Forgets meters that hold nothing.
    pub(crate) fn prune(&self) {
        let now = self.now();
        self.state().prune(now);
    }
}

/// An answer on its way out, with the rate-limit headers to put on it.
struct Answer {
    status: StatusCode,
    body: Value,
    tokens: u64,
    /// The model the request named, for the stats by model.
    model: Option<String>,
    /// For `"stream": true`: the events to send in place of `body` (boxed: most answers are
    /// not streamed, and answers are moved around).
    stream: Option<Box<EventStream>>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            tokens: 0,
            model: None,
            stream: None,
        }
    }

    fn error(status: StatusCode, kind: &str, message: impl Into<String>) -> Self {
        let body = json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
        Self {
            status,
            body,
            tokens: 0,
            model: None,
            stream: None,
        }
    }
}

/// The `hangup_rate` fault: the request was read, and the connection is closed without an
/// answer. hyper closes a connection whose service fails.
#[derive(Debug)]
pub(crate) struct HungUp;

impl std::fmt::Display for HungUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("hung up after reading the request (injected fault)")
    }
}

impl std::error::Error for HungUp {}

/// Answers one request, or hangs up on it.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: Request<Incoming>,
) -> Result<Response<SimBody>, HungUp> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().trim_end_matches('/').to_owned();
    if let Some(control) = path.strip_prefix("/sim/") {
        let body = read_body(&shared, body).await.unwrap_or_default();
        return Ok(respond(
            control_answer(&shared, &parts.method, control, &body),
            None,
            Hints::None,
        ));
    }

    let key = bearer(&parts.headers);
    let route = route(&parts.method, &path);
    let label = key_label(key.unwrap_or(""));
    let (answer, limits) = match key {
        None => (
            Answer::error(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "Invalid API key provided. Pass it as `Authorization: Bearer <key>`.",
            ),
            None,
        ),
        Some(key) => match answer(&shared, key, &route, body).await {
            Reply::Answer(answer, limits) => (answer, limits),
            Reply::HangUp => {
                shared.state().record_hangup(&label, route.class);
                return Err(HungUp);
            }
        },
    };
    shared.state().record(
        &label,
        route.class,
        answer.model.as_deref(),
        answer.status.as_u16(),
        answer.tokens,
    );
    Ok(respond(answer, limits, shared.config.hints))
}

/// The request's class and what to do with it.
struct Route {
    class: Class,
    endpoint: Endpoint,
}

enum Endpoint {
    Chat,
    Completions,
    Embeddings,
    Images,
    Rerank,
    Models,
    CreateJob,
    ListJobs,
    GetJob(String),
    CancelJob(String),
    Files,
    NotFound,
}

impl Endpoint {
    /// The inference endpoints: their body is JSON that must name a model.
    fn needs_model(&self) -> bool {
        matches!(
            self,
            Endpoint::Chat
                | Endpoint::Completions
                | Endpoint::Embeddings
                | Endpoint::Images
                | Endpoint::Rerank
        )
    }
}

fn route(method: &Method, path: &str) -> Route {
    let segments: Vec<&str> = path
        .trim_start_matches("/v1")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let post = *method == Method::POST;
    let get = *method == Method::GET;
    let (class, endpoint) = match (segments.as_slice(), post, get) {
        (["chat", "completions"], true, _) => (Class::Chat, Endpoint::Chat),
        (["completions"], true, _) => (Class::Completions, Endpoint::Completions),
        (["embeddings"], true, _) => (Class::Embeddings, Endpoint::Embeddings),
        (["images", "generations"], true, _) => (Class::Images, Endpoint::Images),
        (["rerank"], true, _) => (Class::Rerank, Endpoint::Rerank),
        (["models"], _, true) => (Class::Models, Endpoint::Models),
        (["audio", ..], ..) => (Class::Audio, Endpoint::NotFound),
        ([jobs @ ("fine-tunes" | "batches"), rest @ ..], ..) => {
            let class = if *jobs == "fine-tunes" {
                Class::FineTunes
            } else {
                Class::Batches
            };
            let endpoint = match (rest, post, get) {
                ([], true, _) => Endpoint::CreateJob,
                ([], _, true) => Endpoint::ListJobs,
                ([id], _, true) => Endpoint::GetJob((*id).to_owned()),
                ([id, "cancel"], true, _) => Endpoint::CancelJob((*id).to_owned()),
                _ => Endpoint::NotFound,
            };
            (class, endpoint)
        }
        (["files", ..], ..) => (Class::Files, Endpoint::Files),
        _ => (Class::Other, Endpoint::NotFound),
    };
    Route { class, endpoint }
}

fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// Reads a request body whole, within the size bound and the read timeout.
async fn read_body(shared: &Shared, body: Incoming) -> Result<Bytes, Answer> {
    let collect = Limited::new(body, MAX_BODY).collect();
    match tokio::time::timeout(shared.config.read_timeout(), collect).await {
        Ok(Ok(body)) => Ok(body.to_bytes()),
        Ok(Err(_)) => Err(Answer::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "The request body is too large.",
        )),
        Err(_) => Err(Answer::error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "The request body did not arrive in time.",
        )),
    }
}

/// What becomes of an authenticated request.
enum Reply {
    /// An answer, with the limit check's outcome for the rate-limit headers.
    Answer(Answer, Option<LimitOutcome>),
    /// No answer: the connection is closed (an injected fault).
    HangUp,
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Self {
        Reply::Answer(answer, None)
    }
}

/// Reads, checks and answers an authenticated request, noting the model it named.
async fn answer(shared: &Shared, key: &str, route: &Route, body: Incoming) -> Reply {
    let json = match read_json(shared, route, body).await {
        Ok(json) => json,
        Err(refusal) => return refusal.into(),
    };
    let model = json.get("model").and_then(Value::as_str);
    match answer_json(shared, key, route, &json, model).await {
        Reply::Answer(mut answer, limits) => {
            answer.model = model.map(str::to_owned);
            Reply::Answer(answer, limits)
        }
        Reply::HangUp => Reply::HangUp,
    }
}

/// Answers a request whose JSON was read: model, faults, limits, work.
async fn answer_json(
    shared: &Shared,
    key: &str,
    route: &Route,
    json: &Value,
    model: Option<&str>,
) -> Reply {
    if let Err(refusal) = check_model(shared, route, model) {
        return refusal.into();
    }
    let faults = draw_faults(shared);
    if !faults.latency.is_zero() {
        tokio::time::sleep(faults.latency).await;
    }
    if faults.hang_up {
        return Reply::HangUp;
    }
    let overloaded = model.is_some_and(|model| {
        shared
            .config
            .overloaded_models
            .iter()
            .any(|name| name == model)
    });
    if faults.unavailable || overloaded {
        return Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server is overloaded or not ready yet.",
        )
        .into();
    }

    let (prompt_tokens, completion_tokens) = token_estimate(&route.endpoint, json);
    let now = shared.now();
    let mut state = shared.state();
    let limits = state.check_limits(
        now,
        key,
        route.class,
        model,
        prompt_tokens + completion_tokens,
    );
    if let Some(outcome) = limits.filter(|outcome| !outcome.allowed()) {
        return Reply::Answer(
            over_limit(&outcome, shared.config.over_limit_status),
            limits,
        );
    }
    let work = Work {
        key,
        route,
        json,
        now,
        prompt: prompt_tokens,
        completion: completion_tokens,
    };
    let mut answer = serve(shared, &mut state, &work);
    drop(state);
    if answer.status.is_success() && json["stream"] == true {
        answer.stream = Some(Box::new(streamed(shared, &answer.body, json)));
    }
    Reply::Answer(answer, limits)
}

/// The events of a streamed completion, at their pace (cut halfway by the `stream_cut_rate`
/// fault).
fn streamed(shared: &Shared, body: &Value, json: &Value) -> EventStream {
    let events = crate::stream::events(body, json);
    let cut_rate = shared.config.faults.stream_cut_rate;
    let cut = cut_rate > 0.0 && {
        let mut rng = shared.rng.lock().unwrap_or_else(PoisonError::into_inner);
        rng.f64() < cut_rate
    };
    let pace = StreamPace {
        gap: Duration::from_secs_f64(1.0 / shared.config.stream.chunks_per_second),
        cut_after: cut.then_some(events.len() / 2),
    };
    EventStream::new(events, pace)
}

/// The JSON object the endpoint needs (`null` for endpoints without a body), or the refusal.
async fn read_json(shared: &Shared, route: &Route, body: Incoming) -> Result<Value, Answer> {
    if !route.endpoint.needs_model() && !matches!(route.endpoint, Endpoint::CreateJob) {
        return Ok(Value::Null);
    }
    let bytes = read_body(shared, body).await?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(Answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "The request body is not a JSON object.",
        )),
    }
}

/// Refuses an unknown model (404, as Together does) or a missing one where it is needed.
fn check_model(shared: &Shared, route: &Route, model: Option<&str>) -> Result<(), Answer> {
    match model {
        Some(model) if !shared.config.models.iter().any(|known| known == model) => {
            Err(Answer::error(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "Unable to access model {model}. Please visit https://api.together.ai/models to view the list of supported models."
                ),
            ))
        }
        None if route.endpoint.needs_model() => Err(Answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`model` is required.",
        )),
        _ => Ok(()),
    }
}

/// The answer to a request over its request or token limit: a 429, or the 503 Together sends
/// when it is out of capacity below a client's dynamic limit.
fn over_limit(outcome: &LimitOutcome, status: u16) -> Answer {
    if status == 503 {
        return Answer::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "The server is overloaded. Please slow down and retry later.",
        );
    }
    let (kind, message) = if outcome.requests.allowed {
        (
            "dynamic_token_limited",
            "You have exceeded your token rate limit.",
        )
    } else {
        (
            "dynamic_request_limited",
            "You have exceeded your request rate limit.",
        )
    };
    Answer::error(StatusCode::TOO_MANY_REQUESTS, kind, message)
}

/// The faults drawn for one request.
struct Drawn {
    latency: Duration,
    unavailable: bool,
    hang_up: bool,
}

/// Latency to add, and whether to answer 503 or hang up, by the configured faults.
fn draw_faults(shared: &Shared) -> Drawn {
    let faults = &shared.config.faults;
    let mut rng = shared.rng.lock().unwrap_or_else(PoisonError::into_inner);
    let jitter = if faults.latency_jitter_ms > 0 {
        rng.u64(0..=faults.latency_jitter_ms)
    } else {
        0
    };
    let latency = Duration::from_millis(faults.latency_ms + jitter);
    let in_burst = in_unavailable_burst(
        shared.now(),
        faults.unavailable_every_ms,
        faults.unavailable_for_ms,
    );
    let unlucky = faults.unavailable_rate > 0.0 && rng.f64() < faults.unavailable_rate;
    let hang_up = faults.hangup_rate > 0.0 && rng.f64() < faults.hangup_rate;
    Drawn {
        latency,
        unavailable: in_burst || unlucky,
        hang_up,
    }
}

/// Whether `now` falls in a 503 burst: the first `for_ms` of every `every_ms`.
fn in_unavailable_burst(now: Duration, every_ms: u64, for_ms: u64) -> bool {
    every_ms > 0 && now.as_millis() % u128::from(every_ms) < u128::from(for_ms)
}

/// Words in the text fields of a request: the simulator's token count (about right for English).
fn text_tokens(value: &Value) -> u64 {
    match value {
        Value::String(text) => text.split_whitespace().count().max(1) as u64,
        Value::Array(items) => items.iter().map(text_tokens).sum(),
        Value::Object(fields) => [
            "content",
            "prompt",
            "input",
            "query",
            "documents",
            "messages",
        ]
        .iter()
        .filter_map(|name| fields.get(*name))
        .map(text_tokens)
        .sum(),
        _ => 0,
    }
}

fn reply_text(json: &Value) -> String {
    let last_user = json["messages"]
        .as_array()
        .and_then(|messages| {
            messages
                .iter()
                .rev()
                .find(|message| message["role"] == "user")
        })
        .and_then(|message| message["content"].as_str())
        .or_else(|| json["prompt"].as_str())
        .unwrap_or("");
    let words: Vec<&str> = last_user.split_whitespace().take(8).collect();
    format!("Simulated reply to: {}", words.join(" "))
}

/// Prompt and completion tokens: what the request is charged against a token limit.
fn token_estimate(endpoint: &Endpoint, json: &Value) -> (u64, u64) {
    let prompt = text_tokens(json);
    let completion = match endpoint {
        Endpoint::Chat | Endpoint::Completions => {
            let reply = reply_text(json).split_whitespace().count() as u64;
            json["max_tokens"]
                .as_u64()
                .or_else(|| json["max_completion_tokens"].as_u64())
                .map_or(reply, |max| reply.min(max))
        }
        _ => 0,
    };
    (prompt, completion)
}

/// A request that passed every check, and what it is charged.
struct Work<'a> {
    key: &'a str,
    route: &'a Route,
    json: &'a Value,
    now: Duration,
    prompt: u64,
    completion: u64,
}

/// Does the work of a request that passed every check.
fn serve(shared: &Shared, state: &mut State, work: &Work<'_>) -> Answer {
    let mut answer = match &work.route.endpoint {
        Endpoint::Chat | Endpoint::Completions => completion(state, work),
        Endpoint::Embeddings => embeddings(shared, work),
        Endpoint::Images => image(state, work),
        Endpoint::Rerank => rerank(state, work),
        Endpoint::Models => {
            let data: Vec<Value> = shared.config.models.iter().map(|id| json!({"id": id, "object": "model", "created": 0, "organization": "simulated"})).collect();
            Answer::ok(Value::Array(data))
        }
        Endpoint::CreateJob => create_job(
            shared,
            state,
            work.key,
            work.route.class,
            work.json,
            work.now,
        ),
        Endpoint::ListJobs => {
            let data: Vec<Value> = state
                .jobs
                .iter()
                .filter(|job| job.key == work.key && job.class == work.route.class)
                .map(|job| job_json(job, work.now))
                .collect();
            Answer::ok(json!({"object": "list", "data": data}))
        }
        Endpoint::GetJob(id) => one_job(state, work, id, false),
        Endpoint::CancelJob(id) => one_job(state, work, id, true),
        Endpoint::Files => Answer::ok(json!({"object": "list", "data": []})),
        Endpoint::NotFound => Answer::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "The simulator does not know this endpoint.",
        ),
    };
    answer.tokens = work.prompt + work.completion;
    answer
}

impl Work<'_> {
    /// The answer's `usage`.
    fn usage(&self) -> Value {
        json!({"prompt_tokens": self.prompt, "completion_tokens": self.completion, "total_tokens": self.prompt + self.completion})
    }

    /// The reply, cut to the completion tokens it is charged for.
    fn reply(&self) -> String {
        reply_text(self.json)
            .split_whitespace()
            .take(self.completion as usize)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Seconds since the epoch, as OpenAI's `created`.
fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// A chat completion or a text completion.
fn completion(state: &mut State, work: &Work<'_>) -> Answer {
    let model = &work.json["model"];
    if matches!(work.route.endpoint, Endpoint::Chat) {
        let id = state.new_id("chatcmpl");
        return Answer::ok(json!({
            "id": id, "object": "chat.completion", "created": created(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": work.reply()}, "finish_reason": "stop"}],
            "usage": work.usage(),
        }));
    }
    let id = state.new_id("cmpl");
    Answer::ok(json!({
        "id": id, "object": "text_completion", "created": created(), "model": model,
        "choices": [{"index": 0, "text": work.reply(), "finish_reason": "stop"}],
        "usage": work.usage(),
    }))
}

/// One embedding per input, in input order.
fn embeddings(shared: &Shared, work: &Work<'_>) -> Answer {
    let inputs: Vec<&str> = match &work.json["input"] {
        Value::String(text) => vec![text.as_str()],
        Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if inputs.is_empty() {
        return Answer::error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "`input` must be a string or a list of strings.",
        );
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| json!({"object": "embedding", "index": index, "embedding": embedding(text, shared.config.embedding_dimensions)}))
        .collect();
    Answer::ok(
        json!({"object": "list", "model": work.json["model"], "data": data, "usage": work.usage()}),
    )
}

/// One generated image: a URL, or a pixel in base64.
fn image(state: &mut State, work: &Work<'_>) -> Answer {
    let id = state.new_id("img");
    let image = if work.json["response_format"] == "b64_json" {
        json!({"index": 0, "b64_json": ONE_PIXEL_PNG})
    } else {
        json!({"index": 0, "url": format!("https://images.sim.invalid/{id}.png")})
    };
    Answer::ok(json!({"id": id, "model": work.json["model"], "object": "list", "data": [image]}))
}

/// The documents ranked by the share of the query's words each holds.
fn rerank(state: &mut State, work: &Work<'_>) -> Answer {
    let json = work.json;
    let query: Vec<String> = json["query"]
        .as_str()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_lowercase)
        .collect();
    let documents: Vec<&str> = json["documents"]
        .as_array()
        .map(|docs| docs.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut results: Vec<(usize, f64)> = documents
        .iter()
        .enumerate()
        .map(|(index, document)| {
            let document = document.to_lowercase();
            let hits = query
                .iter()
                .filter(|word| document.contains(word.as_str()))
                .count();
            (index, hits as f64 / query.len().max(1) as f64)
        })
        .collect();
    results.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    results.truncate(
        json["top_n"]
            .as_u64()
            .map_or(usize::MAX, |top| top as usize),
    );
    let results: Vec<Value> = results
        .into_iter()
        .map(|(index, score)| json!({"index": index, "relevance_score": score}))
        .collect();
    let id = state.new_id("rerank");
    Answer::ok(
        json!({"id": id, "object": "rerank", "model": json["model"], "results": results, "usage": work.usage()}),
    )
}

/// One job of the caller's, read or (`cancel`) cancelled.
fn one_job(state: &mut State, work: &Work<'_>, id: &str, cancel: bool) -> Answer {
    let now = work.now;
    let job = state
        .jobs
        .iter_mut()
        .find(|job| job.key == work.key && job.class == work.route.class && job.id == *id);
    match job {
        Some(job) => {
            if cancel && job.status(now) == JobStatus::Running {
                job.cancelled = true;
            }
            Answer::ok(job_json(job, now))
        }
        None => Answer::error(StatusCode::NOT_FOUND, "not_found", format!("No job {id}.")),
    }
}

fn create_job(
    shared: &Shared,
    state: &mut State,
    key: &str,
    class: Class,
    json: &Value,
    now: Duration,
) -> Answer {
    let settings = if class == Class::FineTunes {
        shared.config.fine_tunes
    } else {
        shared.config.batches
    };
    let running = state.running_jobs(key, class, now);
    if running >= settings.concurrent as usize {
        let message = format!(
            "You have reached the limit of {} running jobs. Wait for one to finish.",
            settings.concurrent
        );
        return Answer::error(StatusCode::CONFLICT, "concurrency_limit_exceeded", message);
    }
    let id = state.new_id(if class == Class::FineTunes {
        "ft"
    } else {
        "batch"
    });
    let job = Job {
        id,
        key: key.to_owned(),
        class,
        created: now,
        finishes: now + Duration::from_millis(settings.duration_ms),
        cancelled: false,
        detail: json.clone(),
    };
    let body = job_json(&job, now);
    state.jobs.push(job);
    Answer::ok(body)
}

fn job_json(job: &Job, now: Duration) -> Value {
    let mut body = json!({
        "id": job.id,
        "object": if job.class == Class::FineTunes { "fine-tune" } else { "batch" },
        "status": job.status(now).as_str(job.class),
        "created_at_ms": job.created.as_millis() as u64,
    });
    for field in ["model", "training_file", "input_file_id", "endpoint"] {
        if let Some(value) = job.detail.get(field) {
            body[field] = value.clone();
        }
    }
    body
}

/// A deterministic unit vector from the text: the same text always embeds the same.
fn embedding(text: &str, dimensions: usize) -> Vec<f32> {
    let seed = crate::state::fnv1a(text.as_bytes());
    let mut rng = fastrand::Rng::with_seed(seed);
    let raw: Vec<f32> = (0..dimensions).map(|_| rng.f32() * 2.0 - 1.0).collect();
    let norm = raw
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    raw.into_iter().map(|x| x / norm).collect()
}

/// A 1x1 transparent PNG, base64-encoded.
const ONE_PIXEL_PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

/// `/sim/...`: stats, reset, and run-time limit changes.
fn control_answer(shared: &Shared, method: &Method, path: &str, body: &[u8]) -> Answer {
    match (method, path) {
        (&Method::GET, "stats") => {
            Answer::ok(serde_json::to_value(shared.state().stats()).unwrap_or(Value::Null))
        }
        (&Method::POST, "reset") => {
            shared.state().reset();
            Answer::ok(json!({"reset": true}))
        }
        (&Method::GET, "limits") => {
            Answer::ok(serde_json::to_value(shared.state().limits()).unwrap_or(Value::Null))
        }
        (&Method::POST, "limits") => {
            match serde_json::from_slice::<BTreeMap<Class, ClassLimits>>(body) {
                Ok(changes)
                    if changes
                        .values()
                        .all(|l| l.rpm > 0 && l.burst > 0 && l.tpm != Some(0)) =>
                {
                    let mut state = shared.state();
                    state.set_limits(changes);
                    Answer::ok(serde_json::to_value(state.limits()).unwrap_or(Value::Null))
                }
                Ok(_) => Answer::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "rpm, tpm and burst must be at least 1.",
                ),
                Err(error) => Answer::error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    format!("Expected {{\"CLASS\": {{\"rpm\": N, \"tpm\": N}}}}: {error}"),
                ),
            }
        }
        _ => Answer::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Simulator control endpoints: GET /sim/stats, POST /sim/reset, GET and POST /sim/limits.",
        ),
    }
}

fn respond(answer: Answer, limits: Option<LimitOutcome>, hints: Hints) -> Response<SimBody> {
    let (body, content_type) = match answer.stream {
        Some(stream) => (stream.boxed_unsync(), "text/event-stream"),
        None => {
            let body = serde_json::to_vec(&answer.body).unwrap_or_default();
            let body = Full::new(Bytes::from(body)).map_err(|never| match never {});
            (body.boxed_unsync(), "application/json")
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Some(limits) = limits {
        let number = |n: u64| HeaderValue::from(n);
        let seconds = |d: Duration| {
            HeaderValue::from_str(&format!("{:.3}", d.as_secs_f64()))
                .unwrap_or(HeaderValue::from_static("0"))
        };
        if matches!(hints, Hints::All | Hints::Together) {
            headers.insert("x-ratelimit-limit", number(limits.requests.limit));
            headers.insert("x-ratelimit-remaining", number(limits.requests.remaining));
            headers.insert("x-ratelimit-reset", seconds(limits.requests.reset));
            if let Some(tokens) = limits.tokens {
                headers.insert("x-tokenlimit-limit", number(tokens.limit));
                headers.insert("x-tokenlimit-remaining", number(tokens.remaining));
            }
        }
        let refused = !limits.allowed();
        if refused && matches!(hints, Hints::All | Hints::RetryAfter) {
            let wait = if limits.requests.allowed {
                limits.tokens.map_or(Duration::ZERO, |t| t.reset)
            } else {
                limits.requests.reset
            };
            // Whole seconds, rounded up, as `Retry-After` is usually sent; the precise wait
            // is in `x-ratelimit-reset`.
            headers.insert(
                RETRY_AFTER,
                number(wait.as_secs() + u64::from(wait.subsec_nanos() > 0)),
            );
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_cover_the_endpoint_table() {
        let class = |method: Method, path: &str| route(&method, path).class;
        assert_eq!(class(Method::POST, "/v1/chat/completions"), Class::Chat);
        assert_eq!(class(Method::POST, "/v1/embeddings"), Class::Embeddings);
        assert_eq!(class(Method::GET, "/v1/models"), Class::Models);
        assert_eq!(class(Method::POST, "/v1/fine-tunes"), Class::FineTunes);
        assert_eq!(class(Method::GET, "/v1/batches/batch-1"), Class::Batches);
        assert_eq!(class(Method::POST, "/v1/audio/speech"), Class::Audio);
        assert_eq!(class(Method::GET, "/v1/jobs/x"), Class::Other);
        assert!(
            matches!(route(&Method::POST, "/v1/fine-tunes/ft-1/cancel").endpoint, Endpoint::CancelJob(ref id) if id == "ft-1")
        );
    }

    #[test]
    fn bursts_of_503s_cover_the_start_of_every_period() {
        let at = |ms| in_unavailable_burst(Duration::from_millis(ms), 10_000, 1_000);
        let pattern: Vec<bool> = [0, 999, 1_000, 9_999, 10_000, 10_500, 11_000]
            .into_iter()
            .map(at)
            .collect();
        assert_eq!(pattern, [true, true, false, false, true, true, false]);
        assert!(!in_unavailable_burst(Duration::ZERO, 0, 0));
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding("hello", 16);
        assert_eq!(a, embedding("hello", 16));
        assert_ne!(a, embedding("hello!", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
    }

    #[test]
    fn tokens_are_counted_from_the_text_fields() {
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 2});
        assert_eq!(token_estimate(&Endpoint::Chat, &chat), (3, 2));
        let embeddings = json!({"model": "m", "input": ["a b", "c"]});
        assert_eq!(token_estimate(&Endpoint::Embeddings, &embeddings), (3, 0));
    }
}
