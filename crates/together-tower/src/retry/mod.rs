//! Retrying what is safe to retry, when the server says, within a budget.
//!
//! [`RetryLayer`] is tower's own [`Retry`] middleware with a [`RetryPolicy`] that knows
//! Together: it honours the server's retry hints, backs off with jitter when there are none,
//! shares a retry budget, and never repeats a call that may have created a paid job. See
//! [`RetryPolicy`] for the rules.
//!
//! Put it outside [`RateLimitLayer`](crate::limit::RateLimitLayer), so every attempt waits its
//! turn again, and inside [`BufferLayer`](crate::buffer::BufferLayer), so the body can be sent
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

use tower_layer::Layer;

pub use self::policy::{JobSlotWait, RetryBody, RetryPolicy, X_SHOULD_RETRY};
pub use tower::retry::Retry;

use crate::classify::TogetherClassifier;

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
    type Service = Retry<RetryPolicy<C>, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Retry::new(self.policy.clone(), inner)
    }
}

#[cfg(test)]
mod tests;
