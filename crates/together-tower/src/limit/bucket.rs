//! Buckets: the state of one (API key, quota group), the fair gate in front of it, and the
//! bounded map that holds them.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::BoxError;

use super::backend::{Decision, Limiter};
use super::error::{RateLimited, SlotsBusy};
use crate::classify::EndpointClass;
use crate::clock::TokioClock;
use crate::key::ApiKeyId;
use crate::quota::GroupId;

/// Which bucket a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketKey {
    pub(crate) key: ApiKeyId,
    pub(crate) group: GroupId,
}

impl Hash for BucketKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // One word: the fingerprint is already a keyed hash of the API key.
        let group = u64::from(self.group.0).rotate_right(16);
        state.write_u64(self.key.as_u64() ^ group);
    }
}

/// Hashes [`BucketKey`]s for the bucket map: one folded multiply with per-process random seeds.
///
/// SipHash would cost more than the rest of the lookup. Fingerprints are already uniform, and
/// the random seeds keep someone who can choose API keys (and compute fingerprints under the
/// default, public secret) from steering many keys into one slot of the map.
#[derive(Clone, Copy)]
pub(crate) struct SeededMix {
    seeds: [u64; 2],
}

impl SeededMix {
    fn new() -> Self {
        let random = std::hash::RandomState::new();
        // An odd multiplier keeps every bit of the input in the product.
        Self {
            seeds: [random.hash_one(0u8), random.hash_one(1u8) | 1],
        }
    }
}

impl BuildHasher for SeededMix {
    type Hasher = MixHasher;

    fn build_hasher(&self) -> MixHasher {
        MixHasher {
            seeds: self.seeds,
            state: 0,
        }
    }
}

pub(crate) struct MixHasher {
    seeds: [u64; 2],
    state: u64,
}

