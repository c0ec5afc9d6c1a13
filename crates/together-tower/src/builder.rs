//! `ServiceBuilder` methods for this crate's layers.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::buffer::BufferLayer;
use crate::limit::RateLimitLayer;
use crate::quota::QuotaTable;
use crate::retry::{RetryLayer, RetryPolicy};
use crate::stack::TogetherLayer;

/// Adds this crate's layers to a [`ServiceBuilder`], like tower's own `.rate_limit(...)`.
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// The whole stack: buffer, retry, rate limit (see [`TogetherLayer`]).
    fn together(self, table: QuotaTable) -> ServiceBuilder<Stack<TogetherLayer, L>>;

    /// Makes requests wait their turn under `table` (see [`RateLimitLayer`]). For other settings,
    /// use `.layer(RateLimitLayer::new(table).with_...(...))`.
    fn together_rate_limit(self, table: QuotaTable) -> ServiceBuilder<Stack<RateLimitLayer, L>>;

    /// Retries by `policy` (see [`RetryLayer`]).
    fn together_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>>;

    /// Buffers request bodies up to the default limit (see [`BufferLayer`]).
    fn together_buffer(self) -> ServiceBuilder<Stack<BufferLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn together(self, table: QuotaTable) -> ServiceBuilder<Stack<TogetherLayer, L>> {
        self.layer(TogetherLayer::new(table))
    }

    fn together_rate_limit(self, table: QuotaTable) -> ServiceBuilder<Stack<RateLimitLayer, L>> {
        self.layer(RateLimitLayer::new(table))
    }

    fn together_retry(self, policy: RetryPolicy) -> ServiceBuilder<Stack<RetryLayer, L>> {
        self.layer(RetryLayer::new(policy))
    }

    fn together_buffer(self) -> ServiceBuilder<Stack<BufferLayer, L>> {
        self.layer(BufferLayer::new())
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
