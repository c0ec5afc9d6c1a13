//! [`ModelCheck`], the service.

use std::sync::Arc;
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
    /// A copy of the inner service to ask for the models list with, shared by every clone:
    /// a request carries only a handle to it, and it is cloned only after a 404.
    pub(super) spare: Arc<std::sync::Mutex<S>>,
    pub(super) list: Arc<ModelList>,
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
