//! Tower layers for Rust services that call Together AI: wait your turn instead of walking
//! into a 429, retry what is safe to retry, and still use the whole quota you pay for.
//!
//! [`TogetherLayer`] puts three layers, in the one order that works, around any HTTP client
//! that is a `Service<http::Request<B>>` (hyper-util's `Client`, a tonic `Channel`, a
//! `service_fn` in tests):
//!
//! ```text
//! caller ─► BufferLayer ─► RetryLayer ─► RateLimitLayer ─► client ─► Together
//! ```
//!
//! - [`BufferLayer`] reads the request body once, so it can be sent again, and reads its
//!   `model`, `max_tokens` and input count into a [`RequestMeta`](buffer::RequestMeta).
//! - [`RetryLayer`] retries 429s, 5xx and connection errors by the server's hints, with jittered
//!   backoff and a shared budget, and never repeats a call that may have created a paid job.
//! - [`RateLimitLayer`] makes each request wait its turn in its (API key, quota group) bucket,
//!   first come first served, bounded, cancellable, and taught by the server's 429s.
//!
//! Each works alone in any `ServiceBuilder` too.
//!
//! ```
//! use together_tower::limit::Limits;
//! use together_tower::quota::{ChatTier, QuotaTable};
//! use together_tower::ServiceBuilderExt;
//! use tower::ServiceBuilder;
//!
//! # let client = tower::service_fn(|_: http::Request<together_tower::buffer::BufferedBody<String>>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! // One `Limits` per process: every stack built from it shares its quota.
//! let limits = Limits::new(QuotaTable::chat_tier(ChatTier::Tier2));
//! let together = ServiceBuilder::new()
//!     .together(limits.clone())
//!     .service(client);
//! # let _ = together;
//! ```
//!
//! # Modules
//! - [`classify`]: which endpoint class a request calls.
//! - [`key`]: API keys: found, fingerprinted, and hidden from every print.
//! - [`quota`]: tables from classes to quota groups to limits; Together's defaults and tiers.
//! - [`limit`]: the rate limit layer, its errors and its backend trait.
//! - [`retry`]: the retry layer and its policy.
//! - [`buffer`]: the body buffering layer and the request metadata it reads.
//! - [`headers`]: parsers for the server's rate-limit and retry hints.
//! - [`clock`]: the tokio clock governor runs on, so tests can pause time.
//!
//! # Feature flags
//! - `serde`: load quota tables from TOML ([`quota::QuotaTable::from_toml`]).
//! - `full`: every feature.

pub mod buffer;
pub mod classify;
pub mod clock;
pub mod headers;
pub mod key;
pub mod limit;
pub mod quota;
pub mod retry;

mod builder;
mod stack;
#[cfg(test)]
mod test_support;

pub use self::buffer::{Buffer, BufferLayer};
pub use self::builder::ServiceBuilderExt;
pub use self::limit::{RateLimit, RateLimitLayer};
pub use self::retry::{RetryLayer, RetryPolicy};
pub use self::stack::{TogetherLayer, TogetherService};
