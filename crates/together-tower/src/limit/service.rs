use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower::BoxError;
use tower_service::Service;

use super::admission::admit::Admission;
use super::backend::{Backend, LocalBackend};
use super::future::{ResponseBody, ResponseFuture};
use super::limits::Limits;
use crate::body::RequestMeta;
use crate::classify::{Classified, Classify, TogetherClassifier};
use crate::retry::Attempt;

/// Makes each request wait its turn in its bucket before it is sent.
///
/// Built by [`RateLimitLayer`](super::RateLimitLayer); it waits in the buckets of the
/// [`Limits`] the layer was built from. See the [module docs](super) for how it decides.
pub struct RateLimit<S, C = TogetherClassifier, L = LocalBackend>
where
    L: Backend,
{
    inner: S,
    limits: Limits<C, L>,
}

impl<S, C, L: Backend> RateLimit<S, C, L> {
    /// Waits in `limits`' buckets, then calls `inner`.
    pub fn new(inner: S, limits: Limits<C, L>) -> Self {
        Self { inner, limits }
    }

    /// The limits it waits in.
    pub fn limits(&self) -> &Limits<C, L> {
        &self.limits
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Consumes the limiter, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone, C, L: Backend> Clone for RateLimit<S, C, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limits: self.limits.clone(),
        }
    }
}

impl<S: fmt::Debug, C: fmt::Debug, L: Backend + fmt::Debug> fmt::Debug for RateLimit<S, C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limits", &self.limits)
            .finish()
    }
}

impl<S, C, L, ReqBody, ResBody> Service<Request<ReqBody>> for RateLimit<S, C, L>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone,
    S::Error: Into<BoxError>,
    C: Classify,
    L: Backend,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The wait happens in the response future, once the request is known; readiness is
        // the inner service's.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let inner = &self.limits.inner;
        // The last of this crate's layers: nothing below needs the class recorded.
        let class = Classified::ensure(&inner.classifier, &mut request, false);
        // One span per attempt; its fields are worked out only if a subscriber wants it.
        let span = tracing::debug_span!(
            target: "together_tower",
            "together_tower",
            class = %class,
            model = request
                .extensions()
                .get::<RequestMeta>()
                .and_then(|meta| meta.model.as_deref())
                .map(crate::model_name::bounded_str)
                .as_deref(),
            attempt = request.extensions().get::<Attempt>().map_or(0, |attempt| attempt.0),
        );
        // Entered by guard rather than `in_scope`: a closure would move the request once more.
        let entered = span.enter();
        let admission = inner.admit(&request, class);
        match admission {
            // The inner service is ready (our `poll_ready` is its own), so call it now.
            Admission::Go {
                permit,
                ticket,
                reads_jobs,
            } => {
                let future = self.inner.call(request);
                drop(entered);
                ResponseFuture::calling(future, permit, ticket, span).reading_jobs(reads_jobs)
            }
            // A waiting request takes an unready clone, so that it holds none of the inner
            // service's capacity while it waits; it drives `poll_ready` once its turn comes.
            Admission::Wait {
                turn,
                ticket,
                reads_jobs,
            } => {
                drop(entered);
                ResponseFuture::waiting(turn, self.inner.clone(), request, ticket, span)
                    .reading_jobs(reads_jobs)
            }
            Admission::Refuse(error) => {
                drop(entered);
                ResponseFuture::refused(error, span)
            }
        }
    }
}
