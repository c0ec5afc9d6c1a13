//! What answers teach: the ticket a request carries to its answer, the rate controller, and
//! the response body watcher.
//!
//! [`Feedback`] is the one face a bucket shows to what comes after admission: the ticket and
//! the body watcher call it, and never name the bucket's type or its backend. The bucket
//! implements it (in `bucket/learn.rs`), so this folder imports nothing from the bucket.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};

use super::backend::Cost;
use super::jobs::Slots;

pub(crate) mod adapt;
mod ticket;
mod watch;

pub(crate) use self::ticket::Ticket;
pub use self::watch::ResponseBody;
pub(crate) use self::watch::{JobAnswer, Watch};

/// A bucket learning from answers, with its types erased so futures do not name them.
pub(crate) trait Feedback: Send + Sync {
    /// Counts cuts and closures; see [`Bucket::epoch`].
    fn epoch(&self) -> u64;

    /// The bucket's model, for groups limited per model.
    fn model(&self) -> Option<&str>;

    /// Reads an answer to a request sent in `sent_epoch` that cost `cost`.
    fn learn(&self, status: StatusCode, headers: &HeaderMap, sent_epoch: u64, cost: Cost);

    /// `charged` tokens were taken for a request that used `used`.
    fn correct_tokens(&self, charged: u64, used: u64);

    /// The bucket's concurrency slots, if its group has them.
    fn slots(&self) -> Option<&Arc<Slots>>;
}
