use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

/// A tonic `Channel` (or any service of `http::Request<tonic::body::Body>`) that takes any
/// request body, so the stack can sit on it.
///
/// A channel takes tonic's own body type; the stack sends its
/// [`BufferedBody`](crate::body::BufferedBody). This turns one into the other, and refusals
/// become `Status` codes with [`into_status`](crate::limit::error::into_status). Give the stack
/// a classifier of your own for your service's gRPC paths: the default one knows only
/// Together's HTTP paths, and classifies the rest as unlimited.
///
/// ```
/// use together_tower::client::Tonic;
/// use together_tower::limit::error::into_status;
/// use together_tower::{Limits, TogetherLayer};
/// use tower::ServiceBuilder;
/// # let channel = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
/// #     Ok::<_, tonic::Status>(http::Response::new(tonic::body::Body::empty()))
/// # });
///
/// let stack = ServiceBuilder::new()
///     .map_err(into_status)
///     .layer(TogetherLayer::new(Limits::default()))
///     .service(Tonic::new(channel));
/// # let _ = stack;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Tonic<S> {
    inner: S,
}

impl<S> Tonic<S> {
    /// Sends through `inner`.
    pub fn new(inner: S) -> Self {
        Self { inner }
    }

    /// The service it sends through.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Gives back the service it sends through.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<http::Request<B>> for Tonic<S>
where
    S: Service<http::Request<tonic::body::Body>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        self.inner.call(request.map(tonic::body::Body::new))
    }
}
