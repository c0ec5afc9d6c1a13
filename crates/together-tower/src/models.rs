//! The model check: a 404 for an unknown model becomes a typed error naming the closest
//! known models.
//!
//! Together answers 404 `model_not_found` to a request naming a model it does not serve, and
//! its guidance is to look at `GET /v1/models`. [`ModelCheck`] does that for the caller: on a
//! 404 that may be about the model, it fetches the list through the same stack (so the call
//! waits its turn and is retried like any other), caches it for a time to live (10 min by
//! default), and if the model is not on it, answers [`ModelNotFound`] with the closest ids.
//! Answers other than 404 pass untouched, and cost no call: the happy path never asks for
//! the list. A 404 for a model that is listed (or when the list cannot be had) reaches the
//! caller unchanged.
//!
//! # When a 404 is checked
//!
//! The 404's body is the caller's and is not read, so the rule is by what the request and the
//! answer's headers say. A 404 is checked when all of these hold:
//! - the request's body named a `model`;
//! - its method and path are one of Together's model endpoints (chat, completions,
//!   embeddings, rerank, images, audio; see [`classify_path`]): a 404 to any other path is
//!   about the path;
//! - the answer is JSON (`content-type: application/json`), as Together's errors are: a
//!   proxy's or a web server's page about a missing path is not.
//!
//! The list is then asked of the same server, with the request's own credentials (the headers
//! marked sensitive), so nothing goes anywhere the request did not already go.
//!
//! # What a failing list costs
//!
//! One fetch serves every 404 that comes while it runs. It is bounded by a timeout (5 s by
//! default, [`ModelCheckLayer::fetch_timeout`]); a failure (an error, a status other than 2xx,
//! a body that is not a models list, or the timeout) is remembered for a while (30 s,
//! [`ModelCheckLayer::failure_ttl`]), and every 404 meanwhile is handed back as it came,
//! without another fetch.
//!
//! Suggestions are bounded work: a name longer than [`MAX_NAME_CHARS`] gets none, longer ids
//! are not suggested, and at most the first [`MAX_CANDIDATES`] ids of the list are scored,
//! with an early stop once a candidate cannot beat the three best. In a gateway the end user
//! picks the name; one 404 costs well under a millisecond of CPU.
//!
//! [`TogetherLayer`](crate::TogetherLayer) puts it between the body buffer (which reads the
//! request's `model`) and the retry layer.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BufferedBody, RequestMeta};
use crate::classify::{EndpointClass, classify_path};
use crate::telemetry;

/// How many close model ids a [`ModelNotFound`] names at most.
const SUGGESTIONS: usize = 3;

/// The longest model name (in characters) that gets suggestions, and the longest id
/// suggested. Together's ids are under 100 characters.
pub const MAX_NAME_CHARS: usize = 128;

/// How many ids of the models list are scored for suggestions at most: the first ones.
pub const MAX_CANDIDATES: usize = 1_000;

/// How many cells of edit-distance tables one 404's suggestions may fill: about a quarter of
/// a millisecond. A typo against Together's list needs a tenth of it, as hopeless candidates
/// are abandoned early; a hostile name stops here with the best found so far.
const MAX_CELLS: usize = 200_000;

/// How long a fetch of the models list may take by default.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failed fetch is remembered by default.
const FAILURE_TTL: Duration = Duration::from_secs(30);

/// The largest models list read.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The request named a model the server does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelNotFound {
    model: String,
    closest: Vec<String>,
}

impl ModelNotFound {
    /// The model the request named.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The known model ids closest to it, closest first (at most three).
    pub fn closest(&self) -> &[String] {
        &self.closest
    }
}

impl fmt::Display for ModelNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model {:?} not found", self.model)?;
        match self.closest.as_slice() {
            [] => Ok(()),
            closest => write!(f, "; did you mean {}?", closest.join(", ")),
        }
    }
}

impl std::error::Error for ModelNotFound {}

/// The known models, fetched once and kept for a time to live. Shared by every service of
/// one layer.
#[derive(Debug)]
struct ModelList {
    ttl: Duration,
    fetch_timeout: Duration,
    failure_ttl: Duration,
    /// Held across a fetch, so that one fetch serves every 404 that comes meanwhile.
    cached: Mutex<Cached>,
}

