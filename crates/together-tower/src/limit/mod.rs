//! Client-side rate limiting: wait your turn instead of walking into a 429.
//!
//! [`Limits`] holds the buckets: one per (API key fingerprint, quota group, and model for
//! groups limited per model) of its [`QuotaTable`](crate::quota::QuotaTable). Build it once and
//! give a clone to every [`RateLimitLayer`] that should share it. A request goes when its
//! bucket's request rate, token budget and concurrency slots all allow.
//!
//! - **Fair.** Waiters of a bucket are served first come, first served, and a request the
//!   retry layer sends again goes before those not sent yet. Only the head waiter asks the
//!   backend and sleeps, for exactly the time it is told; there is no thundering herd. When
//!   nobody waits, a request that fits goes straight through.
//! - **Priorities and fair shares.** A request may say how urgent it is ([`Priority`]) and
//!   whom it is for ([`Tenant`]), as extensions, or the limits may read both from its headers
//!   ([`tenant_from`](LimitsBuilder::tenant_from),
//!   [`priority_from`](LimitsBuilder::priority_from)). A waiting interactive request goes
//!   before normal ones, and they before background ones; a less urgent priority keeps a
//!   minimum share of the turns while it waits (20% for normal, 10% for background:
//!   [`min_share`](LimitsBuilder::min_share)), and each may have its own `max_wait`
//!   ([`priority_max_wait`](LimitsBuilder::priority_max_wait)). Within a priority, the tenants
//!   that wait share the turns by their weights
//!   ([`tenant_weight`](LimitsBuilder::tenant_weight), equal by default), each request counted
//!   by its cost (its tokens in a bucket with a token budget): start-time fair queuing, so a
//!   tenant that stops waiting leaves its share to the others at once, and one that comes back
//!   gets its share from its next request. A tenant may be capped at a rate or a share of a
//!   bucket's quota ([`tenant_cap`](LimitsBuilder::tenant_cap)), even when no one else
//!   waits: a request over its cap waits for its tenant's next turn before it joins the
//!   queue, so it never holds up the others. Neither is sent upstream (a header the limits read
//!   them from is the caller's to remove). A service that names neither keeps the order
//!   above. With a shared backend (Redis) the quota stays one for every process, and each
//!   process orders its own waiters: priorities and shares hold within a process, not across
//!   processes.
//! - **Both quotas at once.** A request's turn takes its request and its estimated tokens
//!   together, or neither: one quota's wait never spends the other's capacity. The token
//!   charge is corrected from the answer's `usage`, once: when the body ends, when a
//!   stream's `data: [DONE]` passes (clients drop the body there), or when the body is
//!   dropped after its `usage` passed; a stream dropped or cut before it keeps the estimate.
//! - **Streams are calls.** A concurrency slot is held until the answer's body ends, is
//!   dropped or fails, not only until its head: a streamed answer holds it while it streams.
//! - **Bounded.** A bucket holds at most `max_queue` waiters, and a request waits at most
//!   `max_wait` (or its own [`MaxWait`]); past either it gets an error at once (see [`error`]
//!   for each kind of refusal). Nothing waits forever, and the number of live buckets is bounded.
//! - **Cancellable.** Dropping a waiting future gives up its place and takes nothing. A turn
//!   is taken only when the service below is ready for the request.
//! - **Taught by the server.** A 429 closes its bucket for the server's hint, and a used-up
//!   limit (`x-ratelimit-remaining: 0`) until its reset, so other waiters do not walk into the
//!   same wall. In [`Mode::Adaptive`] (the default) the rate also follows the server's stated
//!   limits, cuts itself on 429s its own pace did not expect (at most once per server
//!   window), and on 503s only when a trial shows they follow the rate, then recovers; see
//!   [`Adaptation`]. A whole-second `Retry-After` there holds the refused request, not the
//!   bucket. [`Mode::Static`] keeps the table's rates and every closure the server asks for.
//! - **Job slots last as long as the job.** In a group with concurrency slots (fine-tune
//!   create: 3, batch create: 10), a create that succeeds keeps its slot until an answer the
//!   layer passes on shows the job ended (a read of the job, a cancel, or the list), or until
//!   [`job_ttl`](LimitsBuilder::job_ttl) (24 h). A create beyond the limit waits for a slot,
//!   within `max_wait`, instead of going out to meet a 409. A 409 that comes anyway (jobs of
//!   another process) takes the free slots until a list corrects the count or
//!   [`job_recheck`](LimitsBuilder::job_recheck) (30 s) passes. To count jobs already running
//!   at start-up, send one `GET /v1/fine-tunes` (and `GET /v1/batches`) per key through the
//!   stack and read its answer to the end: every running job it lists takes a slot.
//!
//! The wait happens inside the response future, because the bucket is only known once the
//! request is: `poll_ready` forwards to the inner service.
//!
//! # Layout
//!
//! The outer files are tower's: `layer`, `service`, `future` (the response future and body),
//! `error` (each refusal, and the one place that tells them apart), and `limits` (the shared
//! handle and its builder), with `estimate` for token estimates. Below them, one folder per
//! concern, each importing only the folders after it in this list:
//!
//! | folder | owns |
//! |---|---|
//! | `admission/` | a request's arrival: its bucket, its cost, the fast path, and the wait for its turn; the state every clone of [`Limits`] shares |
//! | `bucket/` | one bucket (its rates, closure, epoch) and what an answer teaches it; its queue of waiters and their order (`fair`); the bounded map of live buckets |
//! | `learn/` | what answers teach, without naming a bucket: the ticket a request carries to its answer, the rate controller ([`Adaptation`]), and the response body watcher, all through one small `Feedback` trait the bucket implements |
//! | `jobs/` | job slots held until a job ends, and reading job answers |
//! | `backend/` | the [`Backend`] trait, the in-process [`LocalBackend`], and the GCRA that reads no clock |
//!
//! `error`, `estimate` and `share` (who a request is for, and how urgent it is) import no
//! folder. `tests/rooms.rs` fails if a folder imports one
//! before it, which any circle between folders would need.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::{Request, Response};
//! use tower::{Service, ServiceBuilder, ServiceExt};
//! use together_tower::limit::{Limits, RateLimitLayer};
//! use together_tower::quota::QuotaTable;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower::BoxError> {
//! # let client = tower::service_fn(|_: Request<String>| async {
//! #     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
//! # });
//! let limits = Limits::builder(QuotaTable::together_defaults())
//!     .max_wait(Duration::from_secs(10))
//!     .build();
//! let mut together = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limits))
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

mod admission;
mod backend;
mod bucket;
pub mod error;
mod estimate;
pub mod future;
pub(crate) mod jobs;
mod layer;
mod learn;
mod limits;
mod service;
mod share;

pub use self::admission::MaxWait;
pub use self::backend::{
    Backend, BucketSpec, Cost, Decision, Immediate, LocalBackend, LocalBucket, Pace, Rates,
};
pub use self::estimate::{DefaultTokenEstimate, EstimateTokens, TokenRequest};
pub use self::layer::RateLimitLayer;
pub use self::learn::adapt::{Adaptation, Mode, RateChanges};
pub use self::limits::{BucketSnapshot, Limits, LimitsBuilder};
pub use self::service::RateLimit;
pub use self::share::{Priority, Tenant, TenantCap};

/// The in-process backend's former name.
#[deprecated(note = "renamed `LocalBackend`: the trait it implements is `Backend`")]
pub type LocalLimiter = LocalBackend;

#[cfg(test)]
mod tests;
