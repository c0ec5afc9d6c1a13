//! The queue of one bucket: by priority, fairly between tenants, and otherwise first come,
//! first served, with retries first (the order is [`fair`](super::fair)'s).
//!
//! Only the request at the head asks the backend for a turn and sleeps until it; the rest
//! wait for the head to go, so there is no thundering herd. A retried request (one the retry
//! layer sends again) goes in a lane of its own that is served first within its priority: a
//! 429 must not send a request to the back of a long queue. A place is given up when its
//! request goes, fails, or is dropped, and the next head is woken. A more urgent request
//! that arrives becomes the head at once; the head it displaced finds, when its sleep ends,
//! that it is no longer the head, and waits again.
//!
//! The head may also grant its turn-taking to the waiter right behind it: when the head waits
//! only for tokens, the requests behind it whose tokens fit now may go first, in order (see
//! [`wait`](super::wait)). A grant takes that waiter's cost on its behalf; a granted place
//! dropped before its request goes gives the cost back.
//!
//! The head sleeps until the backend says its cost fits. Capacity can come back sooner than
//! that: an answer's `usage` gives back the tokens its estimate took too many (a stream settles
//! at its `[DONE]`), a granted turn goes unused. Each such refill marks the head's place and
//! wakes it, and a head that finds its place marked asks the backend again. Without it, a
//! head waiting for tokens would sleep through every refund until its turn came by the rate
//! alone. The mark lives in the place, not the bucket: buckets are many, waiters few.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use super::fair::{Fair, Key};
use crate::limit::backend::Cost;
use crate::limit::share::{NO_TENANT, Priority, Tenant, Who};

/// Which lane a request waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Lane {
    /// Requests sent again by the retry layer: served first.
    Retry,
    /// Requests not sent yet.
    New,
}

/// The queue itself.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    /// How many places are taken; read without the lock by the fast path. 32 bits, beside
    /// the lock's own word: a queue never holds four billion waiters, and every bucket has a
    /// queue.
    len: AtomicU32,
    /// Made when the first place is taken and dropped with the last: most buckets have no
    /// waiters most of the time, and every bucket has a queue.
    waiters: Mutex<Option<Box<Waiters>>>,
}

/// The places of a queue that has waiters, and the state that orders them.
#[derive(Debug, Default)]
struct Waiters {
    places: BTreeMap<Key, Entry>,
    fair: Fair,
    /// How many places each tenant that waits holds, by its id.
    per_tenant: HashMap<u64, u32>,
}

/// How many may wait in a queue: in all, and of one tenant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QueueBounds {
    pub(crate) max_queue: usize,
    pub(crate) max_per_tenant: Option<usize>,
}

impl Waiters {
    /// The place whose request goes next (see [`fair`](super::fair)).
    fn head(&self) -> Option<Key> {
        if !self.fair.owes_any() {
            return self.places.keys().next().copied();
        }
        let priority = self.fair.next_priority(self.waiting())?;
        self.first_of(priority)
    }

    fn first_of(&self, priority: Priority) -> Option<Key> {
        self.places
            .range(Key::first_of(priority)..)
            .next()
            .map(|(key, _)| *key)
            .filter(|key| key.priority == priority)
    }

    /// Which priorities have waiters.
    fn waiting(&self) -> [bool; 3] {
        Priority::ALL.map(|priority| self.first_of(priority).is_some())
    }

    /// Wakes the head, if it waits with a waker.
    fn wake_head(&self) {
        if let Some(waker) = self
            .head()
            .and_then(|head| self.places.get(&head))
            .and_then(|entry| entry.waker.as_ref())
        {
            waker.wake_by_ref();
        }
    }
}

/// Numbers places in the order they were taken: one counter for every queue, so a queue
/// carries no counter of its own. Within a queue, the numbers still rise with arrival.
static ARRIVALS: AtomicU64 = AtomicU64::new(0);

/// One waiting request.
#[derive(Debug)]
struct Entry {
    waker: Option<Waker>,
    cost: Cost,
    grant: Grant,
    /// Capacity came back since the head last asked the backend.
    refilled: bool,
    /// Whom it is for, if it said: for snapshots.
    tenant: Option<Tenant>,
}

/// Whether the head took a waiter's turn for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// No: it waits.
    None,
    /// Yes, and it has not seen that yet.
    Granted,
    /// Yes, and it is going with it.
    Claimed,
}

