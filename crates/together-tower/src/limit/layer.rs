use std::fmt;

use tower_layer::Layer;

use super::backend::{Limiter, LocalLimiter};
use super::limits::Limits;
use super::service::RateLimit;
use crate::classify::TogetherClassifier;

/// Applies [`RateLimit`] to a service: each request waits its turn in its bucket of `limits`,
/// first come first served, before it is sent.
///
/// Every service built from one [`Limits`] shares its buckets: build the `Limits` once and
/// give each layer a clone.
#[must_use]
pub struct RateLimitLayer<C = TogetherClassifier, L = LocalLimiter>
where
    L: Limiter,
{
    limits: Limits<C, L>,
}

impl<C, L: Limiter> RateLimitLayer<C, L> {
    /// A layer that waits in `limits`' buckets.
    pub fn new(limits: Limits<C, L>) -> Self {
        Self { limits }
    }

    /// The limits it waits in.
    pub fn limits(&self) -> &Limits<C, L> {
        &self.limits
    }
}

impl<S, C, L: Limiter> Layer<S> for RateLimitLayer<C, L> {
    type Service = RateLimit<S, C, L>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, self.limits.clone())
    }
}

impl<C, L: Limiter> Clone for RateLimitLayer<C, L> {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits.clone(),
        }
    }
}

impl<C: fmt::Debug, L: Limiter + fmt::Debug> fmt::Debug for RateLimitLayer<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.limits)
            .finish()
    }
}
