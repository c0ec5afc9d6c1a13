//! The wait: a queued request's way to its turn.
//!
//! In arrival order (retries first), the head of a bucket's queue waits for a concurrency slot
//! if the group has slots, for the server's closure to lapse, and for the backend to have room
//! for its cost; then it takes its turn. The response future then polls the inner service
//! ready. If the inner service is not ready at once, the turn is given back and the head keeps
//! its place while it waits for the service, so that a busy service below the limiter (a
//! `ConcurrencyLimit`, a `BufferBody`) never makes turns pile up and go out in a burst. A wait
//! that is dropped gives back whatever it took: a place, a slot, a turn.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Sleep;
use tower::BoxError;

use crate::classify::EndpointClass;
use crate::limit::backend::{Backend, Cost, Decision, Immediate};
use crate::limit::bucket::Bucket;
use crate::limit::bucket::queue::{Lane, Place, Position, QueueBounds};
use crate::limit::error::{QueueFull, RateLimited, Refusal, SlotsBusy, TooManyTokens};
use crate::limit::share::Who;

use super::cap::CapTurn;
use crate::telemetry;

type Acquiring = Pin<Box<dyn Future<Output = Result<Decision, BoxError>> + Send>>;
type SlotAcquiring =
    Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, tokio::sync::AcquireError>> + Send>>;

/// What the head of a queue does after asking the backend.
enum Next {
    /// Its turn is taken: go.
    Go,
    /// A turn was reserved for it; it sleeps until then.
    Reserved,
    /// Look again after this long.
    Wait(Duration),
}

/// The wait of one request in one bucket.
pub(crate) struct Turn<L: Backend> {
    place: Option<Place<Bucket<L>>>,
    /// Its tenant's cap comes first: the place is taken once the cap's turn comes.
    deferred: Option<Box<Deferred<L>>>,
    cost: Cost,
    class: EndpointClass,
    /// Its priority and tenant, for telemetry.
    who: Who,
    arrived: Duration,
    /// The latest clock reading at which the request may still go.
    deadline: Duration,
    slot: Slot,
    /// Until the next try: the closure, or the backend's wait.
    sleep: Option<Pin<Box<Sleep>>>,
    /// The sleep is the backend's wait: capacity that comes back meanwhile (tokens an answer
    /// did not use) ends it early, to ask again.
    wakes_on_refill: bool,
    /// Fires at the deadline, while the request is not yet the head.
    deadline_timer: Option<Pin<Box<Sleep>>>,
    /// Fires when the next held job slot expires, while waiting for a slot.
    expiry_timer: Option<(Duration, Pin<Box<Sleep>>)>,
    /// Wakes the wait for a slot when that expiry moves.
    expiry_moved: Option<Pin<Box<OwnedNotified>>>,
    /// A backend decision that needs I/O, under way.
    acquiring: Option<Acquiring>,
    /// Held back by tokens, until when the head lets others pass.
    patience_until: Option<Duration>,
    /// The turn is taken, for a time the sleep ends at.
    reserved: bool,
    taken: bool,
}

/// A place not taken yet, while the request waits for its capped tenant's turn.
pub(crate) struct Deferred<L: Backend> {
    pub(crate) bucket: Arc<Bucket<L>>,
    pub(crate) lane: Lane,
    pub(crate) bounds: QueueBounds,
    /// Until the cap's turn.
    pub(crate) sleep: Pin<Box<Sleep>>,
    /// The cap's turn, given back if the request never goes.
    pub(crate) cap: Option<CapTurn>,
}

enum Slot {
    None,
    Acquiring(SlotAcquiring),
    Held(OwnedSemaphorePermit),
}

impl Slot {
    /// The wait for one of `bucket`'s concurrency slots, if its group has them.
    fn of<L: Backend>(bucket: &Bucket<L>) -> Self {
        match bucket.slots() {
            Some(slots) => Slot::Acquiring(Box::pin(Arc::clone(slots.semaphore()).acquire_owned())),
            None => Slot::None,
        }
    }
}

impl<L: Backend> Turn<L> {
    pub(crate) fn new(
        place: Place<Bucket<L>>,
        (cost, who): (Cost, Who),
        class: EndpointClass,
        now: Duration,
        max_wait: Duration,
    ) -> Self {
        let slot = Slot::of(place.owner());
        Self::starting(Some(place), None, slot, (cost, who, class), now, max_wait)
    }

    /// The wait of a request whose tenant's cap comes first: it takes its place in the
    /// bucket's queue when the cap's turn comes.
    pub(crate) fn after_cap(
        deferred: Deferred<L>,
        (cost, who): (Cost, Who),
        class: EndpointClass,
        now: Duration,
        max_wait: Duration,
    ) -> Self {
        let slot = Slot::of(&deferred.bucket);
        let deferred = Some(Box::new(deferred));
        Self::starting(None, deferred, slot, (cost, who, class), now, max_wait)
    }

