//! The queue of one bucket: first come, first served, with retries first.
//!
//! Only the request at the head asks the backend for a turn and sleeps until it; the rest
//! wait for the head to go, so there is no thundering herd. A retried request (one the retry
//! layer sends again) goes in a lane of its own that is served first: a 429 must not send a
//! request to the back of a long queue. A place is given up when its request goes, fails, or
//! is dropped, and the next head is woken.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Which lane a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lane {
    /// Requests sent again by the retry layer: served first.
    Retry,
    /// Requests not sent yet.
    New,
}

type Ticket = (Lane, u64);

/// The queue itself.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// How many places are taken; read without the lock by the fast path.
    len: AtomicUsize,
    lanes: Mutex<Lanes>,
}

#[derive(Debug, Default)]
struct Lanes {
    next: u64,
    waiting: BTreeMap<Ticket, Option<Waker>>,
}

impl Queue {
    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn lanes(&self) -> MutexGuard<'_, Lanes> {
        self.lanes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Something that owns a [`Queue`] (the bucket), so a place can keep it alive.
pub(crate) trait HasQueue: Send + Sync {
    fn queue(&self) -> &Queue;
}

/// A place in a bucket's queue, given up on drop.
pub(crate) struct Place<B: HasQueue + ?Sized> {
    owner: Arc<B>,
    ticket: Ticket,
}

impl<B: HasQueue + ?Sized> Place<B> {
    /// Takes a place in `lane`, unless `max_queue` places are taken already. The bound is
    /// exact: places are counted before anyone waits in them.
    pub(crate) fn take(owner: &Arc<B>, lane: Lane, max_queue: usize) -> Option<Self> {
        let queue = owner.queue();
        queue
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                (len < max_queue).then_some(len + 1)
            })
            .ok()?;
        let mut lanes = queue.lanes();
        let ticket = (lane, lanes.next);
        lanes.next += 1;
        lanes.waiting.insert(ticket, None);
        Some(Self {
            owner: Arc::clone(owner),
            ticket,
        })
    }

    /// Ready when this place is the head of the queue; otherwise the task is woken once it
    /// may be.
    pub(crate) fn poll_head(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut lanes = self.owner.queue().lanes();
        if lanes.waiting.keys().next() == Some(&self.ticket) {
            return Poll::Ready(());
        }
        if let Some(waker) = lanes.waiting.get_mut(&self.ticket) {
            match waker {
                Some(waker) if waker.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }

    pub(crate) fn owner(&self) -> &Arc<B> {
        &self.owner
    }
}

impl<B: HasQueue + ?Sized> Drop for Place<B> {
    fn drop(&mut self) {
        let queue = self.owner.queue();
        let mut lanes = queue.lanes();
        let was_head = lanes.waiting.keys().next() == Some(&self.ticket);
        lanes.waiting.remove(&self.ticket);
        queue.len.fetch_sub(1, Ordering::AcqRel);
        if was_head {
            if let Some((_, Some(waker))) = lanes.waiting.iter_mut().next() {
                waker.wake_by_ref();
            }
        }
    }
}

impl<B: HasQueue + ?Sized> std::fmt::Debug for Place<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place")
            .field("lane", &self.ticket.0)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    #[derive(Default)]
    struct Owner(Queue);

    impl HasQueue for Owner {
        fn queue(&self) -> &Queue {
            &self.0
        }
    }

    fn is_head(place: &Place<Owner>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        place.poll_head(&mut cx).is_ready()
    }

    #[test]
    fn places_are_served_in_order_with_retries_first() {
        let owner = Arc::new(Owner::default());
        let a = Place::take(&owner, Lane::New, 10).unwrap();
        let b = Place::take(&owner, Lane::New, 10).unwrap();
        assert!(is_head(&a) && !is_head(&b));
        let retry = Place::take(&owner, Lane::Retry, 10).unwrap();
        // The retry goes before everything that has not been sent yet.
        assert!(is_head(&retry) && !is_head(&a));
        drop(retry);
        assert!(is_head(&a));
        // Dropping a place that is not the head frees it too.
        drop(b);
        assert_eq!(owner.0.len(), 1);
        drop(a);
        assert!(owner.0.is_empty());
    }

    #[test]
    fn the_bound_is_exact() {
        let owner = Arc::new(Owner::default());
        let places: Vec<_> = (0..3)
            .map(|_| Place::take(&owner, Lane::New, 3).unwrap())
            .collect();
        assert!(Place::take(&owner, Lane::Retry, 3).is_none());
        drop(places);
        assert!(Place::take(&owner, Lane::New, 3).is_some());
    }
}
