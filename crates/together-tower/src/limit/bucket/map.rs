//! The live buckets: a bounded map, in shards so requests of different buckets rarely meet on
//! a lock.
//!
//! Two rules keep it bounded without ever handing out more than a quota:
//!
//! - **Idle buckets go.** Each shard is swept, when a bucket is added to it, at most once per
//!   `sweep_every` (at least the longest refill time of any quota). A sweep drops the buckets
//!   that nobody holds or waits on, that the server has not closed, whose GCRA state is full
//!   again, and that went unused since the sweep before: a whole sweep interval. What such a
//!   bucket learned about the server's limits is forgotten with it.
//! - **A full shard drops only what is at rest.** When a shard is full, it drops buckets that
//!   are at rest (as above, and also having learned nothing), those unused since the last sweep
//!   first. A bucket in use is never dropped, however many new keys arrive: dropping it would
//!   hand its key a fresh burst. When nothing can go, the new key is refused with
//!   [`TooManyBuckets`](super::error::TooManyBuckets), and its `retry_after` says when a bucket
//!   will be at rest; until then the shard refuses new keys without looking again.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{Bucket, BucketKey};
use crate::clock::TokioClock;
use crate::limit::backend::Backend;

/// Hashes [`BucketKey`]s for the map: one folded multiply with per-process random seeds.
///
/// SipHash would cost more than the rest of the lookup. Fingerprints are already uniform, and
/// the random seeds keep someone who can choose API keys (and compute fingerprints under the
/// default, public secret) from steering many keys into one place in the map.
#[derive(Clone, Copy)]
pub(crate) struct SeededMix {
    seeds: [u64; 2],
}

impl SeededMix {
    pub(crate) fn new() -> Self {
        let random = std::hash::RandomState::new();
        // An odd multiplier keeps every bit of the input in the product.
        Self {
            seeds: [random.hash_one(0u8), random.hash_one(1u8) | 1],
        }
    }

    /// A bucket key as one word.
    fn fold(key: &BucketKey) -> u64 {
        let group = u64::from(key.group.0).rotate_right(16);
        key.key.as_u64() ^ group ^ key.model.rotate_left(7)
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
        // pick the place.
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

/// A [`BucketKey`] hashed as one word.
#[derive(Clone, Copy, PartialEq, Eq)]
struct MapKey(BucketKey);

impl std::hash::Hash for MapKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // One word: the fingerprint is already a keyed hash of the API key.
        state.write_u64(SeededMix::fold(&self.0));
    }
}

/// The map.
pub(crate) struct BucketMap<L: Backend> {
    shards: Box<[Mutex<Shard<L>>]>,
    shard_capacity: usize,
    sweep_every: Duration,
}

struct Shard<L: Backend> {
    map: HashMap<MapKey, Arc<Bucket<L>>, SeededMix>,
    next_sweep: Duration,
    /// Full of buckets in use until then: refuse new keys without looking again.
    full_until: Duration,
}

/// When a full shard cannot tell when a bucket will be at rest, it looks again after this.
const LOOK_AGAIN: Duration = Duration::from_millis(100);