/// What the last fetch of the list found.
#[derive(Debug)]
enum Cached {
    Nothing,
    Known(Instant, Arc<[String]>),
    Failed(Instant),
}

/// Applies [`ModelCheck`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ModelCheckLayer {
    list: Arc<ModelList>,
}

impl ModelCheckLayer {
    /// A check that keeps the models list for 10 minutes.
    pub fn new() -> Self {
        Self::with_ttl(Duration::from_secs(600))
    }

    /// A check that keeps the models list for `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self::with_settings(ttl, FETCH_TIMEOUT, FAILURE_TTL)
    }

    /// The longest a fetch of the models list may take (5 s by default). Every 404 that waits
    /// for the fetch waits at most this long before it is handed back as it came.
    pub fn fetch_timeout(self, timeout: Duration) -> Self {
        Self::with_settings(self.list.ttl, timeout, self.list.failure_ttl)
    }

    /// How long a failed fetch is remembered (30 s by default): meanwhile a 404 is handed
    /// back as it came, without asking for the list again.
    pub fn failure_ttl(self, ttl: Duration) -> Self {
        Self::with_settings(self.list.ttl, self.list.fetch_timeout, ttl)
    }

    fn with_settings(ttl: Duration, fetch_timeout: Duration, failure_ttl: Duration) -> Self {
        Self {
            list: Arc::new(ModelList {
                ttl,
                fetch_timeout,
                failure_ttl,
                cached: Mutex::new(Cached::Nothing),
            }),
        }
    }
}

impl Default for ModelCheckLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone> Layer<S> for ModelCheckLayer {
    type Service = ModelCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ModelCheck {
            spare: Arc::new(std::sync::Mutex::new(inner.clone())),
            inner,
            list: Arc::clone(&self.list),
        }
    }
}

/// Turns a 404 for an unknown model into [`ModelNotFound`]; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct ModelCheck<S> {
    inner: S,
    /// A copy of the inner service to ask for the models list with, shared by every clone:
    /// a request carries only a handle to it, and it is cloned only after a 404.
    spare: Arc<std::sync::Mutex<S>>,
    list: Arc<ModelList>,
}

fn lock<S>(spare: &std::sync::Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    spare
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S> ModelCheck<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

/// What a 404 needs to ask for the models list: the model, where the request went, and its
/// credentials: the headers the layers above marked sensitive (the classifier's, so a key in
/// a header of the user's own goes too). Most requests carry one, kept without allocating.
struct Probe {
    model: Arc<str>,
    uri: Uri,
    credential: Option<(HeaderName, HeaderValue)>,
    more_credentials: Vec<(HeaderName, HeaderValue)>,
}

impl Probe {
    fn new<B>(request: &Request<B>, model: Arc<str>) -> Self {
        let mut credentials = request
            .headers()
            .iter()
            .filter(|(_, value)| value.is_sensitive())
            .map(|(name, value)| (name.clone(), value.clone()));
        Self {
            model,
            uri: request.uri().clone(),
            credential: credentials.next(),
            more_credentials: credentials.collect(),
        }
    }

    fn credentials(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.credential.iter().chain(&self.more_credentials)
    }
}

impl<S, B, ResBody> Service<Request<BufferedBody<B>>> for ModelCheck<S>
where
    S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Response = Response<ResBody>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<BufferedBody<B>>) -> Self::Future {
        // Only requests that name a model, to an endpoint that takes one, can meet
        // `model_not_found`.
        let probe = request
            .extensions()
            .get::<RequestMeta>()
            .and_then(|meta| meta.model.clone())
            .filter(|_| names_a_model(request.method(), request.uri().path()))
            .map(|model| Probe::new(&request, model));
        let future = self.inner.call(request);
        ResponseFuture {
            state: State::Calling {
                future,
                // Boxed: kept small, the future moves cheaply on the happy path.
                ask: probe.map(|probe| {
                    Box::new(Ask {
                        probe,
                        spare: Arc::clone(&self.spare),
                        list: Arc::clone(&self.list),
                    })
                }),
            },
        }
    }
}

