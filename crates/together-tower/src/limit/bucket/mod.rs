//! One bucket: the state of one (API key, quota group, model).
//!
//! It holds the queue of requests waiting for it, whether the server closed it, the backend's
//! GCRA state, the rate controllers, and the concurrency slots of job-creating groups.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use self::names::{ModelName, ModelNames};
use self::queue::{HasQueue, Queue};
use crate::clock::TokioClock;
use crate::key::ApiKeyId;
use crate::limit::backend::gcra::{self, nanos};
use crate::limit::backend::{Backend, BucketSpec, Cost, Pace, Rates};
use crate::limit::jobs::{JobTimes, Slots};
use crate::limit::learn::adapt::{Adaptation, Controller, RateChanges};
use crate::limit::share::Tenant;
use crate::quota::{Group, GroupId, QuotaTable, Rate};

pub(crate) mod fair;
mod learn;
pub(crate) mod map;
pub(crate) mod names;
pub(crate) mod queue;

/// Which bucket a request belongs to: the key's fingerprint, the group, and a hash of the
/// model for groups limited per model (0 for none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BucketKey {
    pub(crate) key: ApiKeyId,
    pub(crate) group: GroupId,
    pub(crate) model: u64,
}

/// The pace of one dimension (requests or tokens) whose table rate is `configured`: the
/// controller's rate if it has one, keeping the configured burst and tolerance.
fn pace(
    controller: Option<&Controller>,
    configured: &Rate,
    now: u64,
    adaptation: Adaptation,
) -> Pace {
    let rate = match controller {
        Some(controller) => controller.rate(now),
        // What a controller without evidence would say.
        None => Controller::new(adaptation, configured.per_second_f64()).rate(now),
    };
    // The table's own rate keeps its exact interval; an adapted one is worked out.
    let pace = if rate == configured.per_second_f64() {
        gcra::Params::of(configured)
    } else {
        gcra::Params::at_rate(rate, configured.burst(), configured.tolerance())
    };
    Pace::from_gcra(pace)
}

/// What the bucket learned about its rates, behind one lock: only responses and rate changes
/// take it.
///
/// A dimension's controller is made on the first evidence about it. Until then the table's
/// rate is in force and the bucket carries none: most buckets of a gateway with many keys
/// never see a limit stated or a refusal, and a controller is bigger than the rest of a
/// bucket. The rates themselves are the group's, read from the table.
#[derive(Debug, Default)]
pub(crate) struct Controllers {
    requests: Option<Box<Controller>>,
    tokens: Option<Box<Controller>>,
}

impl Controllers {
    fn rates(&self, now: u64, group: &Group, adaptation: Adaptation) -> Rates {
        Rates {
            requests: group
                .rate()
                .map(|rate| pace(self.requests.as_deref(), &rate, now, adaptation)),
            tokens: group
                .tokens()
                .map(|rate| pace(self.tokens.as_deref(), &rate, now, adaptation)),
        }
    }

    fn each(&self) -> impl Iterator<Item = &Controller> {
        [&self.requests, &self.tokens]
            .into_iter()
            .filter_map(|controller| controller.as_deref())
    }

    /// When the rates next change by themselves.
    fn next_change(&self, now: u64) -> u64 {
        self.each()
            .filter_map(|controller| controller.next_change(now))
            .min()
            .unwrap_or(u64::MAX)
    }

    /// The request rate's controller, made now if there was none; `None` if the group has no
    /// request rate.
    pub(crate) fn requests(
        &mut self,
        group: &Group,
        adaptation: Adaptation,
    ) -> Option<&mut Controller> {
        let rate = group.rate()?;
        Some(made(&mut self.requests, &rate, adaptation))
    }

    /// The token rate's controller, made now if there was none; `None` if the group has no
    /// token budget.
    pub(crate) fn tokens(
        &mut self,
        group: &Group,
        adaptation: Adaptation,
    ) -> Option<&mut Controller> {
        let rate = group.tokens()?;
        Some(made(&mut self.tokens, &rate, adaptation))
    }

    fn at_rest(&self) -> bool {
        self.each().all(Controller::at_rest)
    }

