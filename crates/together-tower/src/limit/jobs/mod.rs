//! Job slots: a job-creating group's concurrency slots, held until the job ends.
//!
//! Together lets a key run 3 fine-tune jobs and 10 batches at once, and answers 409 to one
//! more. A job lives for hours, so its slot cannot be given back when the create call
//! answers. Instead:
//!
//! - A create that succeeds keeps its slot. The answer's `id` names it (read as the body
//!   streams past); an answer whose body is dropped unread keeps an unnamed slot.
//! - A slot goes back when an answer about the job shows it ended (`GET .../{id}`, a cancel,
//!   or the list, showing `completed`, `failed`, `cancelled`, `error`, `expired`), or when the
//!   job's time to live passes without such an answer. The time to live counts from the last
//!   answer that showed the job running, so a job polled while it runs keeps its slot.
//! - A list answer also counts jobs this process did not create (another process, or before
//!   this one started): each running job it shows holds a slot, and after the whole list,
//!   unnamed slots that matched no running job go back. One list call at start-up seeds the
//!   count.
//! - A 409 on create says every slot is in use, whatever this process knows: the free slots
//!   are taken as unnamed placeholders until a list answer corrects them or the recheck time
//!   passes, so the next create waits for a slot instead of going out to another 409.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::clock::TokioClock;
use crate::key::ApiKeyId;
use crate::limit::backend::gcra::nanos;
use crate::telemetry::{self, SlotRelease};

mod read;

pub(crate) use self::read::{JobSeen, created_id, read_jobs, reads_jobs};

/// How long job slots are held without news of their job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct JobTimes {
    /// How long a created job holds its slot if no answer shows it ending.
    pub(crate) ttl: Duration,
    /// How long the placeholders taken after a 409 hold their slots.
    pub(crate) recheck: Duration,
}

impl Default for JobTimes {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(24 * 60 * 60),
            recheck: Duration::from_secs(30),
        }
    }
}

/// The concurrency slots of one bucket, and the jobs that hold them.
pub(crate) struct Slots {
    semaphore: Arc<Semaphore>,
    total: usize,
    clock: TokioClock,
    times: JobTimes,
    key: ApiKeyId,
    group: Arc<str>,
    held: Mutex<Held>,
    /// The earliest expiry among held jobs, in clock nanoseconds (`u64::MAX`: none), so the
    /// common case checks one atomic and takes no lock.
    next_expiry: AtomicU64,
    /// Wakes the requests waiting for a slot when the next expiry moves, so they time their
    /// wait by it: a slot held by a job frees by expiry, without a release to wake them.
    expiry_moved: Arc<Notify>,
}

#[derive(Default)]
struct Held {
    jobs: Vec<HeldJob>,
    next_serial: u64,
}

/// One held slot.
struct HeldJob {
    serial: u64,
    /// The job's id, once known; `None` for a placeholder or an unread create answer.
    id: Option<Box<str>>,
    expires: Duration,
    _permit: OwnedSemaphorePermit,
}

impl Slots {
    pub(crate) fn new(
        total: u32,
        clock: TokioClock,
        times: JobTimes,
        key: ApiKeyId,
        group: Arc<str>,
    ) -> Self {
        let total = total as usize;
        Self {
            semaphore: Arc::new(Semaphore::new(total)),
            total,
            clock,
            times,
            key,
            group,
            held: Mutex::default(),
            next_expiry: AtomicU64::new(u64::MAX),
            expiry_moved: Arc::new(Notify::new()),
        }
    }

    /// Notified when the next expiry moves.
    pub(crate) fn expiry_moved(&self) -> Arc<Notify> {
        Arc::clone(&self.expiry_moved)
    }

    pub(crate) fn semaphore(&self) -> &Arc<Semaphore> {
        &self.semaphore
    }

    /// Whether any slot is taken, by a call under way or a job.
    pub(crate) fn in_use(&self) -> bool {
        self.semaphore.available_permits() < self.total
    }

    /// How many jobs hold slots now.
    pub(crate) fn held_jobs(&self) -> usize {
        self.lock().jobs.len()
    }

