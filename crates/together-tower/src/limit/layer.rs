use std::fmt;

use tower_layer::Layer;

use super::backend::{Backend, LocalBackend};
use super::limits::Limits;
use super::service::RateLimit;
use crate::classify::TogetherClassifier;

/// Applies [`RateLimit`] to a service: each request waits its turn in its bucket of `limits`,
/// first come first served, before it is sent.
///
/// Every service built from one [`Limits`] shares its buckets: build the `Limits` once and
/// give each layer a clone.
#[must_use]
pub struct RateLimitLayer<C = TogetherClassifier, L = LocalBackend>
where
    L: Backend,
{
    limits: Limits<C, L>,
}

impl<C, L: Backend> RateLimitLayer<C, L> {
    /// A layer that waits in `limits`' buckets.
    pub fn new(limits: Limits<C, L>) -> Self {
        Self { limits }
    }

    /// The limits it waits in.
    pub fn limits(&self) -> &Limits<C, L> {
        &self.limits
    }
}

impl<S, C, L: Backend> Layer<S> for RateLimitLayer<C, L> {
    type Service = RateLimit<S, C, L>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limits.clone())
    }
}

impl<C, L: Backend> Clone for RateLimitLayer<C, L> {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits.clone(),
        }
    }
}

impl<C: fmt::Debug, L: Backend + fmt::Debug> fmt::Debug for RateLimitLayer<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.limits)
            .finish()
    }
}
