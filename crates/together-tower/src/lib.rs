//! Tower layers for Rust services that call Together AI: wait your turn instead of walking
//! into a 429, retry what is safe to retry, and still use the whole quota you pay for.
//!
//! [`TogetherLayer`] puts four layers, in the one order that works, around any HTTP client
//! that is a `Service<http::Request<B>>`: hyper-util's `Client`, reqwest or a tonic `Channel`
//! through [`client`], a `service_fn` in tests.
//!
//! ```text
//! caller ─► BufferBodyLayer ─► ModelCheckLayer ─► RetryLayer ─► RateLimitLayer ─► client ─► Together
//! ```
//!
//! - [`BufferBodyLayer`](body::BufferBodyLayer) reads the request body once, so it can be
//!   sent again, and reads its `model`, `max_tokens` and input count into a
//!   [`RequestMeta`](body::RequestMeta).
//! - [`ModelCheckLayer`](models::ModelCheckLayer) turns a 404 for an unknown model into
//!   [`ModelNotFound`](models::ModelNotFound), naming the closest models of `GET /v1/models`.
//! - [`RetryLayer`](retry::RetryLayer) retries 429s, 5xx and connection errors by the
//!   server's hints, with jittered backoff and a shared budget, never repeats a call that
//!   may have created a paid job, and can fall back to another model after a 503.
//! - [`RateLimitLayer`](limit::RateLimitLayer) makes each request wait its turn in its (API
//!   key, quota group, model) bucket, first come first served, bounded, cancellable, and taught
//!   by the server's answers; a fine-tune or batch holds its key's job slot until it ends.
//!
//! Each works alone in any `ServiceBuilder` too. The buckets live in a [`Limits`]: build one
//! per process and give a clone to every stack, and they all share one quota.
//!
//! ```
//! use together_tower::quota::{ChatTier, QuotaTable};
//! use together_tower::{Limits, ServiceBuilderExt};
//! use tower::ServiceBuilder;
//!
//! # let client = tower::service_fn(|_: http::Request<together_tower::body::BufferedBody<String>>| async {
//! #     Ok::<_, std::convert::Infallible>(http::Response::new(String::new()))
//! # });
//! let limits = Limits::new(QuotaTable::chat_tier(ChatTier::Tier2));
//! let together = ServiceBuilder::new()
//!     .together(limits.clone())
//!     .service(client);
//! # let _ = together;
//! ```
//!
//! The [`guide`] says how to choose quotas, what happens on a 429 and a 503, and how to test
//! code that calls Together.
//!
//! # Modules
//! - [`classify`]: which endpoint class a request calls.
//! - [`key`]: API keys: found, fingerprinted, and hidden from every print.
//! - [`quota`]: tables from classes to quota groups to limits; Together's defaults and tiers.
//! - [`limit`]: the shared [`Limits`], the rate limit layer, its errors and its backend trait.
//! - [`retry`]: the retry layer and its policy, model fallbacks among them.
//! - [`models`]: the model check.
//! - [`embeddings`]: long input lists split into requests of 20, put back in order.
//! - [`body`]: the body buffering layer and the request metadata it reads.
//! - [`client`]: clients the stack sits on, beside hyper-util's.
//! - [`headers`]: parsers for the server's rate-limit and retry hints.
//! - [`clock`]: the tokio clock the limiter runs on, so tests can pause time.
//! - `test_util` (feature `test-util`): Together's answers and a fake Together for unit tests.
//!
//! # Tracing and metrics
//! Every attempt runs in a `tracing` span named `together_tower`, with its `class`, `model` and
//! `attempt`. Events, all with target `together_tower`:
//!
//! | event | level | fields |
//! |---|---|---|
//! | waiting for a turn | debug | class, model, position, expected_wait_ms |
//! | turn taken, or gave up its place | debug | class, model, priority, tenant, waited_ms |
//! | refused before sending | debug | class, reason, error |
//! | the server refused | debug | class, model, status |
//! | bucket closed by the server | info | key (fingerprint), group, model, pause_ms, reason |
//! | rate changed | info | key (fingerprint), group, model, from_per_second, to_per_second, reason |
//! | retrying | info | class, attempt, reason, delay_ms, retries_left |
//! | giving up | info | class, attempts, reason |
//! | falling back to another model | info | class, from, to |
//! | job slot held | debug | key (fingerprint), group, held |
//! | job slot released | debug | key (fingerprint), group, reason (`ended`, `expired`, `not_listed`) |
//! | 409: every job slot is in use at the server | info | key (fingerprint), group, taken, recheck_ms |
//! | models list fetched | debug | models |
//! | models list unavailable: 404s pass through unchecked | warn | why, retry_in_s |
//! | an answer's usage is larger than the token burst | warn | key (fingerprint), group, model, reported, charged |
//! | token charge settled (from the answer's `usage`; for a stream, at its `data: [DONE]`) | trace | key (fingerprint), group, model, charged, used |
//! | an answer ended without its usage: its estimate stays charged | debug | key (fingerprint), group, model, charged |
//!
//! With the `metrics` feature, the same goes to the `metrics` facade. Labels are bounded: the
//! class or quota group, the model (at most 64 names at once, then `other`; a name unused for
//! ten minutes gives its place to one used 100 times since), a coarse status or reason; never
//! a key. Model names over 128 bytes, in labels, events and buckets alike, are cut to a prefix
//! and a hash.
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `together_tower_requests_total` | counter | class, model | requests sent to the server |
//! | `together_tower_answers_total` | counter | class, model, status | answers, by status (`2xx`, `429`, `503`, `4xx`, `5xx`, `error`) |
//! | `together_tower_refused_total` | counter | class, reason | requests the limiter refused itself (`rate_limited`, `queue_full`, `slots_busy`, `too_many_tokens`, `too_many_buckets`) |
//! | `together_tower_wait_seconds` | histogram | class | how long sent requests waited for their turn |
//! | `together_tower_waiting` | gauge | class, model | requests waiting for a turn |
//! | `together_tower_queue_wait_seconds` | histogram | priority | how long requests that waited in a queue waited, by [`Priority`](limit::Priority) |
//! | `together_tower_queued_turns_total` | counter | priority, tenant | turns taken by requests that waited, by priority and [`Tenant`](limit::Tenant) (`none` for requests that name none) |
//! | `together_tower_rate_per_second` | gauge | group, model | the request rate in force, after each change |
//! | `together_tower_rate_changes_total` | counter | group, reason | changes of the request rate, by why: `stated limit`, `unexpected 429`, `503s above the noise`, `503s were noise` |
//! | `together_tower_retries_total` | counter | class, reason | retries sent (`429`, `503`, `5xx`, `connection`, ...) |
//! | `together_tower_retries_refused_total` | counter | class, reason | retries not sent (`budget`, `max_retries`, `max_elapsed`, `hint_too_long`) |
//! | `together_tower_fallbacks_total` | counter | class, from, to | retries sent with a fallback model |
//! | `together_tower_job_slots_held` | gauge | group | job slots held by running jobs (and by placeholders after a 409) |
//! | `together_tower_usage_not_believed_total` | counter | group | answers whose `usage` was larger than the token burst |
//! | `together_tower_tokens_returned_total` | counter | group | tokens given back to the budget: estimates over what answers used, and requests not served |
//! | `together_tower_estimates_kept_total` | counter | group | answers that ended without their `usage` (a stream dropped or cut before it): the estimate stays charged |
//! | `together_tower_models_list_failures_total` | counter | | failed fetches of the models list |
//!
//! # Feature flags
//! - `toml`: load quota tables from TOML ([`quota::QuotaTable::from_toml`]).
//! - `metrics`: the metrics above.
//! - `reqwest`: `client::Reqwest`, a `reqwest::Client` the stack can sit on.
//! - `async-openai`: `client::async_openai::http_service`, the stack as async-openai's HTTP
//!   service.
//! - `tonic`: `client::Tonic`, a tonic `Channel` the stack can sit on, and
//!   `limit::error::into_status`, refusals as gRPC statuses.
//! - `test-util`: `test_util`, for unit tests of code that calls Together.
//! - `full`: every feature.

pub mod body;
pub mod classify;
pub mod client;
#[doc = include_str!("../../../docs/guide.md")]
pub mod guide {}
pub mod clock;
pub mod embeddings;
pub mod headers;
pub mod key;
pub mod limit;
pub mod models;
pub mod quota;
pub mod retry;

#[cfg(feature = "test-util")]
pub mod test_util;

mod builder;
#[cfg(test)]
mod harness;
mod model_name;
mod stack;
mod telemetry;

pub use self::builder::ServiceBuilderExt;
pub use self::limit::Limits;
pub use self::stack::{TogetherLayer, TogetherService};