    fn lock(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the next held slot expires, if any does.
    pub(crate) fn next_expiry(&self) -> Option<Duration> {
        match self.next_expiry.load(Ordering::Acquire) {
            u64::MAX => None,
            at => Some(Duration::from_nanos(at)),
        }
    }

    /// Gives back the slots whose time passed. One atomic read while none is due.
    pub(crate) fn expire(&self) {
        let due = self.next_expiry.load(Ordering::Acquire);
        if due == u64::MAX || nanos(self.clock.elapsed()) < due {
            return;
        }
        let now = self.clock.elapsed();
        let mut held = self.lock();
        let before = held.jobs.len();
        held.jobs.retain(|job| job.expires > now);
        for _ in held.jobs.len()..before {
            telemetry::job_slot_released(self.key, &self.group, SlotRelease::Expired);
        }
        self.note_expiry(&held);
    }

    fn note_expiry(&self, held: &Held) {
        let next = held
            .jobs
            .iter()
            .map(|job| nanos(job.expires))
            .min()
            .unwrap_or(u64::MAX);
        if self.next_expiry.swap(next, Ordering::AcqRel) != next {
            self.expiry_moved.notify_waiters();
        }
    }

    fn push(
        &self,
        held: &mut Held,
        id: Option<Box<str>>,
        lives: Duration,
        permit: OwnedSemaphorePermit,
    ) -> u64 {
        let serial = held.next_serial;
        held.next_serial += 1;
        held.jobs.push(HeldJob {
            serial,
            id,
            expires: self.clock.elapsed().saturating_add(lives),
            _permit: permit,
        });
        serial
    }

    /// A create succeeded: its slot stays taken, for the time to live, until the job ends.
    /// Returns a number to name it by once the answer's body is read.
    pub(crate) fn hold(&self, permit: OwnedSemaphorePermit) -> u64 {
        let mut held = self.lock();
        let serial = self.push(&mut held, None, self.times.ttl, permit);
        self.note_expiry(&held);
        telemetry::job_slot_held(self.key, &self.group, held.jobs.len());
        serial
    }

    /// The create answer numbered `serial` named its job `id`.
    pub(crate) fn name(&self, serial: u64, id: String) {
        let mut held = self.lock();
        // A list may have shown the job first, and taken a slot for it.
        if let Some(at) = held
            .jobs
            .iter()
            .position(|job| job.id.as_deref() == Some(&id))
        {
            if held.jobs[at].serial != serial {
                held.jobs.swap_remove(at);
            }
        }
        if let Some(job) = held.jobs.iter_mut().find(|job| job.serial == serial) {
            job.id = Some(id.into_boxed_str());
        }
        self.note_expiry(&held);
    }

    /// A create was refused 409: every slot is in use at the server. Its own slot (`permit`)
    /// and the free ones become placeholders until the recheck time, or until a list says
    /// otherwise.
    pub(crate) fn refused(&self, permit: Option<OwnedSemaphorePermit>) {
        let mut held = self.lock();
        let mut taken = 0;
        let free = std::iter::from_fn(|| Arc::clone(&self.semaphore).try_acquire_owned().ok());
        for permit in permit.into_iter().chain(free) {
            self.push(&mut held, None, self.times.recheck, permit);
            taken += 1;
        }
        self.note_expiry(&held);
        telemetry::job_slots_taken_by_409(self.key, &self.group, taken, self.times.recheck);
    }

    /// Answers about jobs: ended jobs give their slots back, running ones hold one.
    /// `whole_list` says the answer listed every job of the key, so unnamed slots that matched
    /// no running job can go.
    pub(crate) fn seen(&self, jobs: &[JobSeen], whole_list: bool) {
        let mut held = self.lock();
        let mut running_matched = Vec::new();
        for seen in jobs {
            let at = held
                .jobs
                .iter()
                .position(|job| job.id.as_deref() == Some(seen.id.as_str()));
            match (at, seen.ended) {
                (Some(at), true) => {
                    held.jobs.swap_remove(at);
                    telemetry::job_slot_released(self.key, &self.group, SlotRelease::Ended);
                }
                (Some(at), false) => {
                    // Seen running: its time to live counts from now, not from its create.
                    held.jobs[at].expires = self.clock.elapsed().saturating_add(self.times.ttl);
                    running_matched.push(held.jobs[at].serial);
                }
                (None, true) => {}
                (None, false) => {
                    // A running job this process did not know: it takes an unnamed slot (a
                    // placeholder, or a create whose answer went unread), else a free one.
                    let ttl = self.times.ttl;
                    let expires = self.clock.elapsed().saturating_add(ttl);
                    if let Some(job) = held
                        .jobs
                        .iter_mut()
                        .find(|job| job.id.is_none() && !running_matched.contains(&job.serial))
                    {
                        job.id = Some(seen.id.clone().into_boxed_str());
                        job.expires = expires;
                        running_matched.push(job.serial);
                    } else if let Ok(permit) = Arc::clone(&self.semaphore).try_acquire_owned() {
                        let serial = self.push(
                            &mut held,
                            Some(seen.id.clone().into_boxed_str()),
                            ttl,
                            permit,
                        );
                        running_matched.push(serial);
                        telemetry::job_slot_held(self.key, &self.group, held.jobs.len());
                    }
                }
            }
        }
        if whole_list {
            let before = held.jobs.len();
            held.jobs
                .retain(|job| job.id.is_some() || running_matched.contains(&job.serial));
            for _ in held.jobs.len()..before {
                telemetry::job_slot_released(self.key, &self.group, SlotRelease::NotListed);
            }
        }
        self.note_expiry(&held);
    }
}

impl std::fmt::Debug for Slots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slots")
            .field("total", &self.total)
            .field("free", &self.semaphore.available_permits())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, ended: bool) -> JobSeen {
        JobSeen {
            id: id.into(),
            ended,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_holds_its_slot_until_it_is_seen_ended_or_its_time_passes() {
        let times = JobTimes {
            ttl: Duration::from_secs(100),
            recheck: Duration::from_secs(10),
        };
        let slots = Slots::new(2, TokioClock::new(), times, ApiKeyId::ANONYMOUS, "g".into());
        let take = || Arc::clone(slots.semaphore()).try_acquire_owned();
        let first = slots.hold(take().unwrap());
        slots.name(first, "a".into());
        let second = slots.hold(take().unwrap());
        assert!(take().is_err(), "both slots are held by jobs");

        // The second create's answer went unread; a list shows its job running, and "a" ended.
        slots.seen(&[seen("a", true), seen("b", false)], true);
        assert_eq!(slots.held_jobs(), 1);
        // The list named the unread create's slot, so the late name changes nothing.
        slots.name(second, "b".into());
        assert_eq!(slots.held_jobs(), 1);
        let third = take().unwrap();

        // Nothing more is heard of "b": its time passes.
        tokio::time::advance(Duration::from_secs(101)).await;
        slots.expire();
        assert_eq!(slots.held_jobs(), 0);
        drop(third);
        assert!(!slots.in_use());
    }

    #[tokio::test(start_paused = true)]
    async fn a_409_takes_every_free_slot_until_a_list_or_the_recheck() {
        let times = JobTimes {
            ttl: Duration::from_secs(100),
            recheck: Duration::from_secs(10),
        };
        let slots = Slots::new(3, TokioClock::new(), times, ApiKeyId::ANONYMOUS, "g".into());
        let mine = slots.hold(Arc::clone(slots.semaphore()).try_acquire_owned().unwrap());
        slots.name(mine, "mine".into());
        let sent = Arc::clone(slots.semaphore()).try_acquire_owned().unwrap();
        slots.refused(Some(sent));
        assert_eq!(slots.held_jobs(), 3);
        assert_eq!(slots.semaphore().available_permits(), 0);

        // A list shows one other job running: one placeholder becomes it, the other goes.
        slots.seen(&[seen("mine", false), seen("theirs", false)], true);
        assert_eq!(slots.held_jobs(), 2);
        assert_eq!(slots.semaphore().available_permits(), 1);

        // Placeholders not corrected by a list go at the recheck time.
        slots.refused(None);
        assert_eq!(slots.held_jobs(), 3);
        tokio::time::advance(Duration::from_secs(11)).await;
        slots.expire();
        assert_eq!(slots.held_jobs(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_seen_running_keeps_its_slot_a_time_to_live_past_the_answer() {
        let times = JobTimes {
            ttl: Duration::from_secs(100),
            recheck: Duration::from_secs(10),
        };
        let slots = Slots::new(1, TokioClock::new(), times, ApiKeyId::ANONYMOUS, "g".into());
        let job = slots.hold(Arc::clone(slots.semaphore()).try_acquire_owned().unwrap());
        slots.name(job, "long".into());
        // Polled as running at 90 s: held until 190 s, not freed at 100 s.
        tokio::time::advance(Duration::from_secs(90)).await;
        slots.seen(&[seen("long", false)], false);
        tokio::time::advance(Duration::from_secs(20)).await;
        slots.expire();
        assert_eq!(
            slots.held_jobs(),
            1,
            "a running job lost its slot at the create's ttl"
        );
        tokio::time::advance(Duration::from_secs(81)).await;
        slots.expire();
        assert_eq!(slots.held_jobs(), 0);
    }
}