    /// A wait arriving at `now`, with its place or the place it will take.
    fn starting(
        place: Option<Place<Bucket<L>>>,
        deferred: Option<Box<Deferred<L>>>,
        slot: Slot,
        (cost, who, class): (Cost, Who, EndpointClass),
        now: Duration,
        max_wait: Duration,
    ) -> Self {
        Self {
            place,
            deferred,
            cost,
            class,
            who,
            arrived: now,
            deadline: now.saturating_add(max_wait),
            slot,
            sleep: None,
            wakes_on_refill: false,
            deadline_timer: None,
            expiry_timer: None,
            expiry_moved: None,
            acquiring: None,
            patience_until: None,
            reserved: false,
            taken: false,
        }
    }

    /// Waits for the capped tenant's turn, if it has one to wait for, then takes the place.
    fn poll_cap(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let Some(deferred) = &mut self.deferred else {
            return Poll::Ready(Ok(()));
        };
        ready!(deferred.sleep.as_mut().poll(cx));
        match Place::take(
            &deferred.bucket,
            self.who.clone(),
            deferred.lane,
            deferred.bounds,
            self.cost,
        ) {
            Ok(place) => {
                // The cap's turn is spent: the request goes on to the bucket's queue.
                self.place = Some(place);
                self.deferred = None;
                Poll::Ready(Ok(()))
            }
            Err(bound) => {
                let now = deferred.bucket.context.clock.elapsed();
                let estimate = deferred.bucket.estimated_wait(now);
                Poll::Ready(Err(QueueFull::new(bound, estimate, self.class).into()))
            }
        }
    }

    /// Says that the request left the queue, sent or not.
    fn record_leaving(&self, sent: bool) {
        let bucket = self.bucket();
        let waited = bucket.context.clock.elapsed().saturating_sub(self.arrived);
        let leaving = telemetry::Leaving {
            class: self.class,
            model: bucket.model.as_deref(),
            priority: self.who.priority,
            tenant: self.who.tenant_name(),
        };
        telemetry::left_queue(&leaving, waited, sent);
    }

    fn place(&self) -> &Place<Bucket<L>> {
        self.place
            .as_ref()
            .expect("the place is held until the request goes")
    }

    fn bucket(&self) -> &Arc<Bucket<L>> {
        match (&self.place, &self.deferred) {
            (Some(place), _) => place.owner(),
            (None, Some(deferred)) => &deferred.bucket,
            (None, None) => panic!("a wait has a place or a deferred one until it ends"),
        }
    }

    fn deadline_instant(&self) -> tokio::time::Instant {
        self.bucket().context.clock.instant_at(self.deadline)
    }