/// The check after a 404: the list, then the answer or the error.
type Checking<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

/// What a request that named a model keeps, to ask for the list if it is answered 404.
struct Ask<S> {
    probe: Probe,
    spare: Arc<std::sync::Mutex<S>>,
    list: Arc<ModelList>,
}

pin_project! {
    /// The response future of [`ModelCheck`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        Calling {
            #[pin]
            future: S::Future,
            ask: Option<Box<Ask<S>>>,
        },
        Checking {
            checking: Checking<S::Response>,
        },
    }
}

impl<S> Ask<S> {
    fn check<B, ResBody>(self, response: Response<ResBody>) -> Checking<Response<ResBody>>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        B: Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Into<BoxError>,
    {
        let Ask { probe, spare, list } = self;
        let service = lock(&spare).clone();
        Box::pin(async move {
            let Some(known) = list.get(service, &probe).await else {
                return Ok(response);
            };
            if known.iter().any(|id| **id == *probe.model) {
                return Ok(response);
            }
            Err(ModelNotFound {
                closest: closest(&probe.model, &known),
                model: probe.model.to_string(),
            }
            .into())
        })
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future, ask } => {
                    let response = ready!(future.poll(cx))?;
                    match ask.take() {
                        Some(ask) if may_be_about_the_model(&response) => {
                            let checking = (*ask).check(response);
                            this.state.set(State::Checking { checking });
                        }
                        _ => return Poll::Ready(Ok(response)),
                    }
                }
                StateProj::Checking { checking } => return checking.as_mut().poll(cx),
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Checking { .. } => "checking the model",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// Whether a request to `path` names a model Together could answer `model_not_found` for.
fn names_a_model(method: &Method, path: &str) -> bool {
    matches!(
        classify_path(method, path),
        EndpointClass::Chat
            | EndpointClass::Completions
            | EndpointClass::Embeddings
            | EndpointClass::Rerank
            | EndpointClass::Images
            | EndpointClass::Audio
    )
}

/// Whether an answer may be Together's `model_not_found`: a 404 in JSON.
fn may_be_about_the_model<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::NOT_FOUND
        && response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

impl ModelList {
    /// The known model ids: cached, or fetched through `service` once for every caller that
    /// asks meanwhile. `None` if they cannot be had, now or in the last
    /// [`failure_ttl`](ModelCheckLayer::failure_ttl).
    async fn get<S, B, ResBody>(&self, service: S, probe: &Probe) -> Option<Arc<[String]>>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>,
        ResBody: Body,
        ResBody::Error: Into<BoxError>,
    {
        let mut cached = self.cached.lock().await;
        match &*cached {
            Cached::Known(fetched, models) if fetched.elapsed() < self.ttl => {
                return Some(Arc::clone(models));
            }
            Cached::Failed(failed) if failed.elapsed() < self.failure_ttl => return None,
            _ => {}
        }
        let fetched = tokio::time::timeout(self.fetch_timeout, fetch(service, probe)).await;
        match fetched {
            Ok(Ok(models)) => {
                let models: Arc<[String]> = models.into();
                *cached = Cached::Known(Instant::now(), Arc::clone(&models));
                telemetry::models_fetched(models.len());
                Some(models)
            }
            Ok(Err(why)) => {
                *cached = Cached::Failed(Instant::now());
                telemetry::models_unavailable(why, self.failure_ttl);
                None
            }
            Err(_elapsed) => {
                *cached = Cached::Failed(Instant::now());
                telemetry::models_unavailable("timed out", self.failure_ttl);
                None
            }
        }
    }
}

/// Asks for the list once; on failure, says why in a few words.
async fn fetch<S, B, ResBody>(service: S, probe: &Probe) -> Result<Vec<String>, &'static str>
where
    S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    use tower::ServiceExt;
    let request = models_request(probe).ok_or("no models URL")?;
    let response = service
        .oneshot(request)
        .await
        .map_err(|_| "the request failed")?;
    if !response.status().is_success() {
        return Err("answered an error");
    }
    let body = http_body_util::Limited::new(response.into_body(), MAX_LIST_BYTES)
        .collect()
        .await
        .map_err(|_| "the body failed or was too large")?
        .aggregate();
    parse_models(body.chunk()).ok_or("not a models list")
}

