//! Admission: what happens to a request as it arrives. It finds the request's bucket and
//! cost, then lets it go at once (the fast path), refuses it (the wait would be too long, the
//! queue is full, it can never fit), or queues it for its turn.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use http::header::CONTENT_LENGTH;
use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;

use super::cap::{self, CapTurn};
use super::wait::{Deferred, Turn};
use super::{Inner, MaxWait};
use crate::body::RequestMeta;
use crate::classify::{Classify, EndpointClass};
use crate::limit::backend::{Backend, Cost, Immediate};
use crate::limit::bucket::queue::{Lane, Place, QueueBounds};
use crate::limit::bucket::{Bucket, BucketKey};
use crate::limit::error::{QueueFull, RateLimited, Refusal, TooManyBuckets, TooManyTokens};
use crate::limit::estimate::TokenRequest;
use crate::limit::jobs::{self, Slots};
use crate::limit::learn::Ticket;
use crate::limit::share::Who;
use crate::retry::Attempt;
use crate::telemetry;

/// What the layer decided when the request arrived.
pub(crate) enum Admission<L: Backend> {
    /// Send now (the fast path, or a class with no limit).
    Go {
        permit: Option<OwnedSemaphorePermit>,
        ticket: Option<Ticket<Bucket<L>>>,
        /// The job slots a read of jobs reports on.
        reads_jobs: Option<Arc<Slots>>,
    },
    /// Wait for a slot and a turn first. Boxed: only requests that wait pay for carrying
    /// the wait, and the decision stays small on the fast path.
    Wait {
        turn: Box<Turn<L>>,
        ticket: Ticket<Bucket<L>>,
        reads_jobs: Option<Arc<Slots>>,
    },
    /// Do not send.
    Refuse(BoxError),
}

impl<C: Classify, L: Backend> Inner<C, L> {
    pub(crate) fn admit<B>(&self, request: &Request<B>, class: EndpointClass) -> Admission<L> {
        let reads_jobs = self.job_slots_read_by(class, request);
        let Some(key) = self.bucket_key_for(class, request) else {
            return Admission::Go {
                permit: None,
                ticket: None,
                reads_jobs,
            };
        };
        let meta = request.extensions().get::<RequestMeta>();
        let bucket = match self.bucket_for(key, meta) {
            Ok(bucket) => bucket,
            Err(retry_after) => {
                let full = TooManyBuckets::new(self.settings.max_buckets, retry_after, class);
                return refuse(class, full);
            }
        };
        let cost = match self.cost_of(&bucket, key, class, request, meta) {
            Ok(cost) => cost,
            Err(too_large) => return Admission::Refuse(too_large.into()),
        };
        let max_wait = match request.extensions().get::<MaxWait>() {
            Some(max_wait) => max_wait.0,
            None => (self.settings.shares.max_wait(request)).unwrap_or(self.settings.max_wait),
        };
        let mut cap_now = None;
        if let Some(capped) = self.capped(&bucket, key, request, max_wait, class) {
            let capped = match capped {
                Ok(capped) => capped,
                Err(refused) => return refused,
            };
            if !capped.wait.is_zero() {
                let waiting = (capped, lane_of(request));
                return self.after_cap(bucket, cost, class, waiting, max_wait, reads_jobs);
            }
            // The cap's turn is now: the request goes on as any other.
            cap_now = Some(capped);
        }
        let (cap_turn, who) = match cap_now {
            Some(Capped { turn, who, .. }) => (Some(turn), Some(who)),
            None => (None, None),
        };
        let admission = match self.fast_path(&bucket, cost, max_wait, class) {
            FastPath::Go(permit, now) => {
                telemetry::admitted(class, bucket.model.as_deref());
                let ticket = Ticket::new(bucket, cost, class, now);
                Admission::Go {
                    permit,
                    ticket: Some(ticket),
                    reads_jobs,
                }
            }
            FastPath::Refuse(error) => {
                telemetry::refused(class, Refusal::reason(&*error), &error);
                Admission::Refuse(error)
            }
            FastPath::Wait => {
                let who = who.unwrap_or_else(|| self.settings.shares.who(request));
                let waiting = (who, lane_of(request));
                self.queue(bucket, cost, class, waiting, max_wait, reads_jobs)
            }
        };
        if let (Admission::Refuse(_), Some(turn)) = (&admission, cap_turn) {
            // Refused after all: the tenant's turn was not used.
            turn.give_back(self.context.clock.elapsed());
        }
        admission
    }