    /// Arms (once) and polls the deadline: ready when the request may wait no longer.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.deadline_timer.is_none() {
            self.deadline_timer = Some(Box::pin(tokio::time::sleep_until(self.deadline_instant())));
        }
        match &mut self.deadline_timer {
            Some(timer) => timer.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }

    fn too_long(&self, wait: Duration) -> BoxError {
        RateLimited::new(wait, self.class).into()
    }

    /// Waits for the group's concurrency slot, if it has slots. A slot frees when a call or a
    /// job ends, or when a job's time passes: a timer wakes the wait for the next expiry.
    fn poll_slot(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            let Slot::Acquiring(acquiring) = &mut self.slot else {
                return Poll::Ready(Ok(()));
            };
            match acquiring.as_mut().poll(cx) {
                Poll::Ready(Ok(permit)) => {
                    self.slot = Slot::Held(permit);
                    self.expiry_timer = None;
                    self.expiry_moved = None;
                    return Poll::Ready(Ok(()));
                }
                Poll::Ready(Err(_)) => {
                    return Poll::Ready(Err("concurrency slots closed".into()));
                }
                Poll::Pending => {}
            }
            if self.poll_deadline(cx).is_ready() {
                let clock = self.bucket().context.clock;
                let waited = clock.elapsed().saturating_sub(self.arrived);
                return Poll::Ready(Err(SlotsBusy::new(waited, self.class).into()));
            }
            let bucket = Arc::clone(self.bucket());
            let Some(slots) = bucket.slots() else {
                return Poll::Pending;
            };
            // Listen for a move of the next expiry before reading it, so none is missed.
            let moved = self.expiry_moved.get_or_insert_with(|| {
                let mut moved = Box::pin(slots.expiry_moved().notified_owned());
                moved.as_mut().enable();
                moved
            });
            if moved.as_mut().poll(cx).is_ready() {
                self.expiry_moved = None;
                continue;
            }
            let Some(expiry) = slots.next_expiry() else {
                return Poll::Pending;
            };
            match &mut self.expiry_timer {
                Some((at, timer)) if *at == expiry => {
                    ready!(timer.as_mut().poll(cx));
                    // Due: give the expired slots back, and try for one again.
                    self.expiry_timer = None;
                    slots.expire();
                }
                _ => {
                    let instant = bucket.context.clock.instant_at(expiry);
                    self.expiry_timer = Some((expiry, Box::pin(tokio::time::sleep_until(instant))));
                }
            }
        }
    }

    /// Waits for the slot, the head of the queue and the turn (see the module docs).
    fn poll_turn_inner(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        ready!(self.poll_cap(cx))?;
        ready!(self.poll_slot(cx))?;
        loop {
            if self.sleep.is_some() {
                let refilled = self.wakes_on_refill && self.place().take_refilled();
                if let (Some(sleep), false) = (&mut self.sleep, refilled) {
                    ready!(sleep.as_mut().poll(cx));
                }
                self.sleep = None;
                self.wakes_on_refill = false;
            }
            if std::mem::take(&mut self.reserved) {
                // The reserved turn is due. If the server closed the bucket meanwhile, the
                // turn goes back and the request waits out the closure like the others.
                let now = self.bucket().context.clock.elapsed();
                if self.bucket().closed_for(now).is_some() {
                    self.give_back();
                }
            }
            if self.taken {
                return Poll::Ready(Ok(()));
            }
            if !ready!(self.poll_head(cx))? {
                // The head took this request's turn for it.
                self.taken = true;
                continue;
            }
            let bucket = Arc::clone(self.bucket());
            let now = bucket.context.clock.elapsed();
            bucket.refresh(now);
            let (wait, wakes_on_refill) = match bucket.closed_for(now) {
                Some(closed) => (closed, false),
                None if !bucket.has_rate() => {
                    self.taken = true;
                    continue;
                }
                None => {
                    // Cleared before the backend is asked, so that no refill after it is missed.
                    self.place().take_refilled();
                    let decision = ready!(self.poll_decision(cx, now))?;
                    match self.follow(&bucket, decision, now)? {
                        Next::Go => {
                            self.taken = true;
                            continue;
                        }
                        Next::Reserved => continue,
                        Next::Wait(wait) => (wait, true),
                    }
                }
            };
            let until = now.saturating_add(wait);
            bucket.next_turn_at(until);
            if until > self.deadline {
                return Poll::Ready(Err(self.too_long(wait)));
            }
            let at = bucket.context.clock.instant_at(until);
            self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
            self.wakes_on_refill = wakes_on_refill;
        }
    }

    /// Waits to be the head of the queue: `true` once it is, `false` if the head took this
    /// request's turn for it, an error once its deadline passes.
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<bool, BoxError>> {
        let place = self.place();
        match place.poll_position(cx) {
            Poll::Ready(Position::Head) => Poll::Ready(Ok(true)),
            Poll::Ready(Position::Granted) => Poll::Ready(Ok(false)),
            Poll::Pending => {
                if self.poll_deadline(cx).is_ready() {
                    let now = self.bucket().context.clock.elapsed();
                    let estimate = self.bucket().estimated_wait(now);
                    return Poll::Ready(Err(self.too_long(estimate)));
                }
                Poll::Pending
            }
        }
    }

    /// What the head does with the backend's decision.
    fn follow(
        &mut self,
        bucket: &Arc<Bucket<L>>,
        decision: Decision,
        now: Duration,
    ) -> Result<Next, BoxError> {
        Ok(match decision {
            Decision::Allow => Next::Go,
            Decision::Wait(wait) => Next::Wait(wait),
            Decision::WaitForTokens { request, tokens } => {
                let deadline = *self
                    .patience_until
                    .get_or_insert_with(|| now.saturating_add(tokens.saturating_mul(2)));
                if request.is_zero() {
                    Next::Wait(self.let_small_ones_pass(bucket, now, tokens, deadline))
                } else {
                    // Others need a request turn too: look again when it is due.
                    Next::Wait(request)
                }
            }
            Decision::Reserved(wait) => {
                // Taken for a turn `wait` from now: sleep once, then go.
                self.taken = true;
                let until = now.saturating_add(wait);
                bucket.next_turn_at(until);
                if until > self.deadline {
                    // Farther than it was allowed to reserve: not this request's turn.
                    self.give_back();
                    return Err(self.too_long(wait));
                }
                self.reserved = true;
                let at = bucket.context.clock.instant_at(until);
                self.sleep = Some(Box::pin(tokio::time::sleep_until(at)));
                Next::Reserved
            }
            Decision::TooLarge => {
                let capacity = bucket.token_capacity().unwrap_or(0);
                return Err(TooManyTokens::new(self.cost.tokens, capacity, self.class).into());
            }
        })
    }

    /// Held back by tokens only: grants turns to the requests behind it, in order, while their
    /// tokens fit now and it would still go by its patience deadline (twice its own first
    /// wait). Returns how long to sleep before looking again: its own wait, or one request
    /// interval if it let others pass.
    fn let_small_ones_pass(
        &self,
        bucket: &Arc<Bucket<L>>,
        now: Duration,
        wait: Duration,
        deadline: Duration,
    ) -> Duration {
        let place = self.place();
        let (limiter, state, own) = (&bucket.context.backend, &bucket.state, self.cost);
        let mut passed = false;
        while place.grant_next(|cost| {
            if !matches!(
                limiter.try_acquire(state, cost, now),
                Some(Immediate::Allow)
            ) {
                return false;
            }
            // Would this request still go by its deadline after the other one?
            let keeps_deadline = match limiter.try_acquire(state, own, now) {
                Some(Immediate::Allow) => {
                    limiter.release(state, own, now);
                    true
                }
                Some(Immediate::Wait(wait) | Immediate::WaitForTokens { tokens: wait, .. }) => {
                    now.saturating_add(wait) <= deadline
                }
                Some(Immediate::TooLarge) | None => false,
            };
            if !keeps_deadline {
                limiter.release(state, cost, now);
            }
            keeps_deadline
        }) {
            passed = true;
        }
        if passed {
            // The request turns just taken may free up again soon: look again then.
            wait.min(bucket.interval().max(Duration::from_millis(1)))
        } else {
            wait
        }
    }

    /// Asks the backend for the turn: at once if it can say without I/O.
    fn poll_decision(
        &mut self,
        cx: &mut Context<'_>,
        now: Duration,
    ) -> Poll<Result<Decision, BoxError>> {
        if self.acquiring.is_none() {
            let bucket = self.bucket();
            if let Some(decision) =
                bucket
                    .context
                    .backend
                    .try_acquire(&bucket.state, self.cost, now)
            {
                return Poll::Ready(Ok(decision.into()));
            }
            let (bucket, cost) = (Arc::clone(bucket), self.cost);
            let max_wait = self.deadline.saturating_sub(now);
            self.acquiring = Some(Box::pin(async move {
                bucket
                    .context
                    .backend
                    .acquire(&bucket.state, cost, now, max_wait)
                    .await
            }));
        }
        let acquiring = self.acquiring.as_mut().expect("set above");
        let decision = ready!(acquiring.as_mut().poll(cx));
        self.acquiring = None;
        Poll::Ready(decision)
    }
}

