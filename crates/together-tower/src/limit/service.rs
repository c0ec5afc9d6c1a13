use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use http_body::Body;
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
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, ReqBody, L>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The wait happens in the response future, once the request is known; readiness is
        // the inner service's.
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    // Small enough to inline into the caller, so that the request and the inner future are
    // moved as few times as they can be: admission, which reads the request, is a function of
    // its own.
    #[inline]
    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let (admission, span) = self.admit(&mut request);
        match admission {
            // The inner service is ready (our `poll_ready` is its own), so call it now.
            Admission::Go {
                permit,
                ticket,
                reads_jobs,
            } => {
                let future = span.in_scope(|| self.inner.call(request));
                ResponseFuture::calling(future, permit, ticket, reads_jobs, span)
            }
            // A waiting request takes an unready clone, so that it holds none of the inner
            // service's capacity while it waits; it drives `poll_ready` once its turn comes.
            Admission::Wait {
                turn,
                ticket,
                reads_jobs,
            } => {
                let service = self.inner.clone();
                ResponseFuture::waiting(turn, service, request, ticket, reads_jobs, span)
            }
            Admission::Refuse(error) => ResponseFuture::refused(error, span),
        }
    }
}

impl<S, C: Classify, L: Backend> RateLimit<S, C, L> {
    /// Classifies the request and decides on it, in its span: one span per attempt, whose
    /// fields are worked out only if a subscriber wants it.
    fn admit<B>(&self, request: &mut Request<B>) -> (Admission<L>, tracing::Span) {
        let inner = &self.limits.inner;
        // The last of this crate's layers: nothing below needs the class recorded.
        let class = Classified::ensure(&inner.classifier, request, false);
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
        let admission = span.in_scope(|| inner.admit(request, class));
        (admission, span)
    }
}