impl<L: Backend> BucketMap<L> {
    pub(crate) fn new(max_buckets: usize, sweep_every: Duration) -> Self {
        let max_buckets = max_buckets.max(1);
        // A power of two (see `shard`).
        let shard_count = if max_buckets >= 1_024 { 16 } else { 1 };
        let hasher = SeededMix::new();
        let shards = (0..shard_count)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::with_hasher(hasher),
                    next_sweep: sweep_every,
                    full_until: Duration::ZERO,
                })
            })
            .collect();
        Self {
            shards,
            shard_capacity: max_buckets.div_ceil(shard_count),
            sweep_every,
        }
    }

    fn shard(&self, key: &BucketKey) -> MutexGuard<'_, Shard<L>> {
        // The fingerprint is already a keyed hash, so its low bits spread keys evenly.
        // The count is a power of two: a mask, not a division, picks the shard.
        let spread = SeededMix::fold(key) as usize;
        let shard = &self.shards[spread & (self.shards.len() - 1)];
        shard.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live bucket for `key`, if there is one.
    pub(crate) fn get(&self, key: &BucketKey) -> Option<Arc<Bucket<L>>> {
        self.shard(key).map.get(&MapKey(*key)).cloned()
    }

    /// The bucket for `key`, made by `make` if it is not live. The clock is read only when a
    /// bucket is added. `Err(retry_after)` when the shard is full of buckets in use.
    pub(crate) fn get_or_insert_with(
        &self,
        key: BucketKey,
        clock: &TokioClock,
        make: impl FnOnce() -> Bucket<L>,
    ) -> Result<Arc<Bucket<L>>, Duration> {
        let mut shard = self.shard(&key);
        if let Some(bucket) = shard.map.get(&MapKey(key)) {
            bucket.touch();
            return Ok(Arc::clone(bucket));
        }
        let now = clock.elapsed();
        if now >= shard.next_sweep {
            shard.drop_idle(now);
            shard.next_sweep = now.saturating_add(self.sweep_every);
        }
        if shard.map.len() >= self.shard_capacity {
            if now < shard.full_until {
                return Err(shard.full_until - now);
            }
            let soonest = shard.drop_at_rest(now, self.shard_capacity.div_ceil(8));
            if shard.map.len() >= self.shard_capacity {
                let wait = soonest.unwrap_or(LOOK_AGAIN).max(Duration::from_millis(1));
                shard.full_until = now.saturating_add(wait);
                return Err(wait);
            }
        }
        let bucket = Arc::new(make());
        shard.map.insert(MapKey(key), Arc::clone(&bucket));
        Ok(bucket)
    }

    /// How many buckets are live.
    pub(crate) fn len(&self) -> usize {
        self.each_shard(|shard| shard.map.len()).sum()
    }

    /// Every live bucket.
    pub(crate) fn all(&self) -> Vec<Arc<Bucket<L>>> {
        self.shards
            .iter()
            .flat_map(|shard| {
                let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
                shard.map.values().cloned().collect::<Vec<_>>()
            })
            .collect()
    }

    fn each_shard<'a, T>(
        &'a self,
        mut read: impl FnMut(&Shard<L>) -> T + 'a,
    ) -> impl Iterator<Item = T> + 'a {
        self.shards
            .iter()
            .map(move |shard| read(&shard.lock().unwrap_or_else(PoisonError::into_inner)))
    }
}

impl<L: Backend> Shard<L> {
    /// Drops the buckets idle for a whole sweep interval (see the module docs).
    fn drop_idle(&mut self, now: Duration) {
        // Under the shard lock, the map's reference is the only one unless a request holds it.
        self.map.retain(|_, bucket| {
            let used = bucket.take_recently_used();
            let idle = Arc::strong_count(bucket) == 1
                && !used
                && !bucket.has_waiters()
                && bucket.closed_for(now).is_none()
                && bucket
                    .context
                    .backend
                    .until_rest(&bucket.state, now)
                    .is_zero();
            !idle
        });
    }

    /// Drops up to `count` buckets at rest that nobody holds, those unused since the last
    /// sweep first. Returns how soon another bucket will be at rest, if known.
    fn drop_at_rest(&mut self, now: Duration, count: usize) -> Option<Duration> {
        let mut soonest: Option<Duration> = None;
        let mut at_rest: Vec<(bool, MapKey)> = Vec::new();
        for (key, bucket) in &self.map {
            if Arc::strong_count(bucket) > 1 {
                continue;
            }
            match bucket.until_rest(now) {
                Some(until) if until.is_zero() => at_rest.push((bucket.recently_used(), *key)),
                Some(until) => soonest = Some(soonest.map_or(until, |soonest| soonest.min(until))),
                None => {}
            }
        }
        let count = count.min(at_rest.len());
        if count > 0 && count < at_rest.len() {
            // `false` sorts first: the unused ones go before the recently used ones.
            at_rest.select_nth_unstable_by_key(count - 1, |(used, _)| *used);
        }
        for (_, key) in &at_rest[..count] {
            self.map.remove(key);
        }
        soonest
    }
}
