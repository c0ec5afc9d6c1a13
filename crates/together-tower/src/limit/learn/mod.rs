//! What answers teach: the ticket a request carries to its answer, the rate controller, and
//! the response body watcher.
//!
//! [`Feedback`] is the one face a bucket shows to what comes after admission: the ticket and
//! the body watcher call it, and never name the bucket's type or its backend. The bucket
//! implements it (in `bucket/learn.rs`), so this folder imports nothing from the bucket.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use super::backend::Cost;
use super::jobs::Slots;

pub(crate) mod adapt;
mod peeked;
pub(crate) mod pressure;
mod refusal;
mod ticket;
mod watch;

pub(crate) use self::refusal::Reading;
pub(crate) use self::ticket::Ticket;
pub use self::watch::ResponseBody;
pub(crate) use self::watch::{JobAnswer, Watch};

/// When a request was sent, as its bucket counts time: the bucket's count of cuts and
/// closures then (an answer to a request sent before the last of them was expected), and the
/// clock reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) epoch: u64,
    pub(crate) at: Duration,
}

/// Which limit a refusal says ran out: a 429 body's `error.type`
/// (`dynamic_request_limited`, `dynamic_token_limited`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dimension {
    Requests,
    Tokens,
}

impl Dimension {
    /// The dimension a 429 body's error type names, if it names one.
    pub(crate) fn of_error_type(kind: &str) -> Option<Self> {
        match kind {
            "dynamic_request_limited" | "request_limit_exceeded" => Some(Self::Requests),
            "dynamic_token_limited" | "token_limit_exceeded" => Some(Self::Tokens),
            _ => None,
        }
    }
}

/// An answer, as its bucket reads it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Answer<'a> {
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) sent: Sent,
    pub(crate) cost: Cost,
    /// For a 429 whose body was read: the limit it says ran out.
    pub(crate) ran_out: Option<Dimension>,
}

/// A bucket learning from answers.
///
/// The one place the backend's type is hidden: a [`Ticket`] and the response future know
/// their bucket's type, but the response body, a public type that outlives the future,
/// holds its bucket as `Arc<dyn Feedback>` (to settle a token charge or hold a slot until
/// the body ends), so that users never name the backend in their response types. The tests of
/// the body's watcher implement it with a fake bucket.
pub(crate) trait Feedback: Send + Sync {
    /// A request goes now.
    fn sent_now(&self) -> Sent;

    /// A request that went at clock reading `at`.
    fn sent_at(&self, at: Duration) -> Sent;

    /// The bucket's model, for groups limited per model.
    fn model(&self) -> Option<&str>;

    /// Whether a 429's body should be read for the limit it says ran out: the bucket adapts
    /// and has a token budget as well as a request rate.
    fn reads_refusals(&self) -> bool;

    /// Reads an answer.
    fn learn(&self, answer: Answer<'_>);

    /// `charged` tokens were taken for a request that used `used`.
    fn correct_tokens(&self, charged: u64, used: u64);

    /// An answer ended without saying what it used (a stream dropped or cut before its
    /// `usage`): the `charged` estimate stays. Only told, for telemetry.
    fn estimate_kept(&self, charged: u64) {
        let _ = charged;
    }

    /// The bucket's concurrency slots, if its group has them.
    fn slots(&self) -> Option<&Arc<Slots>>;
}
