//! Errors the rate limit layer returns itself, instead of sending the request.
//!
//! They reach the caller as a [`tower::BoxError`]; downcast to tell them apart. Each says which
//! class of request it turned away, and all but [`TooManyTokens`] say when to try again.
//!
//! | error | when | what waiting does |
//! |---|---|---|
//! | [`RateLimited`] | the turn is further away than the request may wait (`max_wait`, or its [`MaxWait`](super::MaxWait)) | try after `retry_after` |
//! | [`QueueFull`] | `max_queue` requests already wait in the bucket | shed load, or try after `retry_after` |
//! | [`SlotsBusy`] | every concurrent-call slot of a job-creating group stayed busy past `max_wait` | try when a job ends |
//! | [`TooManyTokens`] | the request's token estimate is more than its group's whole token burst | nothing: split the request, or raise the burst |
//! | [`TooManyBuckets`] | `max_buckets` buckets are live and none is at rest (a flood of new keys) | try after `retry_after` |
//!
//! ```
//! # use together_tower::limit::error::{QueueFull, RateLimited};
//! fn describe(error: &tower::BoxError) -> &'static str {
//!     if error.is::<RateLimited>() {
//!         "over quota: try later"
//!     } else if error.is::<QueueFull>() {
//!         "too many waiting: shed load"
//!     } else {
//!         "the request itself failed"
//!     }
//! }
//! # let _ = describe;
//! ```

use std::fmt;
use std::time::Duration;

use crate::classify::EndpointClass;

/// The request would have had to wait longer than it may, so it was not sent.
///
/// Nothing was consumed: the caller may try again after [`RateLimited::retry_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
    class: EndpointClass,
}

impl RateLimited {
    pub(crate) fn new(retry_after: Duration, class: EndpointClass) -> Self {
        Self { retry_after, class }
    }

    /// How long until the bucket is expected to have a free turn.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited: the next {} turn is {:?} away, longer than this request may wait",
            self.class, self.retry_after
        )
    }
}

impl std::error::Error for RateLimited {}

/// Too many requests already wait for the same bucket, so this one was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    max_queue: usize,
    retry_after: Duration,
    class: EndpointClass,
}

impl QueueFull {
    pub(crate) fn new(max_queue: usize, retry_after: Duration, class: EndpointClass) -> Self {
        Self {
            max_queue,
            retry_after,
            class,
        }
    }

    /// The bound that was reached.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// How long until the requests waiting now are expected to have gone.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queue full: {} {} requests already wait for this bucket",
            self.max_queue, self.class
        )
    }
}

impl std::error::Error for QueueFull {}

/// Every concurrent-call slot of the group stayed busy for as long as the request may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotsBusy {
    waited: Duration,
    class: EndpointClass,
}

impl SlotsBusy {
    pub(crate) fn new(waited: Duration, class: EndpointClass) -> Self {
        Self { waited, class }
    }

    /// How long the request waited for a slot.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for SlotsBusy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no free {} slot: every concurrent call slot stayed busy for {:?}",
            self.class, self.waited
        )
    }
}

impl std::error::Error for SlotsBusy {}

/// The request's token estimate is more than its group's whole token burst, so no wait would
/// ever let it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyTokens {
    tokens: u64,
    burst: u64,
    class: EndpointClass,
}

impl TooManyTokens {
    pub(crate) fn new(tokens: u64, burst: u64, class: EndpointClass) -> Self {
        Self {
            tokens,
            burst,
            class,
        }
    }

    /// The request's estimated tokens.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The most tokens one request of its group may cost.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for TooManyTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "too many tokens: this {} request is estimated at {} tokens, more than the {} its group's burst holds; split it, lower max_tokens, or raise the token burst",
            self.class, self.tokens, self.burst
        )
    }
}

impl std::error::Error for TooManyTokens {}

/// So many keys are in use at once that every bucket is live and none is at rest: a new key
/// cannot have one until a bucket comes to rest. Keys already live are not affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyBuckets {
    max_buckets: usize,
    retry_after: Duration,
    class: EndpointClass,
}

impl TooManyBuckets {
    pub(crate) fn new(max_buckets: usize, retry_after: Duration, class: EndpointClass) -> Self {
        Self {
            max_buckets,
            retry_after,
            class,
        }
    }

    /// The bound on live buckets.
    pub fn max_buckets(&self) -> usize {
        self.max_buckets
    }

    /// How long until a bucket is expected to come to rest and make room.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for TooManyBuckets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "too many buckets: all {} are in use; a new key's {} request can have one in {:?}",
            self.max_buckets, self.class, self.retry_after
        )
    }
}

impl std::error::Error for TooManyBuckets {}
