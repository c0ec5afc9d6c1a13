//! Client-side rate limiting: wait your turn instead of walking into a 429.
//!
//! [`RateLimitLayer`] gives every request a bucket, one per (API key fingerprint, quota group)
//! of its [`QuotaTable`](crate::quota::QuotaTable), and lets it go when the bucket's GCRA quota
//! (governor) and concurrency slots allow.
//!
//! - **Fair.** Waiters of a bucket are served first come, first served. Only the head waiter
//!   asks the backend and sleeps, for exactly the time it is told; there is no thundering herd.
//!   When nobody waits, a request that fits the quota goes straight through.
//! - **Bounded.** A bucket holds at most `max_queue` waiters, and a request waits at most
//!   `max_wait` (or its own [`MaxWait`]); past either it gets [`error::QueueFull`] or
//!   [`error::RateLimited`] at once. Nothing waits forever.
//! - **Cancellable.** Dropping a waiting future gives up its place and takes nothing.
//! - **Taught by the server.** A 429 closes its bucket for the server's `retry-after-ms`,
//!   `Retry-After` or `x-ratelimit-reset` (1 s without a hint), and a response saying
//!   `x-ratelimit-remaining: 0` closes it until `x-ratelimit-reset`, so other waiters do not
//!   walk into the same wall. Hints are clamped to `max_pause`.
//! - **Bounded memory.** Idle buckets are dropped, and at most `max_buckets` are kept.
//!
//! The wait happens inside the response future, because the bucket is only known once the
//! request is: `poll_ready` forwards to the inner service.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use together_tower::limit::RateLimitLayer;
//! use together_tower::quota::QuotaTable;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! # let client = tower::service_fn(|_: Request<String>| async {
//! #     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//! # });
//! let mut together = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(QuotaTable::together_defaults()).with_max_wait(Duration::from_secs(10)))
//!     .service(client);
//!
//! let request = Request::post("https://api.together.xyz/v1/chat/completions")
//!     .header("authorization", "Bearer my-key")
//!     .body(r#"{"model":"m","messages":[]}"#.to_owned())?;
//! let response = together.ready().await?.call(request).await?;
//! # assert_eq!(response.status(), 200);
//! # Ok(())
//! # }
//! ```

mod backend;
mod bucket;
pub mod error;
pub mod future;
mod layer;
mod service;

use std::time::Duration;

pub use self::backend::{BucketSpec, Decision, GovernorBucket, GovernorLimiter, Limiter};
pub use self::layer::RateLimitLayer;
pub use self::service::RateLimit;

/// A request extension that sets how long this request may wait for its turn, overriding the
/// layer's `max_wait`. `MaxWait(Duration::ZERO)` means "send now or fail".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxWait(pub Duration);

#[cfg(test)]
mod tests;