    /// Whether every answer should be counted: while 503s are judged.
    pub(crate) fn watching(&self, now: u64) -> bool {
        self.each().any(|controller| controller.watching(now))
    }

    /// How often the rates changed, by the reason.
    pub(crate) fn changes(&self) -> RateChanges {
        self.each()
            .map(Controller::changes)
            .fold(RateChanges::default(), RateChanges::plus)
    }

    /// Lets each controller note what time alone changed.
    fn settle(&mut self, now: u64) {
        for controller in [&mut self.requests, &mut self.tokens].into_iter().flatten() {
            controller.settle(now);
        }
    }
}

/// The controller in `slot`, made for `configured` if there is none.
fn made<'a>(
    slot: &'a mut Option<Box<Controller>>,
    configured: &Rate,
    adaptation: Adaptation,
) -> &'a mut Controller {
    slot.get_or_insert_with(|| Box::new(Controller::new(adaptation, configured.per_second_f64())))
}

/// What every bucket of one [`Limits`](super::Limits) shares, so a bucket can act on a
/// response without the handle.
#[derive(Debug)]
pub(crate) struct BucketContext<L> {
    pub(crate) backend: L,
    pub(crate) clock: TokioClock,
    pub(crate) max_pause: Duration,
    pub(crate) default_pause: Duration,
    pub(crate) adaptation: Adaptation,
    pub(crate) job_times: JobTimes,
    /// The quota table, for each bucket's group.
    pub(crate) table: QuotaTable,
    /// Each group's name, by its id, shared by its buckets.
    pub(crate) group_names: Vec<Arc<str>>,
    /// Model names, shared by the buckets of each model.
    pub(crate) model_names: ModelNames,
    /// Each priority's minimum share of a queue's turns, in millionths.
    pub(crate) min_share: [u32; 3],
}

/// One bucket. Times are readings of the limiter's clock, in nanoseconds.
///
/// Laid out in declaration order (`repr(C)`) so what every request reads (the queue length,
/// the closure, the rate deadline, the usage mark, the backend's state) shares the first
/// cache lines.
#[repr(C)]
pub(crate) struct Bucket<L: Backend> {
    queue: Queue,
    /// Until when the server told us to stop sending (0: open).
    closed_until: AtomicU64,
    /// When the rates must be worked out again (`u64::MAX`: not until new evidence).
    rates_due: AtomicU64,
    /// Counts cuts and closures (see [`Controller::epoch`]), readable without the lock.
    epoch: AtomicU64,
    /// Used since the last sweep of its shard: cheaper than a timestamp.
    recently_used: AtomicBool,
    /// Every answer must be counted, not only those that say something: 503s are being judged.
    pub(crate) watching: AtomicBool,
    /// In the padding after the flags.
    group_id: GroupId,
    /// Refusals without a precise hint since the last answer served: each holds the bucket
    /// twice as long as the one before. In the padding after the flags.
    pub(crate) refused_in_a_row: AtomicU32,
    pub(crate) state: L::Bucket,
    pub(crate) context: Arc<BucketContext<L>>,
    controllers: Mutex<Controllers>,
    /// Concurrent-call slots, if the group limits them; a job-creating call's slot is held
    /// until its job ends.
    slots: Option<Arc<Slots>>,
    /// When the backend last said the next turn is due, to estimate waits without asking it.
    next_turn: AtomicU64,
    /// The request interval in force, for the same estimates.
    interval: AtomicU64,
    pub(crate) key: ApiKeyId,
    /// Shared with the other buckets of the model (see [`ModelNames`]).
    pub(crate) model: Option<ModelName>,
    /// When the first of those refusals came: the holds end a window after it at the latest.
    pub(crate) refused_from: AtomicU64,
}

