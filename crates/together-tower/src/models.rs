//! The model check: a 404 for an unknown model becomes a typed error naming the closest
//! known models.
//!
//! Together answers 404 `model_not_found` to a request naming a model it does not serve, and
//! its guidance is to look at `GET /v1/models`. [`ModelCheck`] does that for the caller: on a
//! 404 to a request that named a model, it fetches the list through the same stack (so the
//! call waits its turn and is retried like any other), caches it for a time to live (10 min
//! by default), and if the model is not on it, answers [`ModelNotFound`] with the closest
//! ids. Answers other than 404 pass untouched, and cost no call: the happy path never asks
//! for the list. A 404 for a model that is listed (or when the list cannot be had) reaches the
//! caller unchanged.
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
use http::header::{HeaderName, HeaderValue};
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

/// How many close model ids a [`ModelNotFound`] names at most.
const SUGGESTIONS: usize = 3;

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
    cached: Mutex<Option<(Instant, Arc<[String]>)>>,
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
        Self {
            list: Arc::new(ModelList {
                ttl,
                cached: Mutex::new(None),
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
        // Only requests that name a model can meet `model_not_found`.
        let probe = request
            .extensions()
            .get::<RequestMeta>()
            .and_then(|meta| meta.model.clone())
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
                        Some(ask) if response.status() == StatusCode::NOT_FOUND => {
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

impl ModelList {
    /// The known model ids: cached, or fetched through `service` once for every caller that
    /// asks meanwhile. `None` if they cannot be had.
    async fn get<S, B, ResBody>(&self, service: S, probe: &Probe) -> Option<Arc<[String]>>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>,
        ResBody: Body,
        ResBody::Error: Into<BoxError>,
    {
        use tower::ServiceExt;
        let mut cached = self.cached.lock().await;
        if let Some((fetched, models)) = &*cached {
            if fetched.elapsed() < self.ttl {
                return Some(Arc::clone(models));
            }
        }
        let request = models_request(probe)?;
        let response = service.oneshot(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_LIST_BYTES)
            .collect()
            .await
            .ok()?
            .aggregate();
        let models: Arc<[String]> = parse_models(body.chunk())?.into();
        *cached = Some((Instant::now(), Arc::clone(&models)));
        tracing::debug!(target: "together_tower", models = models.len(), "models list fetched");
        Some(models)
    }
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
fn closest(model: &str, known: &[String]) -> Vec<String> {
    let wanted = model.to_lowercase();
    let wanted_name = wanted.rsplit('/').next().unwrap_or(&wanted);
    let mut scored: Vec<(usize, &String)> = known
        .iter()
        .map(|id| {
            let id_lower = id.to_lowercase();
            let name = id_lower.rsplit('/').next().unwrap_or(&id_lower);
            let distance = edit_distance(&wanted, &id_lower).min(edit_distance(wanted_name, name));
            (distance, id)
        })
        .collect();
    scored.sort();
    scored
        .into_iter()
        .take(SUGGESTIONS)
        .map(|(_, id)| id.clone())
        .collect()
}

/// Levenshtein distance over characters, in one row of memory.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
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
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
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
}
