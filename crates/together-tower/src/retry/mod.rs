//! Retrying what is safe to retry, when the server says, within a budget.
//!
//! [`RetryLayer`] is tower's own [`Retry`] middleware with a [`RetryPolicy`] that knows
//! Together: it honours the server's retry hints, backs off with jitter when there are none,
//! shares a retry budget, and never repeats a call that may have created a paid job. See
//! [`RetryPolicy`] for the rules.
//!
//! Put it outside [`RateLimitLayer`](crate::limit::RateLimitLayer), so every attempt waits its
//! turn again, and inside [`BufferBodyLayer`](crate::body::BufferBodyLayer), so the body can be sent
//! again. [`TogetherLayer`](crate::TogetherLayer) composes the three in that order. The inner
//! service's error must be a [`BoxError`](tower::BoxError), as the rate limit layer's is.
//!
//! # Example
//!
//! ```
//! use http::{Request, Response, StatusCode};
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use std::sync::Arc;
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use together_tower::retry::{RetryLayer, RetryPolicy};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower::BoxError> {
//! let calls = Arc::new(AtomicUsize::new(0));
//! let counter = Arc::clone(&calls);
//! // A server that is overloaded once, then answers.
//! let client = tower::service_fn(move |_: Request<String>| {
//!     let status = match counter.fetch_add(1, Ordering::SeqCst) {
//!         0 => StatusCode::SERVICE_UNAVAILABLE,
//!         _ => StatusCode::OK,
//!     };
//!     async move { Ok::<_, tower::BoxError>(Response::builder().status(status).body(String::new())?) }
//! });
//! let mut together = ServiceBuilder::new().layer(RetryLayer::new(RetryPolicy::new())).service(client);
//!
//! let request = Request::post("/v1/chat/completions").body(String::new())?;
//! let response = together.ready().await?.call(request).await?;
//! assert_eq!(response.status(), StatusCode::OK);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! # Ok(())
//! # }
//! ```

mod delivery;
mod policy;

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Request;
use tower::retry::budget::{Budget, TpsBudget};
use tower_layer::Layer;
use tower_service::Service;

pub use self::policy::{Attempt, ModelFallback, RetryBody, RetryPolicy, X_SHOULD_RETRY};

use crate::classify::{Classify, TogetherClassifier};

/// The response future of [`Retry`]: tower's own.
pub mod future {
    pub use tower::retry::future::ResponseFuture;
}

/// Applies tower's [`Retry`] with a [`RetryPolicy`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RetryLayer<C = TogetherClassifier> {
    policy: RetryPolicy<C>,
}

impl<C> RetryLayer<C> {
    /// A layer that retries by `policy`. Every service it builds shares the policy's budget.
    pub fn new(policy: RetryPolicy<C>) -> Self {
        Self { policy }
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy<C> {
        &self.policy
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new(RetryPolicy::new())
    }
}

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry {
            classifier: self.policy.classifier().clone(),
            budget: Arc::clone(self.policy.budget()),
            inner: tower::retry::Retry::new(self.policy.clone(), inner),
        }
    }
}

/// Retries requests by a [`RetryPolicy`]: tower's [`Retry`](tower::retry::Retry), around
/// which each request, as it enters,
/// - has its credential headers marked sensitive, so that neither the copy kept to send again
///   nor the request passed on prints the key;
/// - is deposited in the retry budget (each request earns its share of retries);
/// - is stamped with when it was first sent, from which `max_elapsed` counts.
#[derive(Debug, Clone)]
pub struct Retry<S, C = TogetherClassifier> {
    inner: tower::retry::Retry<RetryPolicy<C>, S>,
    // tower's `Retry` does not lend out its policy, so what the entrance needs comes along.
    classifier: C,
    budget: Arc<TpsBudget>,
}

impl<S, C> Retry<S, C> {
    /// The inner service.
    pub fn get_ref(&self) -> &S {
        self.inner.get_ref()
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        self.inner.get_mut()
    }

    /// Consumes the layer, returning the inner service.
    pub fn into_inner(self) -> S {
        self.inner.into_inner()
    }
}

impl<S, C, B> Service<Request<B>> for Retry<S, C>
where
    C: Classify + Clone,
    tower::retry::Retry<RetryPolicy<C>, S>: Service<Request<B>>,
    RetryPolicy<C>: tower::retry::Policy<
            Request<B>,
            <S as Service<Request<B>>>::Response,
            <S as Service<Request<B>>>::Error,
        >,
    S: Service<Request<B>> + Clone,
{
    type Response = <tower::retry::Retry<RetryPolicy<C>, S> as Service<Request<B>>>::Response;
    type Error = <tower::retry::Retry<RetryPolicy<C>, S> as Service<Request<B>>>::Error;
    type Future = <tower::retry::Retry<RetryPolicy<C>, S> as Service<Request<B>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<B>) -> Self::Future {
        // Classified once, for the policy's decisions and for the rate limit below.
        crate::classify::Classified::ensure(&self.classifier, &mut request, true);
        crate::classify::Classified::note_first_sent(&mut request);
        self.budget.deposit();
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests;