/// `GET /v1/models` at the server the probe's request went to, with its credentials.
fn models_request<B>(probe: &Probe) -> Option<Request<BufferedBody<B>>> {
    let path = probe.uri.path();
    // Keep any prefix before `/v1/`, as a gateway's base URL has.
    let base = path.find("/v1/").map_or("", |at| &path[..at]);
    let mut parts = probe.uri.clone().into_parts();
    parts.path_and_query = Some(format!("{base}/v1/models").parse().ok()?);
    let mut request = Request::new(BufferedBody::buffered(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = Uri::from_parts(parts).ok()?;
    for (name, value) in probe.credentials() {
        request.headers_mut().append(name.clone(), value.clone());
    }
    Some(request)
}

/// The ids of a models list: Together's bare array, or OpenAI's `{"data": [...]}`.
fn parse_models(body: &[u8]) -> Option<Vec<String>> {
    #[derive(Deserialize)]
    struct Model {
        id: String,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        Bare(Vec<Model>),
        Wrapped { data: Vec<Model> },
    }
    let models = match serde_json::from_slice::<List>(body).ok()? {
        List::Bare(models) | List::Wrapped { data: models } => models,
    };
    Some(models.into_iter().map(|model| model.id).collect())
}

/// The known ids closest to `model`, closest first: by edit distance, ignoring case, to the
/// whole id or to the name after its organisation (`meta-llama/`), whichever is closer.
///
/// Bounded work: no suggestions for a name over [`MAX_NAME_CHARS`], ids over it skipped, the
/// first [`MAX_CANDIDATES`] ids scored, each score abandoned once it cannot make the three
/// best, and no more than [`MAX_CELLS`] cells filled in all.
fn closest(model: &str, known: &[String]) -> Vec<String> {
    if model.chars().count() > MAX_NAME_CHARS {
        return Vec::new();
    }
    let wanted: Vec<char> = model.to_lowercase().chars().collect();
    let wanted_name = after_organisation(&wanted);
    // The best so far, closest first; ties keep the list's order.
    let mut best: Vec<(usize, &String)> = Vec::with_capacity(SUGGESTIONS + 1);
    let mut id_chars = Vec::new();
    let mut budget = MAX_CELLS;
    for id in known.iter().take(MAX_CANDIDATES) {
        if budget == 0 {
            break;
        }
        if id.chars().count() > MAX_NAME_CHARS {
            continue;
        }
        id_chars.clear();
        id_chars.extend(id.to_lowercase().chars());
        // A candidate must beat the worst of a full top three to matter.
        let bound = match best.get(SUGGESTIONS - 1) {
            Some((worst, _)) => worst.saturating_sub(1),
            None => usize::MAX,
        };
        let whole = edit_distance_within(&wanted, &id_chars, bound, &mut budget);
        let bound = whole.map_or(bound, |distance| distance.min(bound));
        let id_name = after_organisation(&id_chars);
        let name = edit_distance_within(wanted_name, id_name, bound, &mut budget);
        let Some(distance) = whole.into_iter().chain(name).min() else {
            continue;
        };
        let at = best.partition_point(|(other, _)| *other <= distance);
        best.insert(at, (distance, id));
        best.truncate(SUGGESTIONS);
    }
    best.into_iter().map(|(_, id)| id.clone()).collect()
}

/// The part of an id after its organisation (`meta-llama/`), or all of it.
fn after_organisation(id: &[char]) -> &[char] {
    id.iter()
        .rposition(|&c| c == '/')
        .map_or(id, |slash| &id[slash + 1..])
}

/// Levenshtein distance over characters, in one row of memory; `None` once it must exceed
/// `limit`, so that a hopeless candidate costs little, or once it would fill more cells than
/// `budget` has left (each row taken from it).
fn edit_distance_within(a: &[char], b: &[char], limit: usize, budget: &mut usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > limit {
        return None;
    }
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        *budget = budget.checked_sub(b.len().max(1))?;
        let mut diagonal = row[0];
        row[0] = i + 1;
        let mut smallest = row[0];
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != cb));
            diagonal = above;
            smallest = smallest.min(row[j + 1]);
        }
        // Every later row is at least this row's smallest.
        if smallest > limit {
            return None;
        }
    }
    Some(row[b.len()]).filter(|distance| *distance <= limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_closest_ids_come_first() {
        let known: Vec<String> = [
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "BAAI/bge-large-en-v1.5",
        ]
        .map(String::from)
        .into();
        let found = closest("meta-llama/llama-3.3-70b-instruct", &known);
        assert_eq!(found[0], "meta-llama/Llama-3.3-70B-Instruct-Turbo");
        assert_eq!(found.len(), 3);
        // Without the organisation, the name still finds it.
        assert_eq!(closest("Mixtral-8x7B-Instruct", &known)[0], known[2]);
        let chars = |text: &str| text.chars().collect::<Vec<_>>();
        let within = |a, b, limit| edit_distance_within(&chars(a), &chars(b), limit, &mut 1_000);
        assert_eq!(within("kitten", "sitting", usize::MAX), Some(3));
        assert_eq!(within("", "abc", usize::MAX), Some(3));
        assert_eq!(within("kitten", "sitting", 2), None);
        // Out of budget: no answer rather than more work.
        let mut budget = 10;
        assert_eq!(
            edit_distance_within(&chars("kitten"), &chars("sitting"), 9, &mut budget),
            None
        );
    }

    #[test]
    fn both_shapes_of_the_models_list_are_read() {
        let bare = br#"[{"id":"a","object":"model"},{"id":"b"}]"#;
        assert_eq!(parse_models(bare), Some(vec!["a".into(), "b".into()]));
        let wrapped = br#"{"object":"list","data":[{"id":"a"}]}"#;
        assert_eq!(parse_models(wrapped), Some(vec!["a".into()]));
        assert_eq!(parse_models(b"{\"error\":{}}"), None);
    }

    #[test]
    fn the_models_request_keeps_the_base_and_the_key() {
        let mut key = HeaderValue::from_static("Bearer k");
        key.set_sensitive(true);
        let chat = Request::post("https://gateway.example/together/v1/chat/completions?x=1")
            .header("authorization", key)
            .header("content-length", "12")
            .body(())
            .unwrap();
        let probe = Probe::new(&chat, "m".into());
        let request = models_request::<()>(&probe).unwrap();
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri(), "https://gateway.example/together/v1/models");
        assert_eq!(request.headers()["authorization"], "Bearer k");
        assert!(request.headers().get("content-length").is_none());
    }

    #[test]
    fn the_error_names_the_model_and_the_suggestions() {
        let error = ModelNotFound {
            model: "llama-3".into(),
            closest: vec!["a/llama-3.1".into(), "b/llama-3.3".into()],
        };
        assert_eq!(
            error.to_string(),
            r#"model "llama-3" not found; did you mean a/llama-3.1, b/llama-3.3?"#
        );
    }

    type Checked = ModelCheck<
        tower::util::BoxCloneSyncService<Request<BufferedBody<()>>, Response<String>, BoxError>,
    >;

    /// A stack below the check: chat answers a JSON 404 (or `not_found`'s own answer), and
    /// `/v1/models` answers `models`; the counter counts the list's fetches.
    fn server(
        not_found: fn() -> Response<String>,
        models: fn() -> Option<Response<String>>,
    ) -> (Checked, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let fetches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&fetches);
        let inner = tower::service_fn(move |request: Request<BufferedBody<()>>| {
            let counted = Arc::clone(&counted);
            async move {
                if request.uri().path() != "/v1/models" {
                    return Ok::<_, BoxError>(not_found());
                }
                counted.fetch_add(1, Ordering::SeqCst);
                match models() {
                    Some(response) => Ok(response),
                    None => std::future::pending().await,
                }
            }
        });
        let service = ModelCheckLayer::new().layer(tower::util::BoxCloneSyncService::new(inner));
        (service, fetches)
    }

    fn json_404() -> Response<String> {
        let mut response = Response::new(r#"{"error":{"code":"model_not_found"}}"#.to_owned());
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }

    fn to(path: &str) -> Request<BufferedBody<()>> {
        let mut request = Request::post(format!("http://together.test{path}"))
            .body(BufferedBody::buffered(Bytes::from_static(b"{}")))
            .unwrap();
        request.extensions_mut().insert(RequestMeta {
            model: Some("no-such-model".into()),
            ..RequestMeta::default()
        });
        request
    }

    /// Sends twenty 404s at once and then twenty more; each comes back as the 404 it was.
    async fn twenty_and_twenty<S>(service: &S)
    where
        S: Service<Request<BufferedBody<()>>, Response = Response<String>, Error = BoxError>
            + Clone,
    {
        use tower::ServiceExt;
        for _ in 0..2 {
            let answers = futures_util::future::join_all(
                (0..20).map(|_| service.clone().oneshot(to("/v1/chat/completions"))),
            )
            .await;
            for answer in answers {
                assert_eq!(answer.unwrap().status(), StatusCode::NOT_FOUND);
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_models_list_is_fetched_once_for_every_404() {
        fn error() -> Option<Response<String>> {
            let mut response = Response::new(String::new());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            Some(response)
        }
        fn malformed() -> Option<Response<String>> {
            Some(Response::new("[{\"id\": 1}".to_owned()))
        }
        for models in [error as fn() -> _, malformed] {
            let (service, fetches) = server(json_404, models);
            let started = Instant::now();
            twenty_and_twenty(&service).await;
            assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
            assert_eq!(started.elapsed(), Duration::ZERO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_models_list_that_never_answers_holds_a_404_for_the_fetch_timeout_only() {
        let (service, fetches) = server(json_404, || None);
        let started = Instant::now();
        twenty_and_twenty(&service).await;
        // The first twenty wait out one fetch; the next twenty find the failure remembered.
        assert_eq!(started.elapsed(), FETCH_TIMEOUT);
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Once the failure is forgotten, the list is asked for again.
        tokio::time::advance(FAILURE_TTL).await;
        twenty_and_twenty(&service).await;
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_404_about_a_path_asks_for_no_models_list() {
        use tower::ServiceExt;
        fn listed() -> Option<Response<String>> {
            Some(Response::new(r#"[{"id":"a"}]"#.to_owned()))
        }
        fn html_404() -> Response<String> {
            let mut response = Response::new("<h1>Not Found</h1>".to_owned());
            *response.status_mut() = StatusCode::NOT_FOUND;
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
            response
        }
        // A path that is no model endpoint, and a 404 page that is not JSON.
        let (service, fetches) = server(json_404, listed);
        let answer = service.oneshot(to("/v1/chat/completion")).await.unwrap();
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
        let (service, html) = server(html_404, listed);
        let answer = service.oneshot(to("/v1/chat/completions")).await.unwrap();
        assert_eq!(answer.status(), StatusCode::NOT_FOUND);
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert_eq!(html.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Together's own answer is checked.
        let (service, fetches) = server(json_404, listed);
        let error = service
            .oneshot(to("/v1/chat/completions"))
            .await
            .unwrap_err();
        assert!(error.is::<ModelNotFound>());
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn suggestions_are_bounded_work_whatever_the_name_or_list() {
        let known: Vec<String> = (0..100_000).map(|i| format!("org/model-{i}")).collect();
        // A name no id is that long gets none, without scoring anything.
        let huge = "m".repeat(512 * 1024);
        assert!(closest(&huge, &known).is_empty());
        // Only the first MAX_CANDIDATES ids are scored: an exact match beyond them is not seen.
        let found = closest("org/model-99999", &known);
        assert_eq!(found.len(), SUGGESTIONS);
        assert!(!found.contains(&"org/model-99999".to_owned()));
        assert_eq!(closest("org/model-42", &known)[0], "org/model-42");
        // Ids too long to be a model are never suggested.
        let long = vec!["x".repeat(MAX_NAME_CHARS + 1), "org/a".to_owned()];
        assert_eq!(closest("x", &long), ["org/a"]);
    }
}