/// Where a request stands in its queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// First: it asks for its own turn.
    Head,
    /// The head took its turn for it: it may go.
    Granted,
}

impl Queue {
    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Acquire) as usize
    }

    /// Capacity came back (after it was given to the backend): marks the head's place and
    /// wakes it, if anyone waits.
    pub(crate) fn refilled(&self) {
        if self.is_empty() {
            return;
        }
        let mut waiters = self.waiters();
        let Some(waiters) = waiters.as_deref_mut() else {
            return;
        };
        if let Some(head) = waiters.head().and_then(|key| waiters.places.get_mut(&key)) {
            head.refilled = true;
            if let Some(waker) = &head.waker {
                waker.wake_by_ref();
            }
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Option<Box<Waiters>>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many wait, by priority (in the order of [`Priority::ALL`]) and by tenant (those
    /// that named one).
    pub(crate) fn census(&self) -> ([usize; 3], Vec<(Tenant, usize)>) {
        let mut by_priority = [0; 3];
        let mut by_tenant: Vec<(Tenant, usize)> = Vec::new();
        if let Some(waiters) = self.waiters().as_deref() {
            for (key, entry) in &waiters.places {
                by_priority[key.priority.index()] += 1;
                let Some(tenant) = &entry.tenant else {
                    continue;
                };
                match by_tenant.iter_mut().find(|(seen, _)| seen == tenant) {
                    Some((_, count)) => *count += 1,
                    None => by_tenant.push((tenant.clone(), 1)),
                }
            }
        }
        (by_priority, by_tenant)
    }

    /// Runs `read` on the entry of `key`, if it still waits.
    fn with_entry<T>(&self, key: &Key, read: impl FnOnce(&mut Entry) -> T) -> Option<T> {
        let mut waiters = self.waiters();
        waiters.as_deref_mut()?.places.get_mut(key).map(read)
    }
}

/// Something that owns a [`Queue`] (the bucket), so a place can keep it alive.
///
/// A bound, not a hidden type: a place knows its bucket's type. It keeps the queue free of
/// the bucket and its backend, and lets the queue's tests own a queue without a bucket.
pub(crate) trait HasQueue: Send + Sync {
    fn queue(&self) -> &Queue;

    /// Gives back a cost that was granted to a place whose request never went.
    fn give_back_grant(&self, cost: Cost);

    /// Each priority's minimum share of the turns while it waits, in millionths.
    fn min_share(&self) -> [u32; 3];
}

/// A place in a bucket's queue, given up on drop.
pub(crate) struct Place<B: HasQueue + ?Sized> {
    owner: Arc<B>,
    key: Key,
    /// Its request went: its turn counts for the order of those after it.
    went: bool,
}

impl<B: HasQueue + ?Sized> Place<B> {
    /// Takes a place for `who` in `lane`, unless the queue, or `who`'s tenant's part of it,
    /// is full: then `Err` with the bound it met. The bounds are exact: places are counted
    /// before anyone waits in them.
    pub(crate) fn take(
        owner: &Arc<B>,
        who: Who,
        lane: Lane,
        bounds: QueueBounds,
        cost: Cost,
    ) -> Result<Self, usize> {
        let queue = owner.queue();
        queue
            .len
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |len| {
                ((len as usize) < bounds.max_queue).then(|| len.saturating_add(1))
            })
            .map_err(|_| bounds.max_queue)?;
        let mut waiters = queue.waiters();
        let waiters = waiters.get_or_insert_with(Box::default);
        let tenant_places = waiters.per_tenant.entry(who.tenant_id()).or_insert(0);
        if let Some(most) = bounds.max_per_tenant {
            if *tenant_places as usize >= most {
                // Never the only place: a queue with none has room for every tenant.
                queue.len.fetch_sub(1, Ordering::AcqRel);
                return Err(most);
            }
        }
        *tenant_places += 1;
        // Under the queue's lock, so places of one queue are numbered in the order they
        // enter it.
        let seq = ARRIVALS.fetch_add(1, Ordering::Relaxed);
        let key = waiters.fair.key(&who, lane, cost, seq);
        waiters.places.insert(
            key,
            Entry {
                waker: None,
                cost,
                grant: Grant::None,
                refilled: false,
                tenant: who.tenant,
            },
        );
        Ok(Self {
            owner: Arc::clone(owner),
            key,
            went: false,
        })
    }

    /// Ready when this place is the head of the queue, or when the head granted it its turn
    /// (which it then owns); otherwise the task is woken once either may be so. The head's
    /// task is kept too, for [`Queue::refilled`] to wake.
    pub(crate) fn poll_position(&self, cx: &mut Context<'_>) -> Poll<Position> {
        let mut waiters = self.owner.queue().waiters();
        let Some(waiters) = waiters.as_deref_mut() else {
            return Poll::Pending;
        };
        let head = waiters.head() == Some(self.key);
        let Some(entry) = waiters.places.get_mut(&self.key) else {
            return Poll::Pending;
        };
        if entry.grant == Grant::Granted {
            entry.grant = Grant::Claimed;
            return Poll::Ready(Position::Granted);
        }
        match &entry.waker {
            Some(waker) if waker.will_wake(cx.waker()) => {}
            _ => entry.waker = Some(cx.waker().clone()),
        }
        if head {
            return Poll::Ready(Position::Head);
        }
        Poll::Pending
    }

    /// From the head: grants the first waiter behind it that has no grant yet its turn, if
    /// `take` takes its cost. `false` when there is none, or its cost does not fit: those
    /// further back wait, in order.
    pub(crate) fn grant_next(&self, take: impl FnOnce(Cost) -> bool) -> bool {
        let mut waiters = self.owner.queue().waiters();
        let Some(waiters) = waiters.as_deref_mut() else {
            return false;
        };
        let Some((_, entry)) = waiters
            .places
            .range_mut((Bound::Excluded(self.key), Bound::Unbounded))
            .find(|(_, entry)| entry.grant == Grant::None)
        else {
            return false;
        };
        if !take(entry.cost) {
            return false;
        }
        entry.grant = Grant::Granted;
        if let Some(waker) = &entry.waker {
            waker.wake_by_ref();
        }
        true
    }

    /// Whether capacity came back since the last call: the head calls it before it asks the
    /// backend, and again when woken from its sleep.
    pub(crate) fn take_refilled(&self) -> bool {
        self.owner
            .queue()
            .with_entry(&self.key, |entry| std::mem::take(&mut entry.refilled))
            .unwrap_or(false)
    }

    /// A granted turn was given back (the service below was busy): the place waits again,
    /// and may be granted again.
    pub(crate) fn unclaim(&self) {
        self.owner
            .queue()
            .with_entry(&self.key, |entry| entry.grant = Grant::None);
    }

    /// Its request goes: the place is given up, and its turn counts for the order of the
    /// places after it.
    pub(crate) fn went(mut self) {
        self.went = true;
    }

    pub(crate) fn owner(&self) -> &Arc<B> {
        &self.owner
    }
}

impl<B: HasQueue + ?Sized> Drop for Place<B> {
    fn drop(&mut self) {
        let queue = self.owner.queue();
        let mut guard = queue.waiters();
        let Some(waiters) = guard.as_deref_mut() else {
            return;
        };
        let was_head = waiters.head() == Some(self.key);
        let removed = waiters.places.remove(&self.key);
        if let Some(entry) = &removed {
            let tenant = entry.tenant.as_ref().map_or(NO_TENANT, Tenant::id);
            if let Some(places) = waiters.per_tenant.get_mut(&tenant) {
                *places -= 1;
                if *places == 0 {
                    waiters.per_tenant.remove(&tenant);
                }
            }
        }
        let unclaimed = removed
            .filter(|entry| entry.grant == Grant::Granted)
            .map(|entry| entry.cost);
        queue.len.fetch_sub(1, Ordering::AcqRel);
        if waiters.places.is_empty() {
            // The busy spell is over: the order starts afresh with the next.
            *guard = None;
        } else {
            if self.went {
                let (waiting, count) = (waiters.waiting(), waiters.places.len());
                waiters
                    .fair
                    .went(self.key, waiting, self.owner.min_share(), count);
            }
            // A turn that went may make a less urgent place the head: wake whoever it is.
            if was_head || self.went {
                waiters.wake_head();
            }
        }
        drop(guard);
        if let Some(cost) = unclaimed {
            self.owner.give_back_grant(cost);
        }
    }
}

impl<B: HasQueue + ?Sized> std::fmt::Debug for Place<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place")
            .field("priority", &self.key.priority)
            .field("lane", &self.key.lane)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use super::*;

    #[derive(Default)]
    struct Owner(Queue, std::sync::Mutex<Vec<Cost>>);

    impl HasQueue for Owner {
        fn queue(&self) -> &Queue {
            &self.0
        }

        fn give_back_grant(&self, cost: Cost) {
            self.1.lock().unwrap().push(cost);
        }

        fn min_share(&self) -> [u32; 3] {
            [0, 200_000, 100_000]
        }
    }

    fn position(place: &Place<Owner>) -> Option<Position> {
        let mut cx = Context::from_waker(Waker::noop());
        match place.poll_position(&mut cx) {
            Poll::Ready(position) => Some(position),
            Poll::Pending => None,
        }
    }

    fn is_head(place: &Place<Owner>) -> bool {
        position(place) == Some(Position::Head)
    }

    fn bound(max_queue: usize) -> QueueBounds {
        QueueBounds {
            max_queue,
            max_per_tenant: None,
        }
    }

    fn tokens(tokens: u64) -> Cost {
        Cost {
            requests: 1,
            tokens,
        }
    }

    #[test]
    fn places_are_served_in_order_with_retries_first() {
        let owner = Arc::new(Owner::default());
        let a = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(1)).unwrap();
        let b = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(1)).unwrap();
        assert!(is_head(&a) && !is_head(&b));
        let retry = Place::take(&owner, Who::default(), Lane::Retry, bound(10), tokens(1)).unwrap();
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
    fn the_head_grants_the_waiters_behind_it_in_order_while_their_costs_fit() {
        let owner = Arc::new(Owner::default());
        let head = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(500)).unwrap();
        let small = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(10)).unwrap();
        let big = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(400)).unwrap();
        let last = Place::take(&owner, Who::default(), Lane::New, bound(10), tokens(10)).unwrap();
        let fits = |cost: Cost| cost.tokens <= 100;
        assert!(head.grant_next(fits));
        // The big one is next: it does not fit, and the one behind it waits its turn.
        assert!(!head.grant_next(fits));
        assert_eq!(position(&small), Some(Position::Granted));
        assert_eq!((position(&big), position(&last)), (None, None));
        // A grant is seen once, and not granted twice.
        assert_eq!(position(&small), None);
        // A granted place dropped before its request went gives its cost back.
        assert!(head.grant_next(|_| true));
        drop(big);
        // One that gave its turn back waits, and may be granted again.
        small.unclaim();
        assert!(head.grant_next(|_| true));
        assert_eq!(position(&small), Some(Position::Granted));
        assert_eq!(*owner.1.lock().unwrap(), [tokens(400)]);
        drop((head, small, last));
        assert!(owner.0.is_empty());
    }

    #[test]
    fn the_bound_is_exact() {
        let owner = Arc::new(Owner::default());
        let places: Vec<_> = (0..3)
            .map(|_| Place::take(&owner, Who::default(), Lane::New, bound(3), tokens(1)).unwrap())
            .collect();
        assert_eq!(
            Place::take(&owner, Who::default(), Lane::Retry, bound(3), tokens(1)).err(),
            Some(3)
        );
        drop(places);
        assert!(Place::take(&owner, Who::default(), Lane::New, bound(3), tokens(1)).is_ok());
    }

    #[test]
    fn a_tenant_may_hold_only_its_part_of_the_queue() {
        let owner = Arc::new(Owner::default());
        let bounds = QueueBounds {
            max_queue: 10,
            max_per_tenant: Some(2),
        };
        let of = |tenant: &str| Who {
            tenant: Some(Tenant::new(tenant)),
            ..Who::default()
        };
        let a: Vec<_> = (0..2)
            .map(|_| Place::take(&owner, of("a"), Lane::New, bounds, tokens(1)).unwrap())
            .collect();
        assert_eq!(
            Place::take(&owner, of("a"), Lane::New, bounds, tokens(1)).err(),
            Some(2)
        );
        // Another tenant still has room, and a refused place is not counted.
        let b = Place::take(&owner, of("b"), Lane::New, bounds, tokens(1)).unwrap();
        assert_eq!(owner.0.len(), 3);
        drop(a);
        assert!(Place::take(&owner, of("a"), Lane::New, bounds, tokens(1)).is_ok());
        drop(b);
    }
}
