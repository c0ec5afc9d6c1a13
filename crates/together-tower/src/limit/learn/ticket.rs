//! The ticket a request carries from its admission to its answer.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, StatusCode};
use tokio::sync::OwnedSemaphorePermit;

use super::watch::{JobAnswer, Watch};
use super::{Answer, Dimension, Feedback, Sent};
use crate::classify::EndpointClass;
use crate::limit::backend::Cost;
use crate::telemetry;

/// What a request carries from its admission to its answer: its bucket, its cost, and when it
/// was sent.
///
/// Of the bucket's own type, so that the response future calls it directly; only a body that
/// must be watched after the answer (a token charge, a slot) hides that type, as the
/// response body cannot name it.
pub(crate) struct Ticket<F> {
    bucket: Arc<F>,
    cost: Cost,
    sent: Sent,
    class: EndpointClass,
}

impl<F: Feedback + 'static> Ticket<F> {
    /// The ticket of a request going at clock reading `now` (or queued, until
    /// [`Ticket::sending`]).
    pub(crate) fn new(bucket: Arc<F>, cost: Cost, class: EndpointClass, now: Duration) -> Self {
        let sent = bucket.sent_at(now);
        Self {
            bucket,
            cost,
            sent,
            class,
        }
    }

    /// The request goes now (after a wait): what the bucket learns later is measured from here.
    pub(crate) fn sending(&mut self) {
        self.sent = self.bucket.sent_now();
    }

    /// Whether a 429's body should be read for the limit it says ran out.
    pub(crate) fn reads_refusals(&self) -> bool {
        self.bucket.reads_refusals()
    }

    /// Reads the answer; returns what its body must be watched for, if anything. `permit` is
    /// the request's concurrency slot: a job create that succeeded keeps it until the job
    /// ends, a 409 on create says the server's slots are all in use, and any other answer
    /// holds it until its body ends.
    /// `ran_out` is what a 429's body said ran out, if it was read.
    pub(crate) fn learn(
        self,
        status: StatusCode,
        headers: &HeaderMap,
        permit: Option<OwnedSemaphorePermit>,
        ran_out: Option<Dimension>,
    ) -> Option<Box<Watch>> {
        telemetry::answered(self.class, self.bucket.model(), Some(status));
        self.bucket.learn(Answer {
            status,
            headers,
            sent: self.sent,
            cost: self.cost,
            ran_out,
        });
        if self.class.creates_job() {
            if let Some(slots) = self.bucket.slots() {
                match permit {
                    Some(permit) if status.is_success() => {
                        let serial = slots.hold(permit);
                        return Some(Watch::jobs(Arc::clone(slots), JobAnswer::Created(serial)));
                    }
                    permit if status == StatusCode::CONFLICT => slots.refused(permit),
                    // Any other answer: no job, and the slot goes back.
                    _ => {}
                }
            }
            return None;
        }
        if self.cost.tokens > 0 && status.is_success() {
            return Some(Watch::tokens(self.bucket, self.cost.tokens, permit));
        }
        permit.map(Watch::slot)
    }

    /// The call failed without an answer: the tokens come back. (The request's turn does not:
    /// the request may have reached the server.)
    pub(crate) fn failed(self) {
        telemetry::answered(self.class, self.bucket.model(), None);
        if self.cost.tokens > 0 {
            self.bucket.correct_tokens(self.cost.tokens, 0);
        }
    }
}

impl<F> std::fmt::Debug for Ticket<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("cost", &self.cost)
            .finish_non_exhaustive()
    }
}