impl Hasher for MixHasher {
    fn write_u64(&mut self, word: u64) {
        let product = u128::from(word ^ self.state ^ self.seeds[0]) * u128::from(self.seeds[1]);
        // Folding the high half into the low spreads every input bit over the low bits that
        // pick the slot.
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

/// One bucket. Times are readings of the layer's [`TokioClock`], in nanoseconds.
///
/// Laid out in declaration order (`repr(C)`) so that what every request reads (the waiter
/// count, the closure, the usage mark, the backend's state) shares the first cache lines, and
/// what only waiting requests touch comes after.
#[repr(C)]
pub(crate) struct Bucket<T> {
    /// Requests on the waiting path, queued or at the head.
    waiting: AtomicUsize,
    /// Until when the server told us to stop sending (0: open).
    closed_until: AtomicU64,
    /// Used since the last sweep of its shard. Cheaper than a timestamp: no clock read per request.
    recently_used: AtomicBool,
    /// The backend's rate state, if the group has a rate.
    rate: Option<T>,
    /// Concurrent-call slots, if the group limits them.
    slots: Option<Arc<Semaphore>>,
    /// How soon after a request the rate may let the next one go (see [`Close::earliest_next`]).
    earliest_next: Duration,
    /// The steady spacing of the rate, to estimate how long a queue takes to drain.
    interval: Duration,
    /// When the backend last said the next turn is due, to estimate waits without asking it.
    next_turn: AtomicU64,
    /// The queue: tokio's mutex hands itself over first come, first served, and only its
    /// holder (the head waiter) asks the backend and sleeps.
    gate: tokio::sync::Mutex<()>,
}

fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

impl<T> Bucket<T> {
    pub(crate) fn new(
        rate: Option<T>,
        interval: Duration,
        earliest_next: Duration,
        slots: Option<u32>,
    ) -> Self {
        Self {
            rate,
            interval,
            earliest_next,
            slots: slots.map(|slots| Arc::new(Semaphore::new(slots as usize))),
            gate: tokio::sync::Mutex::new(()),
            waiting: AtomicUsize::new(0),
            closed_until: AtomicU64::new(0),
            next_turn: AtomicU64::new(0),
            recently_used: AtomicBool::new(true),
        }
    }

    pub(crate) fn rate(&self) -> Option<&T> {
        self.rate.as_ref()
    }

    pub(crate) fn slots(&self) -> Option<&Arc<Semaphore>> {
        self.slots.as_ref()
    }

    fn touch(&self) {
        // Read first: most requests find the flag set, and a read leaves the cache line shared.
        if !self.recently_used.load(Ordering::Relaxed) {
            self.recently_used.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn has_waiters(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0
    }

    /// Whether the server's word closes the bucket now. Reads the clock only if the bucket was
    /// ever closed, and forgets a closure that has lapsed so later calls need no clock at all.
    pub(crate) fn is_closed(&self, clock: &TokioClock) -> bool {
        let until = self.closed_until.load(Ordering::Acquire);
        if until == 0 {
            return false;
        }
        if nanos(clock.elapsed()) < until {
            return true;
        }
        // A newer closure may have been stored meanwhile; only the lapsed one is cleared.
        let _ = self
            .closed_until
            .compare_exchange(until, 0, Ordering::AcqRel, Ordering::Acquire);
        false
    }

    /// How long the bucket stays closed by the server's word, if it is closed now.
    pub(crate) fn closed_for(&self, now: Duration) -> Option<Duration> {
        let until = self.closed_until.load(Ordering::Acquire);
        let now = nanos(now);
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Records the backend's word that no turn is free until `at`.
    pub(crate) fn next_turn_at(&self, at: Duration) {
        self.next_turn.store(nanos(at), Ordering::Release);
    }

    /// How long a newcomer can expect to wait: until the bucket opens and its next turn is
    /// due, then one turn for each waiter ahead.
    pub(crate) fn estimated_wait(&self, now: Duration) -> Duration {
        let next_turn = Duration::from_nanos(self.next_turn.load(Ordering::Acquire));
        let first = self
            .closed_for(now)
            .unwrap_or_default()
            .max(next_turn.saturating_sub(now));
        if self.rate.is_none() {
            return first;
        }
        let ahead = u32::try_from(self.waiting.load(Ordering::Acquire)).unwrap_or(u32::MAX);
        first.saturating_add(self.interval.saturating_mul(ahead))
    }

    /// Whether the bucket went unused for a whole sweep interval and is open; clears the
    /// "used" mark so that the next sweep can tell.
    fn take_idle(&self, now: Duration) -> bool {
        let used = self.recently_used.swap(false, Ordering::Relaxed);
        !used && self.waiting.load(Ordering::Acquire) == 0 && self.closed_for(now).is_none()
    }
}

/// Closing a bucket on the server's word, without naming the backend's type.
pub(crate) trait Close: Send + Sync {
    /// Keeps the bucket closed until at least `until`.
    fn close_until(&self, until: Duration);

    /// How soon after a request the bucket's own pacing may let the next one go: one interval
    /// less the pacing tolerance (zero without a rate).
    fn earliest_next(&self) -> Duration;
}

impl<T: Send + Sync> Close for Bucket<T> {
    fn close_until(&self, until: Duration) {
        self.closed_until.fetch_max(nanos(until), Ordering::AcqRel);
    }

    fn earliest_next(&self) -> Duration {
        self.earliest_next
    }
}

/// A place on a bucket's waiting path. It is taken before the request starts waiting, so the
/// queue bound is exact, and given back when the wait ends or the waiting future is dropped.
pub(crate) struct QueueSlot<T> {
    bucket: Arc<Bucket<T>>,
}

impl<T> QueueSlot<T> {
    /// Takes a place unless `max_queue` requests already wait.
    pub(crate) fn take(bucket: &Arc<Bucket<T>>, max_queue: usize) -> Option<Self> {
        let taken = bucket
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |waiting| {
                (waiting < max_queue).then_some(waiting + 1)
            });
        taken.is_ok().then(|| Self {
            bucket: Arc::clone(bucket),
        })
    }
}

impl<T> Drop for QueueSlot<T> {
    fn drop(&mut self) {
        self.bucket.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a waiting request needs to know besides its bucket.
pub(crate) struct Turn<L> {
    pub(crate) limiter: Arc<L>,
    pub(crate) clock: TokioClock,
    /// The clock reading when the request arrived.
    pub(crate) arrived: Duration,
    /// The latest clock reading at which the request may still be sent.
    pub(crate) deadline: Duration,
    pub(crate) class: EndpointClass,
}

impl<L: Limiter> Turn<L> {
    /// Waits for a slot (if the group has slots) and then a turn of the rate, in arrival order.
    ///
    /// Dropping the future at any point gives the place up and takes nothing: a slot is
    /// released with its permit, and the backend is only asked to take a turn by the head
    /// waiter, right before it returns.
    pub(crate) async fn wait(
        self,
        slot: QueueSlot<L::Bucket>,
    ) -> Result<Option<OwnedSemaphorePermit>, BoxError> {
        let bucket = &slot.bucket;
        let deadline = self.clock.instant_at(self.deadline);
        let permit = match bucket.slots() {
            Some(slots) => {
                let acquire = Arc::clone(slots).acquire_owned();
                match tokio::time::timeout_at(deadline, acquire).await {
                    Ok(permit) => Some(permit.map_err(|_| "concurrency slots closed")?),
                    Err(_) => return Err(self.slots_busy()),
                }
            }
            None => None,
        };
        let Ok(_head) = tokio::time::timeout_at(deadline, bucket.gate.lock()).await else {
            let now = self.clock.elapsed();
            return Err(RateLimited::new(bucket.estimated_wait(now), self.class).into());
        };
        loop {
            let now = self.clock.elapsed();
            let wait = match (bucket.closed_for(now), bucket.rate()) {
                (Some(closed), _) => closed,
                (None, None) => break,
                (None, Some(rate)) => match self.limiter.acquire(rate).await? {
                    Decision::Allow => break,
                    Decision::Wait(wait) => wait,
                },
            };
            let until = now.saturating_add(wait);
            bucket.next_turn_at(until);
            if until > self.deadline {
                return Err(RateLimited::new(wait, self.class).into());
            }
            tokio::time::sleep_until(self.clock.instant_at(until)).await;
        }
        Ok(permit)
    }

    fn slots_busy(&self) -> BoxError {
        let waited = self.clock.elapsed().saturating_sub(self.arrived);
        SlotsBusy::new(waited, self.class).into()
    }
}

/// The live buckets, in shards so that requests of different buckets rarely meet on a lock.
///
/// The map is bounded. Each shard is swept, when a bucket is added to it, at most once per
/// `sweep_every` (at least the longest refill time of any quota). A sweep drops the buckets that
/// are idle: nobody holds them, nobody waits on them, the server has not closed them, and they
/// went unused since the previous sweep. Such a bucket has been unused for a whole sweep
/// interval, so its quota has refilled and dropping it loses nothing. When a shard is full of
/// buckets that are not idle, an eighth of those nobody holds is dropped, those unused since
/// the last sweep first (those may forget a partly used burst). Buckets held by requests in
/// flight are never dropped, so a shard can hold more than its share only while that many
/// requests are in flight.
pub(crate) struct Buckets<T> {
    shards: Box<[Mutex<Shard<T>>]>,
    shard_capacity: usize,
    sweep_every: Duration,
}

struct Shard<T> {
    map: HashMap<BucketKey, Arc<Bucket<T>>, SeededMix>,
    next_sweep: Duration,
}

impl<T> Buckets<T> {
    pub(crate) fn new(max_buckets: usize, sweep_every: Duration) -> Self {
        let max_buckets = max_buckets.max(1);
        let shard_count = if max_buckets >= 1_024 { 16 } else { 1 };
        let hasher = SeededMix::new();
        let shards = (0..shard_count)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::with_hasher(hasher),
                    next_sweep: sweep_every,
                })
            })
            .collect();
        Self {
            shards,
            shard_capacity: max_buckets.div_ceil(shard_count),
            sweep_every,
        }
    }

    fn shard(&self, key: &BucketKey) -> MutexGuard<'_, Shard<T>> {
        // The fingerprint is already a keyed hash, so its low bits spread keys evenly.
        let spread = key.key.as_u64() as usize ^ usize::from(key.group.0);
        let shard = &self.shards[spread % self.shards.len()];
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The bucket for `key`, created by `make` if it is not live. The clock is read only when
    /// a bucket is added.
    pub(crate) fn get_or_insert_with(
        &self,
        key: BucketKey,
        clock: &TokioClock,
        make: impl FnOnce() -> Bucket<T>,
    ) -> Arc<Bucket<T>> {
        let mut shard = self.shard(&key);
        if let Some(bucket) = shard.map.get(&key) {
            bucket.touch();
            return Arc::clone(bucket);
        }
        let now = clock.elapsed();
        if now >= shard.next_sweep || shard.map.len() >= self.shard_capacity {
            shard.drop_idle(now);
            shard.next_sweep = now.saturating_add(self.sweep_every);
        }
        if shard.map.len() >= self.shard_capacity {
            shard.drop_some_unheld(self.shard_capacity.div_ceil(8));
        }
        let bucket = Arc::new(make());
        shard.map.insert(key, Arc::clone(&bucket));
        bucket
    }

    /// How many buckets are live.
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .map
                    .len()
            })
            .sum()
    }
}

impl<T> Shard<T> {
    fn drop_idle(&mut self, now: Duration) {
        // Under the shard lock, the map's reference is the only one unless a request holds it.
        self.map
            .retain(|_, bucket| Arc::strong_count(bucket) > 1 || !bucket.take_idle(now));
    }

    /// Drops up to `count` buckets that nobody holds, those unused since the last sweep first.
    fn drop_some_unheld(&mut self, count: usize) {
        let mut unheld: Vec<(bool, BucketKey)> = self
            .map
            .iter()
            .filter(|(_, bucket)| Arc::strong_count(bucket) == 1)
            .map(|(key, bucket)| (bucket.recently_used.load(Ordering::Relaxed), *key))
            .collect();
        let count = count.min(unheld.len());
        if count == 0 {
            return;
        }
        if count < unheld.len() {
            // `false` sorts first: the unused ones go before the recently used ones.
            unheld.select_nth_unstable_by_key(count - 1, |(used, _)| *used);
        }
        for (_, key) in &unheld[..count] {
            self.map.remove(key);
        }
    }
}
