//! `ServiceBuilder` methods for this crate's layers.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::body::BufferBodyLayer;
use crate::limit::{Backend, Limits, RateLimitLayer};
use crate::retry::{RetryLayer, RetryPolicy};
use crate::stack::TogetherLayer;

/// Adds this crate's layers to a [`ServiceBuilder`], like tower's own `.rate_limit(...)`.
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// The whole stack around `limits`: buffer, retry, rate limit (see [`TogetherLayer`]).
    /// Stacks built from clones of one [`Limits`] share its quota.
    fn together<C: Clone, B: Backend>(
        self,
        limits: Limits<C, B>,
    ) -> ServiceBuilder<Stack<TogetherLayer<C, B>, L>>;

    /// Makes requests wait their turn in `limits` (see [`RateLimitLayer`]).
    fn together_rate_limit<C, B: Backend>(
        self,
        limits: Limits<C, B>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<C, B>, L>>;

    /// Retries by `policy` (see [`RetryLayer`]).
    fn together_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Buffers request bodies up to the default limit (see [`BufferBodyLayer`]).
    fn together_buffer_body(self) -> ServiceBuilder<Stack<BufferBodyLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn together<C: Clone, B: Backend>(
        self,
        limits: Limits<C, B>,
    ) -> ServiceBuilder<Stack<TogetherLayer<C, B>, L>> {
        self.layer(TogetherLayer::new(limits))
    }

    fn together_rate_limit<C, B: Backend>(
        self,
        limits: Limits<C, B>,
    ) -> ServiceBuilder<Stack<RateLimitLayer<C, B>, L>> {
        self.layer(RateLimitLayer::new(limits))
    }

    fn together_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(policy))
    }

    fn together_buffer_body(self) -> ServiceBuilder<Stack<BufferBodyLayer, L>> {
        self.layer(BufferBodyLayer::new())
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