    /// The live bucket of `key`, made if it is not; `Err(retry_after)` when the map is full of
    /// buckets in use.
    fn bucket_for(
        &self,
        key: BucketKey,
        meta: Option<&RequestMeta>,
    ) -> Result<Arc<Bucket<L>>, Duration> {
        self.buckets
            .get_or_insert_with(key, &self.context.clock, || {
                let model = meta
                    .filter(|_| key.model != 0)
                    .and_then(|meta| meta.model.as_ref())
                    .map(|model| self.context.model_names.shared(model));
                Bucket::new(&self.context, key.key, key.group, model)
            })
    }

    /// What the request costs: a request turn if its group has a rate, and its estimated
    /// tokens if it has a token budget. Refused when the tokens are more than the whole burst.
    fn cost_of<B>(
        &self,
        bucket: &Bucket<L>,
        key: BucketKey,
        class: EndpointClass,
        request: &Request<B>,
        meta: Option<&RequestMeta>,
    ) -> Result<Cost, TooManyTokens> {
        let tokens = match bucket.token_capacity() {
            Some(capacity) => {
                let tokens = self.estimate.estimate(&TokenRequest {
                    class,
                    meta,
                    body_bytes: body_bytes(request, meta),
                });
                if tokens > capacity {
                    return Err(TooManyTokens::new(tokens, capacity, class));
                }
                tokens
            }
            None => 0,
        };
        Ok(Cost {
            requests: u64::from(self.context.table.group(key.group).rate().is_some()),
            tokens,
        })
    }

    /// Takes a place in the bucket's queue, unless the wait is already known to be too long or
    /// the queue is full.
    fn queue(
        &self,
        bucket: Arc<Bucket<L>>,
        cost: Cost,
        class: EndpointClass,
        (who, lane): (Who, Lane),
        max_wait: Duration,
        reads_jobs: Option<Arc<Slots>>,
    ) -> Admission<L> {
        let now = self.context.clock.elapsed();
        let estimate = bucket.estimated_wait(now);
        if estimate > max_wait {
            return refuse(class, RateLimited::new(estimate, class));
        }
        let ahead = bucket.queue_len();
        let place = match Place::take(&bucket, who.clone(), lane, self.queue_bounds(), cost) {
            Ok(place) => place,
            Err(bound) => return refuse(class, QueueFull::new(bound, estimate, class)),
        };
        telemetry::queued(class, bucket.model.as_deref(), ahead, estimate);
        let turn = Turn::new(place, (cost, who), class, now, max_wait);
        Admission::Wait {
            turn: Box::new(turn),
            ticket: Ticket::new(bucket, cost, class, now),
            reads_jobs,
        }
    }

    /// The turn of the request's tenant's cap, if its tenant is capped in this bucket: `Err`
    /// with the refusal when that turn is further than the request may wait.
    fn capped<B>(
        &self,
        bucket: &Bucket<L>,
        key: BucketKey,
        request: &Request<B>,
        max_wait: Duration,
        class: EndpointClass,
    ) -> Option<Result<Capped, Admission<L>>> {
        let shares = &self.settings.shares;
        if shares.caps.is_empty() {
            // The common case: no tenant to look up.
            return None;
        }
        let who = shares.who(request);
        let pace = cap::pace(*shares.caps.get(&who.tenant_id())?, bucket.interval())?;
        let now = self.context.clock.elapsed();
        let (wait, turn) = self.caps.take((key, who.tenant_id()), pace, now);
        if wait > max_wait {
            turn.give_back(now);
            return Some(Err(refuse(class, RateLimited::new(wait, class))));
        }
        Some(Ok(Capped { wait, turn, who }))
    }

    /// Waits for the capped tenant's turn, `wait` from now, before taking a place in the
    /// bucket's queue.
    fn after_cap(
        &self,
        bucket: Arc<Bucket<L>>,
        cost: Cost,
        class: EndpointClass,
        (capped, lane): (Capped, Lane),
        max_wait: Duration,
        reads_jobs: Option<Arc<Slots>>,
    ) -> Admission<L> {
        let Capped { wait, turn, who } = capped;
        let now = self.context.clock.elapsed();
        telemetry::queued(class, bucket.model.as_deref(), bucket.queue_len(), wait);
        let at = self.context.clock.instant_at(now.saturating_add(wait));
        let deferred = Deferred {
            bucket: Arc::clone(&bucket),
            lane,
            bounds: self.queue_bounds(),
            sleep: Box::pin(tokio::time::sleep_until(at)),
            cap: Some(turn),
        };
        let turn = Turn::after_cap(deferred, (cost, who), class, now, max_wait);
        Admission::Wait {
            turn: Box::new(turn),
            ticket: Ticket::new(bucket, cost, class, now),
            reads_jobs,
        }
    }

