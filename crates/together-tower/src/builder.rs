//! `ServiceBuilder` methods for this crate's layers.

use tower::ServiceBuilder;
use tower_layer::Stack;

use crate::limit::RateLimitLayer;
use crate::quota::QuotaTable;

/// Adds this crate's layers to a [`ServiceBuilder`], like tower's own `.rate_limit(...)`.
pub trait ServiceBuilderExt<L>: sealed::Sealed {
    /// Makes requests wait their turn under `table` (see [`RateLimitLayer`]). For other settings,
    /// use `.layer(RateLimitLayer::new(table).with_...(...))`.
    fn together_rate_limit(self, table: QuotaTable) -> ServiceBuilder<Stack<RateLimitLayer, L>>;
}

impl<L> ServiceBuilderExt<L> for ServiceBuilder<L> {
    fn together_rate_limit(self, table: QuotaTable) -> ServiceBuilder<Stack<RateLimitLayer, L>> {
        self.layer(RateLimitLayer::new(table))
    }
}

mod sealed {
    pub trait Sealed {}
    impl<L> Sealed for tower::ServiceBuilder<L> {}
}
