//! Reading a request body once, so it can be sent again and its JSON read.
//!
//! [`BufferBodyLayer`] collects the request body, up to a limit, into a [`BufferedBody`] that is
//! cheap to clone, so the retry layer can send the request again. While it holds the bytes it
//! reads the few JSON fields later layers decide by (`model`, `max_tokens`, the number of
//! `input` items) into a [`RequestMeta`] request extension.
//!
//! A body over the limit is not refused: it is passed on as a stream (the part already read
//! first) and marked with [`BodyNotBuffered`], so it is sent once and never retried. A body
//! that is not JSON is passed on untouched, without a `RequestMeta`.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use together_tower::body::{BufferBodyLayer, BufferedBody, RequestMeta};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let client = tower::service_fn(|request: Request<BufferedBody<Full<Bytes>>>| async move {
//!     let meta = request.extensions().get::<RequestMeta>().cloned().unwrap_or_default();
//!     Ok::<_, tower::BoxError>(Response::new(meta.model.as_deref().unwrap_or_default().to_owned()))
//! });
//! let mut together = ServiceBuilder::new().layer(BufferBodyLayer::new()).service(client);
//!
//! let body = Full::new(Bytes::from_static(br#"{"model":"m-1","messages":[]}"#));
//! let request = Request::post("/v1/chat/completions").body(body)?;
//! let response = together.ready().await?.call(request).await?;
//! assert_eq!(response.body(), "m-1");
//! # Ok(())
//! # }
//! ```

mod buffered;
pub mod future;
mod meta;
pub(crate) mod model;

use std::task::{Context, Poll, Waker};

use http::Request;
use http_body::Body;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

pub use self::buffered::BufferedBody;
pub use self::meta::RequestMeta;

/// A request extension that marks a request whose body was too large to buffer: it streams
/// through once and is never retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyNotBuffered;

/// Applies [`BufferBody`]: buffers request bodies up to a size (default 4 MiB) and reads their
/// [`RequestMeta`].
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct BufferBodyLayer {
    limit: usize,
}

impl BufferBodyLayer {
    /// The default limit: 4 MiB, well above any chat or embeddings request.
    pub const DEFAULT_LIMIT: usize = 4 * 1024 * 1024;

    /// A layer with the default limit.
    pub const fn new() -> Self {
        Self {
            limit: Self::DEFAULT_LIMIT,
        }
    }

    /// Buffers bodies of at most `limit` bytes; larger ones stream through once.
    pub const fn with_limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

impl Default for BufferBodyLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for BufferBodyLayer {
    type Service = BufferBody<S>;

    fn layer(&self, inner: S) -> BufferBody<S> {
        BufferBody {
            inner,
            limit: self.limit,
        }
    }
}

/// Buffers each request's body (see the [module docs](self)) before it calls the inner service.
///
/// A body that is whole already (bytes, a string, a `Full`) is read in `call`, and the inner
/// service is called there and then: it was made ready by `poll_ready`. A body that must be
/// waited for is read by the response future, which carries the ready service; the layer
/// keeps a clone of it for the next request.
#[derive(Debug, Clone)]
pub struct BufferBody<S> {
    inner: S,
    limit: usize,
}

impl<S> BufferBody<S> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for BufferBody<S>
where
    S: Service<Request<BufferedBody<B>>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = future::ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        crate::key::hide_credentials(request.headers_mut());
        let mut collected = future::Collected::new(request, self.limit);
        // A body that is whole already (bytes, a string, a `Full`) is read here, and the
        // request sent at once by the service our `poll_ready` made ready. A body that must be
        // waited for keeps what was read; the ready service goes with it, and a clone stays.
        // Polling here with a waker that does nothing is safe: a body that says `Pending` is
        // polled again from the future, with the task's waker, before anything waits on it.
        match collected.poll_read(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(request)) => future::ResponseFuture::calling(self.inner.call(request)),
            Poll::Ready(Err(error)) => future::ResponseFuture::failed(error),
            Poll::Pending => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                future::ResponseFuture::reading(inner, collected)
            }
        }
    }
}

#[cfg(test)]
mod tests;
