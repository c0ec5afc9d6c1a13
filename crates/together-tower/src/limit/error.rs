//! Errors the rate limit layer returns itself, instead of sending the request.
//!
//! They reach the caller as a [`tower::BoxError`]; downcast to tell them apart:
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
    class: EndpointClass,
}

impl QueueFull {
    pub(crate) fn new(max_queue: usize, class: EndpointClass) -> Self {
        Self { max_queue, class }
    }

    /// The bound that was reached.
    pub fn max_queue(&self) -> usize {
        self.max_queue
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
