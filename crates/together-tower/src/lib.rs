//! Tower layers that keep a Together AI client under its rate limits.
//!
//! Put [`RateLimitLayer`] around any HTTP client that is a
//! `Service<http::Request<B>>` (hyper-util's `Client`, a tonic `Channel`, a `service_fn` in
//! tests) and each request waits its turn in its (API key, endpoint class) bucket instead of
//! walking into a 429, while the client still uses the whole quota it pays for.
//!
//! ```
//! use together_tower::quota::{ChatTier, QuotaTable};
//! use together_tower::ServiceBuilderExt;
//! use tower::ServiceBuilder;
//!
//! # let client = tower::service_fn(|_: http::Request<String>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! let together = ServiceBuilder::new()
//!     .together_rate_limit(QuotaTable::chat_tier(ChatTier::Tier2))
//!     .service(client);
//! # let _ = together;
//! ```
//!
//! # Modules
//! - [`classify`]: which endpoint class a request calls, and the fingerprint of its API key.
//! - [`quota`]: tables from classes to quota groups to limits; Together's defaults and tiers.
//! - [`limit`]: the rate limit layer, its errors and its backend trait.
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
pub mod limit;
pub mod quota;
pub mod retry;

mod builder;
mod stack;

pub use self::buffer::{Buffer, BufferLayer};
pub use self::builder::ServiceBuilderExt;
pub use self::limit::{RateLimit, RateLimitLayer};
pub use self::retry::{RetryLayer, RetryPolicy};
pub use self::stack::{TogetherLayer, TogetherService};