impl<L: Backend> Bucket<L> {
    pub(crate) fn new(
        context: &Arc<BucketContext<L>>,
        key: ApiKeyId,
        group_id: GroupId,
        model: Option<ModelName>,
    ) -> Self {
        let group = context.table.group(group_id);
        let controllers = Controllers::default();
        let rates = controllers.rates(0, group, context.adaptation);
        let spec = BucketSpec {
            key,
            group: group.name(),
            model: model.as_deref(),
            rates,
        };
        let state = context.backend.bucket(spec);
        let interval = rates.requests.map_or(0, |pace| nanos(pace.interval()));
        Self {
            queue: Queue::default(),
            closed_until: AtomicU64::new(0),
            rates_due: AtomicU64::new(u64::MAX),
            epoch: AtomicU64::new(0),
            recently_used: AtomicBool::new(true),
            watching: AtomicBool::new(false),
            group_id,
            refused_in_a_row: AtomicU32::new(0),
            refused_from: AtomicU64::new(0),
            state,
            context: Arc::clone(context),
            controllers: Mutex::new(controllers),
            slots: group.concurrency().map(|slots| {
                Arc::new(Slots::new(
                    slots,
                    context.clock,
                    context.job_times,
                    key,
                    Arc::clone(&context.group_names[usize::from(group_id.0)]),
                ))
            }),
            next_turn: AtomicU64::new(0),
            interval: AtomicU64::new(interval),
            key,
            model,
        }
    }

    pub(crate) fn slots(&self) -> Option<&Arc<Slots>> {
        self.slots.as_ref()
    }

    pub(crate) fn has_rate(&self) -> bool {
        self.interval.load(Ordering::Relaxed) > 0 || self.group_quota().tokens().is_some()
    }

    /// The most tokens one request may cost: the token burst. Read from the table, as are
    /// the group's name and pace below: a gateway holds many buckets, and each copy would
    /// cost every one of them.
    pub(crate) fn token_capacity(&self) -> Option<u64> {
        self.group_quota()
            .tokens()
            .map(|rate| u64::from(rate.burst()))
    }

    /// How soon after a request its own pacing may let the next one go.
    pub(crate) fn earliest_next(&self) -> Duration {
        self.group_quota().rate().map_or(Duration::ZERO, |rate| {
            rate.interval().saturating_sub(rate.tolerance())
        })
    }

    /// The name of the bucket's quota group, shared by the group's buckets.
    pub(crate) fn group(&self) -> &Arc<str> {
        &self.context.group_names[usize::from(self.group_id.0)]
    }