impl<L: Backend> Turn<L> {
    /// Ready once the turn is taken.
    pub(crate) fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        let result = ready!(self.poll_turn_inner(cx));
        if let Err(error) = &result {
            telemetry::refused(self.class, Refusal::reason(&**error), error);
        }
        Poll::Ready(result)
    }

    /// The inner service was not ready: gives the turn back, keeping the place in the queue.
    pub(crate) fn give_back(&mut self) {
        if std::mem::take(&mut self.taken) {
            let bucket = self.bucket();
            let now = bucket.context.clock.elapsed();
            bucket
                .context
                .backend
                .release(&bucket.state, self.cost, now);
            // A turn the head granted it: the place waits again, and may be granted again.
            if let Some(place) = &self.place {
                place.unclaim();
            }
        }
    }

    /// The request goes: leaves the queue and hands over the slot, held until the response.
    pub(crate) fn leave(&mut self) -> Option<OwnedSemaphorePermit> {
        // The turn is used: nothing to give back.
        self.taken = false;
        self.record_leaving(true);
        if let Some(place) = self.place.take() {
            place.went();
        }
        match std::mem::replace(&mut self.slot, Slot::None) {
            Slot::Held(permit) => Some(permit),
            Slot::None | Slot::Acquiring(_) => None,
        }
    }
}

impl<L: Backend> Drop for Turn<L> {
    fn drop(&mut self) {
        // Dropped while still in the queue (given up, refused, or between taking the turn and
        // sending): whatever was taken was never used.
        if self.place.is_some() {
            self.give_back();
            self.record_leaving(false);
        } else if self.deferred.is_some() {
            self.record_leaving(false);
            if let Some(deferred) = self.deferred.take() {
                let now = deferred.bucket.context.clock.elapsed();
                if let Some(cap) = deferred.cap {
                    cap.give_back(now);
                }
            }
        }
    }
}