    fn queue_bounds(&self) -> QueueBounds {
        QueueBounds {
            max_queue: self.settings.max_queue,
            max_per_tenant: self.settings.shares.max_queue_per_tenant,
        }
    }

    /// For a read of jobs (the list, one job, a cancel), the job slots of the request's key
    /// that its answer reports on; the bucket is made if need be, so that a list call at
    /// start-up seeds the count.
    fn job_slots_read_by<B>(
        &self,
        class: EndpointClass,
        request: &Request<B>,
    ) -> Option<Arc<Slots>> {
        let creates = match class {
            EndpointClass::FineTuneOther => EndpointClass::FineTuneCreate,
            EndpointClass::BatchOther => EndpointClass::BatchCreate,
            _ => return None,
        };
        if !jobs::reads_jobs(request.method(), request.uri().path()) {
            return None;
        }
        let group_id = self.context.table.group_id(creates)?;
        let group = self.context.table.group(group_id);
        group.concurrency()?;
        let key = BucketKey {
            key: self
                .key_hasher
                .fingerprint_request(&self.classifier, request),
            group: group_id,
            model: 0,
        };
        let bucket = self
            .buckets
            .get_or_insert_with(key, &self.context.clock, || {
                Bucket::new(&self.context, key.key, key.group, None)
            })
            .ok()?;
        bucket.slots().cloned()
    }

    /// Lets the request go at once when nobody waits, the server has not closed the bucket, a
    /// slot is free and the backend has room for its cost.
    fn fast_path(
        &self,
        bucket: &Arc<Bucket<L>>,
        cost: Cost,
        max_wait: Duration,
        class: EndpointClass,
    ) -> FastPath {
        let clock = &self.context.clock;
        if bucket.has_waiters() || bucket.is_closed(clock) {
            return FastPath::Wait;
        }
        let permit = match bucket.slots() {
            Some(slots) => {
                // Jobs whose time passed give their slots back first.
                slots.expire();
                match Arc::clone(slots.semaphore()).try_acquire_owned() {
                    Ok(permit) => Some(permit),
                    Err(_) => return FastPath::Wait,
                }
            }
            None => None,
        };
        if !bucket.has_rate() {
            // No rate to adapt: when it was sent does not matter, so the clock is not read.
            return FastPath::Go(permit, Duration::ZERO);
        }
        let now = clock.elapsed();
        bucket.refresh(now);
        match self.context.backend.try_acquire(&bucket.state, cost, now) {
            Some(Immediate::Allow) => FastPath::Go(permit, now),
            Some(Immediate::Wait(wait) | Immediate::WaitForTokens { tokens: wait, .. }) => {
                bucket.next_turn_at(now.saturating_add(wait));
                if wait > max_wait {
                    // Known to be too long already: answer now rather than queue.
                    return FastPath::Refuse(RateLimited::new(wait, class).into());
                }
                FastPath::Wait
            }
            Some(Immediate::TooLarge) => FastPath::Refuse(
                TooManyTokens::new(cost.tokens, bucket.token_capacity().unwrap_or(0), class).into(),
            ),
            None => FastPath::Wait,
        }
    }
}

/// The lane of a request: retries (of the retry layer) go first.
fn lane_of<B>(request: &Request<B>) -> Lane {
    match request.extensions().get::<Attempt>() {
        Some(attempt) if attempt.0 > 0 => Lane::Retry,
        _ => Lane::New,
    }
}

/// Refuses a request with `error`, and says so.
fn refuse<E, L: Backend>(class: EndpointClass, error: E) -> Admission<L>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let error: BoxError = error.into();
    telemetry::refused(class, Refusal::reason(&*error), &error);
    Admission::Refuse(error)
}

/// A capped tenant's turn for a request: how long until it comes, the turn, and who the
/// request is for.
struct Capped {
    wait: Duration,
    turn: CapTurn,
    who: Who,
}

/// What the fast path decided.
enum FastPath {
    /// Send now (at this clock reading), holding this slot if the group has slots.
    Go(Option<OwnedSemaphorePermit>, Duration),
    /// Take the waiting path.
    Wait,
    /// Refuse at once.
    Refuse(BoxError),
}

/// The body's length: from the buffer layer's metadata, else from `content-length`.
fn body_bytes<B>(request: &Request<B>, meta: Option<&RequestMeta>) -> Option<u64> {
    meta.map(|meta| meta.body_bytes).or_else(|| {
        request
            .headers()
            .get(CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .parse()
            .ok()
    })
}
