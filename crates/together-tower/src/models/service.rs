//! [`ModelCheck`], the service.

use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{Method, Request, Response};
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

use crate::body::{BufferedBody, RequestMeta};
use crate::classify::{EndpointClass, classify_path};

use super::future::{Ask, ResponseFuture, State};
use super::list::{ModelList, Probe};

/// Turns a 404 for an unknown model into [`ModelNotFound`](super::ModelNotFound); see the
/// [module docs](super).
#[derive(Debug, Clone)]
pub struct ModelCheck<S> {
    pub(super) inner: S,
    /// What every clone shares, behind one handle: a layer above that clones the service
    /// for each request (the body buffer does) copies one `Arc`.
    pub(super) shared: Arc<Shared<S>>,
}

/// What the clones of one [`ModelCheck`] share.
#[derive(Debug)]
pub(super) struct Shared<S> {
    /// A copy of the inner service to ask for the models list with: a request carries only
    /// a handle to it, and it is cloned only after a 404.
    pub(super) spare: Arc<Mutex<S>>,
    pub(super) list: Arc<ModelList>,
    /// The last request's [`Ask`], kept for the next one that would make the same: most
    /// requests through one service name the same model with the same key, and sharing
    /// spares each of them copying its URI and credentials for the rare 404. Shared by the
    /// clones, as each request may come through a clone of its own.
    pub(super) last_ask: Mutex<Option<Arc<Ask<S>>>>,
}

impl<S> ModelCheck<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
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
        let ask = request
            .extensions()
            .get::<RequestMeta>()
            .and_then(|meta| meta.model.as_ref())
            .filter(|_| names_a_model(request.method(), request.uri().path()))
            .map(|model| self.ask_for(&request, model));
        let future = self.inner.call(request);
        // Behind an `Arc`: the future stays small and moves cheaply on the happy path.
        ResponseFuture {
            state: State::Calling { future, ask },
        }
    }
}

impl<S> ModelCheck<S> {
    /// What a request naming `model` keeps for a 404: the last request's, if it is the same.
    fn ask_for<B>(&self, request: &Request<B>, model: &Arc<str>) -> Arc<Ask<S>> {
        let shared = &*self.shared;
        let mut last = shared
            .last_ask
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &*last {
            Some(ask) if ask.probe.matches(request, model) => Arc::clone(ask),
            _ => {
                let ask = Arc::new(Ask {
                    probe: Probe::new(request, Arc::clone(model)),
                    spare: Arc::clone(&shared.spare),
                    list: Arc::clone(&shared.list),
                });
                *last = Some(Arc::clone(&ask));
                ask
            }
        }
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
