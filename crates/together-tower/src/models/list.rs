//! The models list: fetched once for every 404 waiting on it, within a timeout, kept for a
//! time to live; a failure remembered for a while.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::Body;
use http_body_util::BodyExt;
use serde::Deserialize;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tower::BoxError;
use tower_service::Service;

use crate::body::BufferedBody;
use crate::telemetry;

/// How long a fetch of the models list may take by default.
pub(super) const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a failed fetch is remembered by default.
pub(super) const FAILURE_TTL: Duration = Duration::from_secs(30);

/// The largest models list read.
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The known models, fetched once and kept for a time to live. Shared by every service of
/// one layer.
#[derive(Debug)]
pub(super) struct ModelList {
    pub(super) ttl: Duration,
    pub(super) fetch_timeout: Duration,
    pub(super) failure_ttl: Duration,
    /// Held across a fetch, so that one fetch serves every 404 that comes meanwhile.
    pub(super) cached: Mutex<Cached>,
}

/// What the last fetch of the list found.
#[derive(Debug)]
pub(super) enum Cached {
    Nothing,
    Known(Instant, Arc<[String]>),
    Failed(Instant),
}

/// What a 404 needs to ask for the models list: the model, where the request went, and its
/// credentials: the headers the layers above marked sensitive (the classifier's, so a key in
/// a header of the user's own goes too). Most requests carry one, kept without allocating.
pub(super) struct Probe {
    pub(super) model: Arc<str>,
    uri: Uri,
    credential: Option<(HeaderName, HeaderValue)>,
    more_credentials: Vec<(HeaderName, HeaderValue)>,
}

impl Probe {
    pub(super) fn new<B>(request: &Request<B>, model: Arc<str>) -> Self {
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

    /// Whether this probe is what [`Probe::new`] would make of `request` and `model`: the
    /// same model, URI and credentials. Comparing costs less than the copies it saves.
    pub(super) fn matches<B>(&self, request: &Request<B>, model: &str) -> bool {
        if *self.model != *model || self.uri != *request.uri() {
            return false;
        }
        let mut theirs = request
            .headers()
            .iter()
            .filter(|(_, value)| value.is_sensitive());
        let same = self
            .credentials()
            .all(|(name, value)| theirs.next() == Some((name, value)));
        same && theirs.next().is_none()
    }

    fn credentials(&self) -> impl Iterator<Item = &(HeaderName, HeaderValue)> {
        self.credential.iter().chain(&self.more_credentials)
    }
}

impl ModelList {
    /// The known model ids: cached, or fetched through `service` once for every caller that
    /// asks meanwhile. `None` if they cannot be had, now or in the last
    /// [`failure_ttl`](ModelCheckLayer::failure_ttl).
    pub(super) async fn get<S, B, ResBody>(
        &self,
        service: S,
        probe: &Probe,
    ) -> Option<Arc<[String]>>
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