    pub(crate) fn touch(&self) {
        // Read first: most requests find the flag set, and a read leaves the line shared.
        if !self.recently_used.load(Ordering::Relaxed) {
            self.recently_used.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn take_recently_used(&self) -> bool {
        self.recently_used.swap(false, Ordering::Relaxed)
    }

    pub(crate) fn recently_used(&self) -> bool {
        self.recently_used.load(Ordering::Relaxed)
    }

    /// Counts cuts and closures. A request remembers it when sent; trouble reported for a
    /// request sent in an older one is old news.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A cut or a closure: answers to requests sent before it were expected.
    pub(crate) fn next_epoch(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The bucket's group in the quota table.
    pub(crate) fn group_quota(&self) -> &Group {
        self.context.table.group(self.group_id)
    }

    pub(crate) fn controllers(&self) -> MutexGuard<'_, Controllers> {
        self.controllers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Works the rates out again if they are due to change, and gives them to the backend.
    /// One atomic read when they are not.
    pub(crate) fn refresh(&self, now: Duration) {
        if nanos(now) >= self.rates_due.load(Ordering::Acquire) {
            let mut controllers = self.controllers();
            self.apply(&mut controllers, now);
        }
    }

    /// Gives the rates in force to the backend and notes when they next change. Called with
    /// the controllers locked, after anything changed it.
    pub(crate) fn apply(&self, controllers: &mut Controllers, now: Duration) {
        let now_nanos = nanos(now);
        controllers.settle(now_nanos);
        let rates = controllers.rates(now_nanos, self.group_quota(), self.context.adaptation);
        self.context.backend.set_rates(&self.state, rates, now);
        if let Some(pace) = rates.requests {
            self.interval
                .store(nanos(pace.interval()), Ordering::Relaxed);
        }
        self.rates_due
            .store(controllers.next_change(now_nanos), Ordering::Release);
    }

    /// The rates in force now, for snapshots.
    pub(crate) fn rates_now(&self, now: Duration) -> Rates {
        self.controllers()
            .rates(nanos(now), self.group_quota(), self.context.adaptation)
    }

    /// Whether the server's word closes the bucket now. Reads the clock only if the bucket
    /// was ever closed, and forgets a lapsed closure so later calls need no clock at all.
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

    /// Keeps the bucket closed until at least `until`.
    pub(crate) fn close_until(&self, until: Duration) {
        self.closed_until.fetch_max(nanos(until), Ordering::AcqRel);
    }

    /// Keeps the bucket closed `by` longer than it already is (from `now` if it is open), but
    /// not past `most`.
    pub(crate) fn extend_closure(&self, now: Duration, by: Duration, most: Duration) {
        let (now, by, most) = (nanos(now), nanos(by), nanos(most));
        let _ = self
            .closed_until
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                Some(until.max(now).saturating_add(by).min(most.max(until)))
            });
    }

    pub(crate) fn has_waiters(&self) -> bool {
        !self.queue.is_empty()
    }

    pub(crate) fn queue_len(&self) -> usize {
        self.queue.len()
    }

    /// Its waiters by priority and by tenant (see [`Queue::census`]).
    pub(crate) fn census(&self) -> ([usize; 3], Vec<(Tenant, usize)>) {
        self.queue.census()
    }

    /// Records the backend's word that no turn is free until `at`.
    pub(crate) fn next_turn_at(&self, at: Duration) {
        self.next_turn.store(nanos(at), Ordering::Release);
    }

    /// The request interval in force.
    pub(crate) fn interval(&self) -> Duration {
        Duration::from_nanos(self.interval.load(Ordering::Relaxed))
    }

    /// How long a newcomer can expect to wait: until the bucket opens and its next turn is
    /// due, then one interval for each waiter ahead.
    pub(crate) fn estimated_wait(&self, now: Duration) -> Duration {
        let next_turn = Duration::from_nanos(self.next_turn.load(Ordering::Acquire));
        let first = self
            .closed_for(now)
            .unwrap_or_default()
            .max(next_turn.saturating_sub(now));
        let interval = Duration::from_nanos(self.interval.load(Ordering::Relaxed));
        let ahead = u32::try_from(self.queue.len()).unwrap_or(u32::MAX);
        first.saturating_add(interval.saturating_mul(ahead))
    }

    /// How long until forgetting the bucket would lose nothing: nobody waits, the server has
    /// not closed it, its GCRA state is full again, and it is not recovering from a cut.
    /// `None` while it holds something that time alone will not give back (waiters, a
    /// closure, a cut, a slot in use). A limit the server stated is not kept for: see
    /// [`Controller::at_rest`].
    pub(crate) fn until_rest(&self, now: Duration) -> Option<Duration> {
        if self.has_waiters()
            || self.closed_for(now).is_some()
            || self.slots.as_ref().is_some_and(|slots| slots.in_use())
            || !self.controllers().at_rest()
        {
            return None;
        }
        Some(self.context.backend.until_rest(&self.state, now))
    }
}

impl<L: Backend> HasQueue for Bucket<L> {
    fn queue(&self) -> &Queue {
        &self.queue
    }

    fn give_back_grant(&self, cost: Cost) {
        let now = self.context.clock.elapsed();
        self.context.backend.release(&self.state, cost, now);
        self.queue.refilled();
    }

    fn min_share(&self) -> [u32; 3] {
        self.context.min_share
    }
}
#[cfg(test)]
mod tests {
    use std::mem::size_of;

    use super::*;
    use crate::limit::LocalBackend;

    /// A gateway may hold a million live buckets: a bucket that has learned nothing carries
    /// no controller, and its group's and model's names are shared with the other buckets of
    /// the group and the model, and its queue's waiters live on the heap only while there
    /// are some. With its `Arc` and its map entry, a live bucket holds about 280 bytes of
    /// heap (the `buckets` benchmark).
    #[test]
    fn a_bucket_that_learned_nothing_stays_small() {
        assert!(
            size_of::<Bucket<LocalBackend>>() <= 192,
            "a bucket is {} bytes",
            size_of::<Bucket<LocalBackend>>()
        );
        assert_eq!(size_of::<Controllers>(), 2 * size_of::<usize>());
    }
}
