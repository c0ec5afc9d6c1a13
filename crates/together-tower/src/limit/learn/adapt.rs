//! Adapting a bucket's rate to what the server really allows.
//!
//! The table is where a bucket starts, not the truth. A [`Controller`] keeps the rate in force
//! for one dimension of one bucket (requests, or tokens) and moves it on evidence:
//!
//! - **The server's word.** A limit header (`x-ratelimit-limit`, `x-tokenlimit-limit` and their
//!   `-dynamic` forms, per second) sets the target, within the floor and the ceiling. One odd
//!   reading never moves it: a new value counts once two readings in a row agree, or the
//!   median of the last three moves. A learned limit that later answers stop repeating fades:
//!   [`FADE_AFTER`] after the last reading that agreed with it, the target goes back to the
//!   table's over [`FADE_OVER`], and a wrong reading cannot hold a bucket down for long.
//! - **Refusals.** A 429 the bucket's own pace did not expect means the real limit is below
//!   the rate the request was sent at. The rate is cut multiplicatively, at most once per
//!   server window ([`Adaptation::with_window`], a second): a request sent before the last
//!   cut, or within one window after it, met a server whose window still held traffic from
//!   before the cut, so its refusal says nothing about the rate since. From the first cut
//!   on, the answers served are counted by when their requests were sent: at a refusal,
//!   those of the window before it are what a server that counts the last window had
//!   counted, a reading of its limit. A rate far above that reading comes down to it in one
//!   step; a reading clearly above the wall the rate was recovering from is a limit that
//!   grew (as one earned by success does while it is used): a gentle cut, and the rate
//!   compounds again at once, a little faster than such a limit can grow. Clearly above
//!   means above the highest reading of the last ten windows too: readings of a fixed
//!   limit scatter by a tenth below it, and the last one may be low.
//! - **503s** are weaker evidence: most are the server's capacity, not the caller's rate. They
//!   move the rate only when a trial shows that they follow it (see
//!   [`pressure`](super::pressure)).
//! - **Recovery.** After a cut the rate climbs back along a cubic (TCP CUBIC's shape, as in the
//!   AWS SDK's adaptive mode): quickly at first, flattening as it nears a plateau just below
//!   the rate where trouble began (the wall). It holds there, then probes above it, slowly at
//!   first and faster as it gets away from the wall, so a limit that went back up is found
//!   again within seconds. A probe that finds the same wall again was only a little over it,
//!   so that cut is gentle (to 95%), and the next probe waits one more hold (up to three),
//!   since each costs a refusal; a probe that gets past the wall forgets it. For ten
//!   windows after a wall was first found far below the rate, one hold still: it may be an
//!   earned limit's base, where such a limit sits for its first seconds before it grows. A
//!   plateau within 3% of the target does not probe at all: it has nothing to gain but a 429.
//!
//! Times are nanoseconds on the limiter's clock; rates are units per second. Nothing here
//! reads a clock, so tests give exact schedules.

use std::time::Duration;

use super::pressure::{Pressure, Verdict};
use crate::telemetry::RateChange;

/// Which kind of limiting a bucket does.
///
/// What a refusal does in each mode:
///
/// | the server answers | `Static` | `Adaptive` |
/// |---|---|---|
/// | 429 with a precise hint (`retry-after-ms`, a fractional `x-ratelimit-reset` or `Retry-After`) | closes the bucket for the hint | the same; if the bucket's own pace did not expect it, also cuts the rate of the limit that ran out |
/// | 429 with a whole-second `Retry-After` only | closes the bucket for it (conservative: the server said a second) | holds the bucket a turn, twice as long for each refusal in a row, until a window after the first at most (a flood stops after a handful): proxies send a whole second by rote, and the refused request alone waits it (in the retry layer); an unexpected one cuts the rate |
/// | 429 without a hint | closes the bucket for [`default_pause`](crate::limit::LimitsBuilder::default_pause) | the same holds; cuts the rate, if unexpected |
/// | 503 | nothing | counted against the answers served; moves the rate only when a trial shows the 503s follow it: the rate held at what the server served for two windows, kept if the share of 503s fell by more than chance, undone if not |
/// | `x-ratelimit-remaining: 0` | closes the bucket until the reset, when that is later than its next turn | the same |
/// | `x-ratelimit-limit` (and tokens) | nothing | sets the rate, within floor and ceiling; fades back to the table when later answers stop saying it |
///
/// A cut is at most one per server window ([`Adaptation::with_window`]), and cuts the limit
/// a 429's body names (`dynamic_token_limited`: the tokens; `dynamic_request_limited`: the
/// requests).
///
/// In both modes the answer itself goes on to the retry layer, which sends the request again
/// by the same hint (a 429, a 503 unless it created a job), or hands it back when the hint is
/// longer than it will wait or the retries are spent. The limiter's own refusals are the same
/// in both modes, typed errors sent before anything reaches the server:
/// [`RateLimited`](crate::limit::error::RateLimited) (the wait would exceed `max_wait`),
/// [`QueueFull`](crate::limit::error::QueueFull), [`TooManyTokens`](crate::limit::error::TooManyTokens),
/// [`TooManyBuckets`](crate::limit::error::TooManyBuckets) and
/// [`SlotsBusy`](crate::limit::error::SlotsBusy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Mode {
    /// The table only. A 429 or a used-up limit closes the bucket for the server's hint; the
    /// rate never changes. Best when the table is known to be right and no other client
    /// shares the key: no probing, so no 429 is ever spent on it.
    Static,
    /// The table as the starting point, then the server's stated limits, its 429s, and 503s
    /// shown to follow the rate (the default). Converges on what the server allows when the
    /// table is wrong; when it is right, it keeps the whole quota and sends no 429. Random
    /// 503s, the platform's capacity rather than the caller's rate, leave the rate alone.
    #[default]
    Adaptive,
}

/// How rates adapt: the bounds and the shape of cuts and recovery.
///
/// | setting | default | meaning |
/// |---|---|---|
/// | `mode` | [`Mode::Adaptive`] | whether rates adapt at all |
/// | `floor` | 0.02 | the lowest rate, as a share of the table's; low enough that a limit earned from a base of a twentieth of the table is paced just below it, not at it |
/// | `ceiling` | 1.0 | the highest rate, as a multiple of the table's; raise it to let a server's stated limit take the rate above the table |
/// | `cut` | 0.8 | the share of the rate kept after trouble at a new wall (at a known wall, 0.95) |
/// | `margin` | 0.02 | how far below the wall the rate settles after trouble |
/// | `hold` | 2 s | how long the rate holds below the wall before it probes above it |
/// | `growth` | 0.02 | how fast the rate climbs, as a share of the target per second cubed |
/// | `window` | 1 s | the server's counting window: cuts are spaced by it, and 503s judged over it |
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptation {
    pub(crate) mode: Mode,
    pub(crate) window: Duration,
    pub(crate) floor: f64,
    pub(crate) ceiling: f64,
    pub(crate) cut: f64,
    pub(crate) margin: f64,
    pub(crate) hold: Duration,
    pub(crate) growth: f64,
}

impl Default for Adaptation {
    fn default() -> Self {
        Self {
            mode: Mode::Adaptive,
            window: Duration::from_secs(1),
            floor: 0.02,
            ceiling: 1.0,
            cut: 0.8,
            margin: 0.02,
            hold: Duration::from_secs(2),
            growth: 0.02,
        }
    }
}

impl Adaptation {
    /// Table only: never adapt.
    pub fn fixed() -> Self {
        Self {
            mode: Mode::Static,
            ..Self::default()
        }
    }

    /// The defaults, adapting.
    pub fn adaptive() -> Self {
        Self::default()
    }

    /// The mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The lowest rate, as a share of the table's (clamped to 0.001..=1).
    pub fn with_floor(mut self, share: f64) -> Self {
        self.floor = if share.is_finite() {
            share.clamp(0.001, 1.0)
        } else {
            self.floor
        };
        self
    }

    /// The highest rate, as a multiple of the table's (clamped to 1..=100). Above 1, a
    /// server's stated limit may take the rate above the table.
    pub fn with_ceiling(mut self, multiple: f64) -> Self {
        self.ceiling = if multiple.is_finite() {
            multiple.clamp(1.0, 100.0)
        } else {
            self.ceiling
        };
        self
    }

    /// The share of the rate kept after trouble at a new wall (clamped to 0.1..=0.95).
    pub fn with_cut(mut self, keep: f64) -> Self {
        self.cut = if keep.is_finite() {
            keep.clamp(0.1, 0.95)
        } else {
            self.cut
        };
        self
    }

    /// How long the rate holds below a wall before it probes above it.
    pub fn with_hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// The server's counting window (clamped to 10 ms..=60 s): the time a cut takes to show
    /// at the server. Servers count the last second; one that counts a minute would have its
    /// answers cut the rate again and again before the first cut showed.
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window.clamp(Duration::from_millis(10), Duration::from_secs(60));
        self
    }

    /// The server's counting window.
    pub fn window(&self) -> Duration {
        self.window
    }
}

/// How often a bucket's rates changed, by the reason, as [`Limits::snapshot`] shows them.
///
/// [`Limits::snapshot`]: crate::limit::Limits::snapshot
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RateChanges {
    /// The server stated a new limit (`x-ratelimit-limit`, `x-tokenlimit-limit`).
    pub stated: u64,
    /// A 429 that the bucket's own pace did not expect cut the rate.
    pub refused: u64,
    /// A share of 503s above the noise started a trial cut.
    pub unavailable: u64,
    /// A trial cut did not make the 503s fall: it was undone.
    pub noise: u64,
}

impl RateChanges {
    /// Counts one change.
    pub(crate) fn count(&mut self, why: RateChange) {
        let count = match why {
            RateChange::Stated => &mut self.stated,
            RateChange::Refused => &mut self.refused,
            RateChange::Unavailable => &mut self.unavailable,
            RateChange::Noise => &mut self.noise,
        };
        *count += 1;
    }

    /// Both counts together.
    pub(crate) fn plus(self, other: Self) -> Self {
        Self {
            stated: self.stated + other.stated,
            refused: self.refused + other.refused,
            unavailable: self.unavailable + other.unavailable,
            noise: self.noise + other.noise,
        }
    }
}

/// The share of the rate kept after trouble at a wall found before (within [`SAME_WALL`]).
const KNOWN_WALL_KEEP: f64 = 0.95;
/// A plateau within this share of the target does not probe: the most it could gain is less
/// than what a 429 costs.
const NOTHING_TO_GAIN: f64 = 0.03;
/// Trouble within this share of the last wall is trouble at the same wall.
const SAME_WALL: f64 = 0.05;
/// Readings within this share of each other agree.
const AGREE: f64 = 0.10;
/// How many times slower the probe grows above a capacity found by 503s than above a wall
/// found by a 429.
const SLOWER_PROBE: f64 = 8.0;
/// How long a learned limit holds after the last reading that agreed with it.
pub(crate) const FADE_AFTER: u64 = 10_000_000_000;
/// How long it then takes to fade back to the table's rate.
pub(crate) const FADE_OVER: u64 = 20_000_000_000;
/// How often a fading target is worked out again.
const FADE_STEP: u64 = 250_000_000;

const NANOS: f64 = 1e9;

/// The rate in force for one dimension of one bucket.
#[derive(Debug, Clone)]
pub(crate) struct Controller {
    settings: Adaptation,
    /// The table's rate, per second.
    configured: f64,
    /// The server's stated limit, per second, once readings agree, and when a reading last
    /// agreed with it.
    learned: Option<(f64, u64)>,
    readings: Readings,
    recovery: Option<Recovery>,
    /// The last wall and how often trouble came back at it.
    wall: Option<(f64, u32)>,
    /// The 503 evidence, from the first 503 on.
    unavailable: Option<Box<Unavailable>>,
    /// From the first cut after a 429 until the rate is back at the target: the answers
    /// served in the last window.
    served: Option<Served>,
    changes: RateChanges,
}

/// The answers served for requests sent in the last server window, by when they were sent.
/// At a refusal, that is what a server that counts the last window had counted when it
/// refused: a reading of its limit that holds however the bucket was paced or held back.
#[derive(Debug, Clone, Copy)]
struct Served {
    /// Answers served, in slots of a [`SLOTS`]th of a window by send time, one more than a
    /// window's: `slots[newest % RING]` counts the slot numbered `newest` since the clock's
    /// start. A reading spans the window and up to a slot more, so that the oldest answer
    /// the server still counted is never left out.
    slots: [u16; RING],
    newest: u64,
    /// The highest reading of the last [`TOP_KEPT`] windows, and when it was taken: readings
    /// of a fixed limit scatter below it by a tenth or so (how the server's window met the
    /// bucket's pace), so a limit has grown only when a reading clears the highest one, not
    /// merely the last.
    top: f64,
    top_at: u64,
    /// When a wall was first found far below the rate: it may be an earned limit's base.
    far_below_at: Option<u64>,
}

/// Slots a window is counted in: a reading is exact to one slot, a twentieth.
const SLOTS: usize = 20;
const RING: usize = SLOTS + 1;
/// A reading of fewer answers served than this says too little of a limit.
const FEWEST_SERVED: u32 = 5;
/// Windows the highest reading is remembered for.
const TOP_KEPT: u64 = 10;

impl Served {
    fn new() -> Self {
        Self {
            slots: [0; RING],
            newest: 0,
            top: 0.0,
            top_at: 0,
            far_below_at: None,
        }
    }

    fn slot_of(at: u64, window: u64) -> u64 {
        at / (window / SLOTS as u64).max(1)
    }

    /// Moves the newest slot to `slot`, emptying those passed.
    fn advance(&mut self, slot: u64) {
        if slot <= self.newest {
            return;
        }
        let passed = (slot - self.newest).min(RING as u64);
        for step in 1..=passed {
            self.slots[((self.newest + step) % RING as u64) as usize] = 0;
        }
        self.newest = slot;
    }

    /// Counts an answer served for a request sent at `sent_at`.
    fn count_served(&mut self, sent_at: u64, window: u64) {
        let slot = Self::slot_of(sent_at, window);
        self.advance(slot);
        if self.newest - slot < RING as u64 {
            let count = &mut self.slots[(slot % RING as u64) as usize];
            *count = count.saturating_add(1);
        }
    }

    /// Answers served a second for requests sent in the window before `sent_at`, if enough
    /// to say anything.
    fn reading(&mut self, sent_at: u64, window: u64) -> Option<f64> {
        self.advance(Self::slot_of(sent_at, window));
        let served: u32 = self.slots.iter().map(|&count| u32::from(count)).sum();
        (served >= FEWEST_SERVED).then(|| f64::from(served) * NANOS / window as f64)
    }

    /// The highest reading still remembered at `now`, if any.
    fn top(&self, now: u64, window: u64) -> Option<f64> {
        let kept = now.saturating_sub(self.top_at) <= window.saturating_mul(TOP_KEPT);
        (kept && self.top > 0.0).then_some(self.top)
    }

    /// Remembers `reading`, taken at `now`, and returns the highest reading before it that
    /// is still remembered.
    fn note_top(&mut self, reading: f64, now: u64, window: u64) -> Option<f64> {
        let top = self.top(now, window);
        if top.is_none_or(|top| reading >= top) {
            self.top = reading;
            self.top_at = now;
        }
        top
    }

    /// Whether a wall found at `now` may be an earned limit's base: one was first found far
    /// below the rate less than [`EARNING`] windows ago.
    fn may_be_earned_base(&self, now: u64, window: u64) -> bool {
        self.far_below_at
            .is_some_and(|at| now < at.saturating_add(window.saturating_mul(EARNING)))
    }
}

/// What 503s taught, and what a trial cut would give back if it is undone.
#[derive(Debug, Clone)]
struct Unavailable {
    pressure: Pressure,
    /// The course of the rate before the trial under way.
    before_trial: Option<BeforeTrial>,
}

/// What a trial cut would give back if it is undone.
#[derive(Debug, Clone, Copy)]
struct BeforeTrial {
    /// When the trial began.
    at: u64,
    recovery: Option<Recovery>,
    wall: Option<(f64, u32)>,
}

/// The course of the rate after a cut.
#[derive(Debug, Clone, Copy)]
struct Recovery {
    /// When the cut was made.
    at: u64,
    /// The rate right after the cut.
    start: f64,
    /// Where the climb flattens: just below the wall.
    plateau: f64,
    /// Seconds from the cut to the plateau.
    climb: f64,
    /// When probing above the plateau begins.
    probe_from: u64,
    /// How the probe grows.
    probe_growth: Growth,
    /// How often in a row the wall was found at about the same rate.
    hits: u32,
}

/// How the rate probes above a plateau: how long after reaching it, and how fast.
#[derive(Debug, Clone, Copy)]
struct Probe {
    after: u64,
    growth: Growth,
}

/// How a probe grows.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Growth {
    /// By this share of the target a second cubed.
    Cubic(f64),
    /// By this factor a second.
    Compound(f64),
}

/// A wall found this often in a row is probed after this many holds, not more.
const MOST_HOLDS: u32 = 3;
/// Windows after a wall was first found far below the rate in which it may be an earned
/// limit's base, and is probed after one hold however often it is found: Together's limits
/// are earned over the last ten seconds or more.
const EARNING: u64 = 10;

/// How fast a probe grows above a limit found far below the rate: 17% a second. A limit
/// earned by success (Together's: twice the successful rate of a recent span) grows as it is
/// used: twice a rate's own average over the last ten seconds keeps up with it while it grows
/// at most about 17% a second.
///
/// Probing an earned base sooner or faster was measured against a server with Together's
/// rule (`scripts/peer-server.py --earned 5 100`, 1,500 requests) and lost each time: from
/// the base after one window at this growth, 34.9 s (the rate stays below a limit that
/// grows as fast, and no refusal says so); at 25% or 30% a second, 34.2 s; from the wall
/// itself after half a window, 34.5 s; the cubic probe after one window's hold rather than
/// two seconds, 34.6 s; today's hold and cubic probe, 33.3 s in most runs (33.1 s since a
/// refusal holds the bucket one turn, not two). Each refusal at a base of 5 a second costs
/// turns at it, and those are the successes the limit is earned from.
const COMPOUND: f64 = 1.17;
/// How fast the rate compounds once a reading showed the limit grew: a little faster than
/// such a limit can (about 17% a second), so that the rate keeps meeting it and each refusal
/// reads it again. A rate below an earned limit earns less than the limit could grow:
/// compounding only as fast, it would fall behind and stay there.
const GROWN_COMPOUND: f64 = 1.2;

/// The last three limit readings.
#[derive(Debug, Clone, Copy, Default)]
struct Readings {
    values: [f64; 3],
    count: usize,
}

impl Readings {
    fn push(&mut self, value: f64) {
        self.values.rotate_left(1);
        self.values[2] = value;
        self.count = (self.count + 1).min(3);
    }

    /// The value the readings agree on: the last two, if they agree; else the median of three.
    fn agreed(&self) -> Option<f64> {
        let [a, b, c] = self.values;
        if self.count >= 2 && agree(b, c) {
            return Some(b.min(c));
        }
        if self.count == 3 {
            let mut sorted = [a, b, c];
            sorted.sort_by(f64::total_cmp);
            return Some(sorted[1]);
        }
        None
    }
}

/// Whether a wall found at `wall` is the one found before at `last`.
fn same_wall(wall: f64, last: f64) -> bool {
    (wall - last).abs() <= SAME_WALL * last
}

fn agree(a: f64, b: f64) -> bool {
    (a - b).abs() <= AGREE * a.max(b)
}

impl Controller {
    /// A controller starting at the table's rate, `configured` units a second.
    pub(crate) fn new(settings: Adaptation, configured: f64) -> Self {
        Self {
            settings,
            configured,
            learned: None,
            readings: Readings::default(),
            recovery: None,
            wall: None,
            unavailable: None,
            served: None,
            changes: RateChanges::default(),
        }
    }

    /// How often this controller changed the rate, by the reason.
    pub(crate) fn changes(&self) -> RateChanges {
        self.changes
    }

    /// The usual probe: after the hold, at the configured growth.
    fn probe(&self) -> Probe {
        Probe {
            after: crate::limit::backend::gcra::nanos(self.settings.hold),
            growth: Growth::Cubic(self.settings.growth),
        }
    }

    fn window(&self) -> u64 {
        crate::limit::backend::gcra::nanos(self.settings.window)
    }

    fn adaptive(&self) -> bool {
        self.settings.mode == Mode::Adaptive
    }

    fn floor(&self) -> f64 {
        self.configured * self.settings.floor
    }

    /// The most the rate may be at `now`: the server's stated limit if known (fading back to
    /// the table's once no reading has agreed with it for [`FADE_AFTER`]), else the table's,
    /// within the floor and the ceiling.
    pub(crate) fn target(&self, now: u64) -> f64 {
        let ceiling = self.configured * self.settings.ceiling;
        let limit = match self.learned {
            None => self.configured,
            Some((learned, confirmed)) => {
                let fading = now.saturating_sub(confirmed.saturating_add(FADE_AFTER));
                let faded = (fading as f64 / FADE_OVER as f64).min(1.0);
                learned + (self.configured - learned) * faded
            }
        };
        limit.clamp(self.floor(), ceiling)
    }

    /// The rate in force at `now`.
    pub(crate) fn rate(&self, now: u64) -> f64 {
        let target = self.target(now);
        let Some(recovery) = self.recovery else {
            return target;
        };
        if self.in_trial() {
            // A trial holds its cut until it is judged.
            return recovery.start.clamp(self.floor(), target);
        }
        let since = now.saturating_sub(recovery.at) as f64 / NANOS;
        let rate = if since < recovery.climb {
            // Concave: fast at first, flat as it nears the plateau.
            let left = 1.0 - since / recovery.climb;
            recovery.plateau - (recovery.plateau - recovery.start) * left * left * left
        } else if now < recovery.probe_from {
            recovery.plateau
        } else {
            let probing = (now - recovery.probe_from) as f64 / NANOS;
            match recovery.probe_growth {
                // Convex: slow near the wall, faster as it gets away from it.
                Growth::Cubic(growth) => {
                    recovery.plateau + growth * target * probing * probing * probing
                }
                // By a share a second, as a limit earned by success grows.
                Growth::Compound(per_second) => recovery.plateau * per_second.powf(probing),
            }
        };
        rate.clamp(self.floor(), target)
    }

    /// When the rate next changes by itself (`None`: it stays until new evidence).
    pub(crate) fn next_change(&self, now: u64) -> Option<u64> {
        let fade = self.learned.map(|(_, confirmed)| {
            let from = confirmed.saturating_add(FADE_AFTER);
            if now < from {
                from
            } else {
                now.saturating_add(FADE_STEP)
            }
        });
        let course = self.next_change_of_course(now);
        match (fade, course) {
            (Some(fade), Some(course)) => Some(fade.min(course)),
            (fade, course) => fade.or(course),
        }
    }

    fn next_change_of_course(&self, now: u64) -> Option<u64> {
        let recovery = self.recovery?;
        let climb_end = recovery.at.saturating_add(secs(recovery.climb));
        Some(if now < climb_end {
            // Re-evaluated often enough to follow the curve closely.
            now.saturating_add(20_000_000)
        } else if now < recovery.probe_from {
            recovery.probe_from
        } else {
            now.saturating_add(50_000_000)
        })
    }

    /// Forgets a recovery that has come back to the target, and a learned limit that has
    /// faded, so the bucket can rest.
    pub(crate) fn settle(&mut self, now: u64) {
        if self
            .learned
            .is_some_and(|(_, confirmed)| now >= confirmed.saturating_add(FADE_AFTER + FADE_OVER))
        {
            self.learned = None;
        }
        let trial = self.in_trial();
        if !trial && self.recovery.is_some() && self.rate(now) >= self.target(now) {
            self.recovery = None;
        }
        if self.recovery.is_none() {
            self.served = None;
        }
        if let (Some((wall, _)), Some(recovery)) = (self.wall, self.recovery) {
            // A probe that got clearly past the wall without trouble: the wall has moved.
            if now >= recovery.probe_from && self.rate(now) > wall * (1.0 + SAME_WALL) {
                self.wall = None;
            }
        }
    }

    /// Whether forgetting the controller loses nothing worth a bucket's room: no cut is being
    /// recovered from.
    ///
    /// A limit the server stated does not count: the next answer that carries the headers
    /// states it again, and held on to, it would make every bucket of a server that states
    /// its limits on every answer undroppable, so that a flood of new model names fills the
    /// map and locks new keys out.
    pub(crate) fn at_rest(&self) -> bool {
        self.recovery.is_none() && !self.in_trial()
    }

    fn in_trial(&self) -> bool {
        self.unavailable
            .as_ref()
            .is_some_and(|unavailable| unavailable.pressure.in_trial())
    }

    /// Whether every answer should be counted ([`Controller::answered`]), not only those
    /// that say something: while 503s are being judged.
    pub(crate) fn watching(&self, now: u64) -> bool {
        self.served.is_some()
            || self
                .unavailable
                .as_ref()
                .is_some_and(|unavailable| unavailable.pressure.watching(now))
    }

    /// The server stated its limit at `now`: `per_second` units a second. Returns whether the
    /// target changed.
    pub(crate) fn stated_limit(&mut self, per_second: f64, now: u64) -> bool {
        if !self.adaptive() || !per_second.is_finite() || per_second <= 0.0 {
            return false;
        }
        self.readings.push(per_second);
        let Some(agreed) = self.readings.agreed() else {
            return false;
        };
        if let Some((learned, confirmed)) = &mut self.learned {
            if agree(*learned, agreed) {
                // Said again: it holds for another while.
                *confirmed = now;
                if (*learned - agreed).abs() <= 0.02 * *learned {
                    return false;
                }
            }
        }
        let before = self.target(now);
        self.learned = Some((agreed, now));
        let target = self.target(now);
        if let Some(recovery) = &mut self.recovery {
            if target > before {
                // The limit went up: what was learned about the old one no longer holds.
                self.recovery = None;
                self.wall = None;
            } else {
                recovery.plateau = recovery.plateau.min(target);
            }
        }
        let changed = (target - before).abs() > f64::EPSILON;
        if changed {
            self.changes.count(RateChange::Stated);
        }
        changed
    }

    /// A refusal (429) that the bucket's own pace did not expect (the bucket checks that the
    /// request was sent since its last closure), for a request sent at `sent_at`. Returns
    /// whether the rate was cut: not for a request sent within one server window of the last
    /// cut, whose server still counted traffic from before it.
    pub(crate) fn trouble(&mut self, sent_at: u64, now: u64) -> bool {
        if !self.adaptive() {
            return false;
        }
        if self
            .recovery
            .is_some_and(|recovery| sent_at < recovery.at.saturating_add(self.window()))
        {
            return false;
        }
        if let Some(unavailable) = &mut self.unavailable {
            // A 429 is the stronger word: a trial's cut stays.
            unavailable.pressure.end_trial(now);
            unavailable.before_trial = None;
        }
        self.cut_on_refusal(sent_at, now);
        self.served.get_or_insert_with(Served::new);
        self.changes.count(RateChange::Refused);
        true
    }

    /// Cuts the rate on a refusal at `now` of a request sent at `sent_at`, by how far above
    /// the server's limit it was.
    fn cut_on_refusal(&mut self, sent_at: u64, now: u64) {
        let rate = self.rate(now);
        let window = self.window();
        let mut top = None;
        let served = self.served.as_mut().and_then(|ring| {
            let reading = ring.reading(sent_at, window)?;
            top = ring.note_top(reading, now, window);
            Some(reading)
        });
        // No higher than what the server served, so that the climb back flattens below the
        // server's limit, not below the rate that met it.
        let wall = rate.min(served.unwrap_or(rate));
        if served.is_some_and(|served| self.limit_grew(served, top)) {
            // Served clearly more than at the wall the rate was recovering from: a limit
            // that grows as it is used, as one earned by success does (Together's are
            // twice the successful rate of a recent span). The rate goes to what was served,
            // with no margin below it (the limit is at least that, and growing), and
            // compounds again at once: every share below the limit that the rate spends is
            // a share less earned, and the shortfall compounds.
            self.wall = Some((wall, 1));
            let probe = Probe {
                after: 0,
                growth: Growth::Compound(GROWN_COMPOUND),
            };
            self.recover(now, wall, wall, probe);
        } else if served.is_some_and(|served| served < rate * self.settings.cut) {
            // Far above what the server takes: down to it in one step. A limit found there
            // for the first time may be one earned by success, which grows as the requests
            // it serves do: the rate probes above it a window later, compounding. Found
            // there again, it is a wall, and the probe is the usual.
            let again = self.wall.is_some_and(|(last, _)| same_wall(wall, last));
            self.wall = Some((wall, if again { 2 } else { 1 }));
            if let Some(served) = self.served.as_mut() {
                served.far_below_at.get_or_insert(now);
            }
            let probe = if again {
                self.probe()
            } else {
                Probe {
                    after: self.window(),
                    growth: Growth::Compound(COMPOUND),
                }
            };
            self.recover(now, wall * (1.0 - self.settings.margin), wall, probe);
        } else {
            self.cut(now, wall, None);
        }
    }

    /// The wall the rate is recovering from, if it is.
    fn recovering_from(&self) -> Option<f64> {
        self.recovery
            .map(|recovery| recovery.plateau / (1.0 - self.settings.margin))
    }

    /// The highest reading of what the server served still remembered at `now`.
    fn highest_reading(&self, now: u64) -> Option<f64> {
        self.served.as_ref()?.top(now, self.window())
    }

    /// How often in a row the wall the rate is recovering from was found.
    fn hits_at_recovered_wall(&self) -> u32 {
        self.recovery.map_or(1, |recovery| recovery.hits)
    }

    /// Whether the server served clearly more than the wall the rate was recovering from,
    /// and than the highest reading remembered (`top`): a limit that grew, as one earned by
    /// success does while it is used.
    fn limit_grew(&self, served: f64, top: Option<f64>) -> bool {
        self.recovering_from().is_some_and(|wall| {
            let highest = top.map_or(wall, |top| wall.max(top));
            served > highest * (1.0 + SAME_WALL)
        })
    }

    /// Cuts the rate at `now` from `wall`, keeping `keep` of it (`None`: the usual cut,
    /// gentler at a wall found before). The climb back flattens just below the wall.
    fn cut(&mut self, now: u64, wall: f64, keep: Option<f64>) {
        let same = |last: f64| same_wall(wall, last);
        let hits = match self.wall {
            Some((last, hits)) if same(last) => hits + 1,
            // A probe gets past its wall before the refusal that finds it again comes back;
            // the wall the rate recovers from still counts.
            _ if self.recovering_from().is_some_and(same) => self.hits_at_recovered_wall() + 1,
            // Back at the highest reading: the wall itself, found again after a reading that
            // came in low.
            _ if self.highest_reading(now).is_some_and(same) => 2,
            _ => 1,
        };
        self.wall = Some((wall, hits));
        // At a wall found before, a probe went a little over it: a gentle cut will do. A new
        // wall says nothing of how far over the rate is: cut hard, and cut again if needed.
        let keep = keep.unwrap_or(if hits > 1 {
            KNOWN_WALL_KEEP
        } else {
            self.settings.cut
        });
        // A wall found again and again is probed less often: each probe costs a refusal.
        // Not while the wall may be an earned limit's base, though: one found far below the
        // rate sits there until enough successes are counted (five seconds of them for
        // Together's), then grows, and a probe held back then falls behind for good.
        let window = self.window();
        let earning = self
            .served
            .as_ref()
            .is_some_and(|served| served.may_be_earned_base(now, window));
        let holds = if earning { 1 } else { hits.min(MOST_HOLDS) };
        let probe = Probe {
            after: self.probe().after * u64::from(holds),
            ..self.probe()
        };
        self.recover(now, wall * keep, wall, probe);
        if let Some(recovery) = &mut self.recovery {
            recovery.hits = hits;
        }
    }

    /// Sets the course of the rate from `start` at `now`: a climb that flattens just below
    /// `wall`, a hold, then probing above it as `probe` says.
    fn recover(&mut self, now: u64, start: f64, wall: f64, probe: Probe) {
        let target = self.target(now);
        let start = start.max(self.floor());
        let plateau = (wall * (1.0 - self.settings.margin)).max(start);
        let climb = if plateau > start {
            ((plateau - start) / (self.settings.growth * target)).cbrt()
        } else {
            0.0
        };
        // A plateau this close to the target has nothing to gain from probing but a 429.
        let probe_from = if plateau >= target * (1.0 - NOTHING_TO_GAIN) {
            u64::MAX
        } else {
            now.saturating_add(secs(climb)).saturating_add(probe.after)
        };
        self.recovery = Some(Recovery {
            at: now,
            start,
            plateau,
            climb,
            probe_from,
            probe_growth: probe.growth,
            hits: 1,
        });
    }

    /// Counts the answer to a request sent at `sent_at` for the 503 evidence: a 503 if
    /// `unavailable`, else an answer the server served. Returns the change it made to the
    /// rate, if any: a trial cut, or a trial undone.
    pub(crate) fn answered(
        &mut self,
        sent_at: u64,
        unavailable: bool,
        now: u64,
    ) -> Option<RateChange> {
        if !self.adaptive() {
            return None;
        }
        let window = self.window();
        if let (Some(served), false) = (&mut self.served, unavailable) {
            served.count_served(sent_at, window);
        }
        // The rate before any verdict: a trial under way holds its own.
        let rate = self.rate(now);
        let evidence = match &mut self.unavailable {
            Some(evidence) => evidence,
            None if unavailable => self.unavailable.insert(Box::new(Unavailable {
                pressure: Pressure::starting_at(sent_at),
                before_trial: None,
            })),
            None => return None,
        };
        match evidence
            .pressure
            .answered(sent_at, unavailable, now, window)
        {
            Verdict::Nothing => None,
            Verdict::Trial { served } => {
                let keep = Pressure::trial_keep(served, rate);
                evidence.before_trial = Some(BeforeTrial {
                    at: now,
                    recovery: self.recovery,
                    wall: self.wall,
                });
                self.recover(now, rate * keep, rate, self.probe());
                self.changes.count(RateChange::Unavailable);
                Some(RateChange::Unavailable)
            }
            Verdict::Pressure { capacity } => {
                // What the server served a second is its capacity: the rate climbs back to
                // just below it, from the trial's.
                evidence.before_trial = None;
                // 503s are judged a window or two late, where a 429 answers at once: the
                // probe above a capacity grows [`SLOWER_PROBE`] times slower.
                // If the trial's rate is still above it, the rate goes down to it.
                self.wall = Some((capacity, 1));
                let start = rate.min(capacity);
                let probe = Probe {
                    growth: Growth::Cubic(self.settings.growth / SLOWER_PROBE),
                    ..self.probe()
                };
                self.recover(now, start, capacity, probe);
                None
            }
            Verdict::Noise => {
                if let Some(before) = evidence.before_trial.take() {
                    // The course resumes where the trial paused it.
                    let paused = now.saturating_sub(before.at);
                    self.recovery = before.recovery.map(|mut recovery| {
                        recovery.at = recovery.at.saturating_add(paused);
                        recovery.probe_from = recovery.probe_from.saturating_add(paused);
                        recovery
                    });
                    self.wall = before.wall;
                }
                self.changes.count(RateChange::Noise);
                Some(RateChange::Noise)
            }
        }
    }
}

fn secs(seconds: f64) -> u64 {
    (seconds * NANOS).clamp(0.0, u64::MAX as f64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    fn adaptive() -> Controller {
        Controller::new(Adaptation::default(), 100.0)
    }

    #[test]
    fn a_controller_without_evidence_runs_at_the_table_rate() {
        let controller = adaptive();
        assert_eq!(controller.rate(0), 100.0);
        assert_eq!(controller.rate(3_600 * S), 100.0);
        assert!(controller.at_rest());
        assert_eq!(controller.next_change(0), None);
    }

    #[test]
    fn trouble_at_the_target_cuts_then_settles_just_below_it_for_good() {
        let mut controller = adaptive();
        assert!(controller.trouble(10 * S, 10 * S));
        // Cut to 80% of 100.
        assert!((controller.rate(10 * S) - 80.0).abs() < 1e-9);
        // The climb: 18 units in cbrt(18 / 2) = 2.08 s, concave.
        let climb = (18.0f64 / 2.0).cbrt();
        let halfway = controller.rate(10 * S + secs(climb / 2.0));
        assert!(halfway > 80.0 + 18.0 * 0.85, "{halfway}");
        assert!((controller.rate(10 * S + secs(climb)) - 98.0).abs() < 1e-6);
        // 98 is within 3% of the target: probing could gain 2% and would cost a 429.
        assert!((controller.rate(3_600 * S) - 98.0).abs() < 1e-6);
        assert!(!controller.at_rest());
    }

    #[test]
    fn below_the_target_the_rate_holds_then_probes_and_finds_a_raised_limit() {
        let mut controller = adaptive();
        // Trouble at 100, then again on the climb, a server window later, near the same wall.
        controller.trouble(0, 0);
        let wall = controller.rate(1_250 * MS);
        assert!(controller.trouble(1_200 * MS, 1_250 * MS));
        let recovery = controller.recovery.unwrap();
        assert!((recovery.plateau - wall * 0.98).abs() < 1e-9);
        // Found twice, it is held at the plateau for two holds (4 s) after the climb, then
        // probed, faster and faster.
        let probe_from = recovery.probe_from;
        assert_eq!(probe_from - 1_250 * MS - secs(recovery.climb), 4 * S);
        assert!((controller.rate(probe_from - MS) - recovery.plateau).abs() < 1e-6);
        let after = |seconds: u64| controller.rate(probe_from + seconds * S);
        assert!(after(1) < after(2) && after(2) - after(1) > after(1) - recovery.plateau);
        // Nothing stopped it: it is back at the table's rate, and settles there.
        let back = probe_from + 5 * S;
        assert_eq!(controller.rate(back), 100.0);
        controller.settle(back);
        assert!(controller.at_rest());
    }

    #[test]
    fn trouble_cuts_once_per_server_window_from_the_rate_in_force() {
        let mut controller = adaptive();
        assert!(controller.trouble(S, S));
        // Answers that arrive together cut once.
        assert!(!controller.trouble(S + MS, S + MS));
        // Requests sent within a window of the cut met a server that still counted the
        // traffic from before it: their refusals do not cut again.
        assert!(!controller.trouble(S + 900 * MS, S + 950 * MS));
        // Trouble for a request sent later cuts again, from the rate in force: gently, as it
        // is back near the same wall.
        let before = controller.rate(2_150 * MS);
        assert!(before > 95.0 && before < 98.0, "{before}");
        assert!(controller.trouble(2_100 * MS, 2_150 * MS));
        assert!((controller.rate(2_150 * MS) - 0.95 * before).abs() < 1e-9);
        assert_eq!(controller.changes().refused, 2);
    }

    #[test]
    fn a_rate_far_above_what_the_server_serves_comes_down_to_it_in_one_step() {
        let mut controller = adaptive();
        assert!(controller.trouble(0, 0));
        // For a second the server serves 5 a second and refuses the rest.
        for i in 0..80 {
            let sent = i * S / 80;
            if i % 16 == 8 {
                controller.answered(sent, false, sent + 10 * MS);
            } else {
                controller.trouble(sent, sent + 10 * MS);
            }
        }
        assert!(controller.trouble(1_050 * MS, 1_060 * MS));
        let rate = controller.rate(1_060 * MS);
        assert!((4.5..=5.5).contains(&rate), "{rate}");
        // It holds there a window, then probes above it by compounding, as a limit earned
        // by success grows.
        assert!(controller.rate(2 * S) <= 5.0);
        let later = controller.rate(4 * S);
        assert!(
            later > 5.5 && later <= 5.0 * COMPOUND * COMPOUND * COMPOUND,
            "{later}"
        );
    }

    #[test]
    fn a_server_with_a_longer_window_spaces_the_cuts_by_it() {
        let mut controller = Controller::new(
            Adaptation::default().with_window(Duration::from_secs(5)),
            100.0,
        );
        assert!(controller.trouble(0, 0));
        assert!(!controller.trouble(4 * S, 4 * S));
        assert!(controller.trouble(5 * S, 5 * S));
    }

    #[test]
    fn a_storm_drives_the_rate_down_but_never_below_the_floor() {
        let adaptation = Adaptation::default()
            .with_floor(0.3)
            .with_window(Duration::from_millis(10));
        let mut controller = Controller::new(adaptation, 100.0);
        let mut lowest = f64::MAX;
        for i in 0..40 {
            let now = S + i * 15 * MS;
            controller.trouble(now, now);
            lowest = lowest.min(controller.rate(now));
        }
        assert_eq!(lowest, 30.0);
    }

    #[test]
    fn a_probe_that_finds_the_same_wall_again_is_cut_gently() {
        let adaptation = Adaptation::default().with_window(Duration::from_millis(100));
        let mut controller = Controller::new(adaptation, 100.0);
        controller.trouble(0, 0);
        controller.trouble(500 * MS, 500 * MS);
        let wall = controller.wall.unwrap().0;
        assert_eq!(controller.wall.unwrap().1, 1);
        // Probe until the rate is back at that wall, and be refused there again.
        let mut now = controller.recovery.unwrap().probe_from;
        while controller.rate(now) < wall {
            now += 10 * MS;
        }
        let at = controller.rate(now);
        assert!(controller.trouble(now, now));
        assert!((controller.rate(now) - 0.95 * at).abs() < 1e-9);
        assert_eq!(controller.wall.unwrap().1, 2);
    }

    #[test]
    fn a_stated_limit_counts_once_readings_agree_and_never_for_one_odd_value() {
        let mut controller = adaptive();
        assert!(!controller.stated_limit(50.0, 0));
        assert_eq!(controller.rate(0), 100.0);
        assert!(controller.stated_limit(50.0, 0));
        assert_eq!(controller.rate(0), 50.0);
        // One odd reading among steady ones moves nothing.
        assert!(!controller.stated_limit(1.0, 0));
        assert!(!controller.stated_limit(50.0, 0));
        assert_eq!(controller.rate(0), 50.0);
        // Doubled, and stated twice: the rate follows, up to the ceiling (the table's 100).
        controller.stated_limit(200.0, 0);
        controller.stated_limit(200.0, 0);
        assert_eq!(controller.rate(0), 100.0);
        let mut generous = Controller::new(Adaptation::default().with_ceiling(4.0), 100.0);
        generous.stated_limit(200.0, 0);
        generous.stated_limit(200.0, 0);
        assert_eq!(generous.rate(0), 200.0);
    }

    #[test]
    fn a_stated_limit_that_is_not_repeated_fades_back_to_the_table() {
        let mut controller = Controller::new(Adaptation::default(), 10.0);
        controller.stated_limit(1.0, 0);
        controller.stated_limit(1.0, 0);
        assert_eq!(controller.rate(0), 1.0);
        // Held while readings could still come...
        assert_eq!(controller.rate(FADE_AFTER), 1.0);
        assert_eq!(controller.next_change(S), Some(FADE_AFTER));
        // ...then back towards the table, and there once the fade is over.
        let halfway = controller.rate(FADE_AFTER + FADE_OVER / 2);
        assert!((halfway - 5.5).abs() < 1e-9, "{halfway}");
        assert_eq!(controller.rate(FADE_AFTER + FADE_OVER), 10.0);
        controller.settle(FADE_AFTER + FADE_OVER);
        assert!(controller.learned.is_none());
        assert_eq!(controller.next_change(FADE_AFTER + FADE_OVER), None);
    }

    #[test]
    fn a_stated_limit_said_again_holds() {
        let mut controller = Controller::new(Adaptation::default(), 10.0);
        controller.stated_limit(4.0, 0);
        controller.stated_limit(4.0, 0);
        // One reading that agrees, now and then, keeps it: it does not move the rate.
        for second in (5..60).step_by(5) {
            assert!(!controller.stated_limit(4.0, second * S));
        }
        assert_eq!(controller.rate(60 * S), 4.0);
    }

    /// A server that answers 503 to `noise` of the requests at random (from a seeded
    /// generator, so that runs repeat), and to those above `capacity` a second (a GCRA with a
    /// burst of two).
    struct Server {
        capacity: f64,
        noise: f64,
        random: u64,
        ready_at: f64,
    }

    impl Server {
        fn new(capacity: f64, noise: f64) -> Self {
            Self {
                capacity,
                noise,
                random: 0x9E37_79B9_7F4A_7C15,
                ready_at: 0.0,
            }
        }

        /// A number in [0, 1) (xorshift64).
        fn next_random(&mut self) -> f64 {
            self.random ^= self.random << 13;
            self.random ^= self.random >> 7;
            self.random ^= self.random << 17;
            (self.random >> 11) as f64 / (1u64 << 53) as f64
        }

        /// Whether a request arriving at `at` seconds is answered 503.
        fn unavailable(&mut self, at: f64) -> bool {
            let interval = 1.0 / self.capacity;
            if at < self.ready_at - interval {
                return true;
            }
            self.ready_at = self.ready_at.max(at) + interval;
            self.next_random() < self.noise
        }
    }

    /// Sends back to back at the controller's rate for `seconds`, each answered 20 ms later;
    /// returns the rate in force at each tenth of a second.
    fn run(controller: &mut Controller, server: &mut Server, seconds: u64) -> Vec<f64> {
        let mut rates = Vec::new();
        let mut now = 0;
        let mut next_sample = 0;
        let mut in_flight = std::collections::VecDeque::new();
        while now < seconds * S {
            while in_flight
                .front()
                .is_some_and(|&(answer_at, _, _)| answer_at <= now)
            {
                let (answer_at, sent, unavailable) = in_flight.pop_front().unwrap();
                controller.answered(sent, unavailable, answer_at);
            }
            let unavailable = server.unavailable(now as f64 / 1e9);
            in_flight.push_back((now + 20 * MS, now, unavailable));
            now = next_send(controller, now, &mut rates, &mut next_sample);
        }
        rates
    }

    /// Samples the rate in force at each tenth of a second up to `now`, and returns when the
    /// next request goes at that rate.
    fn next_send(controller: &Controller, now: u64, rates: &mut Vec<f64>, next: &mut u64) -> u64 {
        let rate = controller.rate(now);
        while *next <= now {
            rates.push(rate);
            *next += 100 * MS;
        }
        now + (1e9 / rate) as u64
    }

    fn mean(rates: &[f64]) -> f64 {
        rates.iter().sum::<f64>() / rates.len() as f64
    }

    #[test]
    fn random_503s_leave_the_rate_where_it_was() {
        let mut controller = adaptive();
        let rates = run(&mut controller, &mut Server::new(1e9, 0.1), 60);
        assert!(mean(&rates) >= 95.0, "{}", mean(&rates));
        assert_eq!(*rates.last().unwrap(), 100.0);
        // Every trial undone.
        let changes = controller.changes();
        assert_eq!(changes.unavailable, changes.noise, "{changes:?}");
    }

    #[test]
    fn unavailable_answers_that_stop_below_a_capacity_move_the_rate_under_it() {
        let mut controller = adaptive();
        let rates = run(&mut controller, &mut Server::new(60.0, 0.0), 60);
        let changes = controller.changes();
        // A trial whose fall is not plain is undone; at least one showed the pressure.
        assert!(changes.unavailable > changes.noise, "{changes:?}");
        let late = mean(&rates[100..]);
        assert!((55.0..=64.0).contains(&late), "{late} {rates:?}");
    }

    #[test]
    fn a_capacity_below_the_rate_is_found_through_random_503s_too() {
        let mut controller = adaptive();
        let rates = run(&mut controller, &mut Server::new(60.0, 0.05), 60);
        let late = mean(&rates[100..]);
        assert!(
            (50.0..=66.0).contains(&late),
            "{late} {:?}",
            controller.changes()
        );
    }

    /// A server that refuses (429) a request when `allowed(served in the last ten seconds)`
    /// were served in the second before it (a sliding log), for a client that sends back to
    /// back at the controller's rate; each answer comes 20 ms later. Returns the rate in
    /// force at each tenth of a second, and the answers served and refused.
    fn run_refusals(
        controller: &mut Controller,
        allowed: impl Fn(usize) -> usize,
        seconds: u64,
    ) -> (Vec<f64>, usize, usize) {
        let (mut rates, mut next_sample, mut now) = (Vec::new(), 0, 0);
        let mut served = std::collections::VecDeque::new();
        let mut in_flight = std::collections::VecDeque::new();
        let (mut served_count, mut refused_count) = (0, 0);
        while now < seconds * S {
            while let Some(&(answer_at, sent, refused)) = in_flight.front() {
                if answer_at > now {
                    break;
                }
                in_flight.pop_front();
                if refused {
                    controller.trouble(sent, answer_at);
                } else {
                    controller.answered(sent, false, answer_at);
                }
            }
            controller.settle(now);
            while served.front().is_some_and(|&at| at + 10 * S <= now) {
                served.pop_front();
            }
            let last_second = served.iter().filter(|&&at| at + S > now).count();
            let refused = last_second >= allowed(served.len());
            if refused {
                refused_count += 1;
            } else {
                served.push_back(now);
                served_count += 1;
            }
            in_flight.push_back((now + 20 * MS, now, refused));
            now = next_send(controller, now, &mut rates, &mut next_sample);
        }
        (rates, served_count, refused_count)
    }

    #[test]
    fn a_limit_earned_by_success_is_followed_as_it_grows() {
        // Together's rule: twice the successes of the last ten seconds a second, from a base
        // of 5 to a cap of the table's 100.
        let earned = |served: usize| (served / 5).clamp(5, 100);
        let mut controller = adaptive();
        let (rates, _, _) = run_refusals(&mut controller, earned, 40);
        // A client that always sent at the limit would be at the cap in about 21 seconds;
        // this one is, when this was written, in 25.2 (the bucket's holds are not modelled
        // here).
        // Down to the base within the first two seconds...
        let low = rates.iter().position(|&rate| rate < 10.0);
        assert!(low.is_some_and(|tenth| tenth <= 20), "{rates:?}");
        // ...and up to the cap as the limit grows.
        let low = low.unwrap();
        let at_cap = rates[low..].iter().position(|&rate| rate >= 95.0);
        assert!(at_cap.is_some_and(|tenth| low + tenth <= 260), "{rates:?}");
    }

    /// Answers served for requests sent evenly over the second before `until`, `count` of
    /// them, as the controller hears of them.
    fn served_over_the_second_before(controller: &mut Controller, until: u64, count: u64) {
        for i in 0..count {
            let sent = until - S + (i * S + S / 2) / count;
            controller.answered(sent, false, sent + 10 * MS);
        }
    }

    #[test]
    fn a_limit_served_higher_than_its_wall_compounds_again_at_once() {
        let mut controller = adaptive();
        assert!(controller.trouble(0, 0));
        // A limit of 5 found far below the rate: compounding a window later.
        served_over_the_second_before(&mut controller, S, 5);
        assert!(controller.trouble(S, S + 10 * MS));
        assert!((controller.rate(S + 20 * MS) - 4.9).abs() < 1e-6);
        // Four seconds on, the server served 7 in the last second: the limit grew. The rate
        // goes to what was served, and compounds from there without a hold.
        served_over_the_second_before(&mut controller, 5 * S, 7);
        assert!(controller.trouble(5 * S, 5 * S + 10 * MS));
        let at = 5 * S + 10 * MS;
        assert!((controller.rate(at) - 7.0).abs() < 1e-6);
        let a_second_later = controller.rate(at + S);
        assert!(
            (a_second_later - 7.0 * GROWN_COMPOUND).abs() < 0.01,
            "{a_second_later}"
        );
        // Served at the same wall again instead, it would have been a wall: the usual probe.
        let mut controller = adaptive();
        controller.trouble(0, 0);
        served_over_the_second_before(&mut controller, S, 5);
        controller.trouble(S, S + 10 * MS);
        served_over_the_second_before(&mut controller, 5 * S, 5);
        assert!(controller.trouble(5 * S, 5 * S + 10 * MS));
        let held = controller.rate(5 * S + 10 * MS + S);
        assert!(held < 5.0, "{held}");
    }

    #[test]
    fn a_wall_found_far_below_is_probed_after_one_hold_while_it_may_be_an_earned_base() {
        let mut controller = adaptive();
        controller.trouble(0, 0);
        // Found far below the rate at 1 s: it may be an earned limit's base.
        served_over_the_second_before(&mut controller, S, 5);
        controller.trouble(S, S);
        // Each probe meets the same wall just after it begins.
        let mut waits = Vec::new();
        while waits.last().is_none_or(|&(at, _)| at < 12 * S) {
            let at = controller.recovery.unwrap().probe_from + 100 * MS;
            served_over_the_second_before(&mut controller, at, 5);
            assert!(controller.trouble(at, at), "at {at}");
            let recovery = controller.recovery.unwrap();
            waits.push((at, recovery.probe_from - at - secs(recovery.climb)));
        }
        // One hold each time for ten seconds from the first find, more holds after.
        for &(at, wait) in &waits {
            if at < 11 * S {
                assert_eq!(wait, 2 * S, "{waits:?}");
            } else {
                assert!(wait > 2 * S, "{waits:?}");
            }
        }
        assert!(waits.len() >= 3, "{waits:?}");
    }

    #[test]
    fn a_reading_back_at_the_highest_one_is_no_growth() {
        let mut controller = adaptive();
        controller.trouble(0, 0);
        // A fixed limit of 80, read at 80 once and then, in a second the server's window met
        // the bucket's pace differently, at 72.
        served_over_the_second_before(&mut controller, 2 * S, 80);
        assert!(controller.trouble(2 * S, 2 * S));
        served_over_the_second_before(&mut controller, 5 * S, 72);
        assert!(controller.trouble(5 * S, 5 * S));
        // 78 is clearly above the last wall (72) but not above the highest reading: the
        // usual cut below it, no compounding from just under it.
        served_over_the_second_before(&mut controller, 8 * S, 78);
        assert!(controller.trouble(8 * S, 8 * S));
        let cut = controller.rate(8 * S);
        assert!(cut < 78.0 * 0.96, "{cut}");
        assert!(controller.rate(9 * S) < 78.0, "{}", controller.rate(9 * S));
    }

    #[test]
    fn a_wall_found_far_below_the_rate_does_not_creep_up() {
        let mut controller = adaptive();
        let (rates, served, refused) = run_refusals(&mut controller, |_| 5, 60);
        // Refusals at a wall below the rate are the bucket's to hold back; the rate stays
        // at the wall, and never creeps up through readings of it taken for growth.
        let late = mean(&rates[300..]);
        assert!((4.0..=5.5).contains(&late), "{late} {rates:?}");
        assert!(served > 250 && refused > 0, "{served} {refused}");
    }

    #[test]
    fn static_mode_never_moves() {
        let mut controller = Controller::new(Adaptation::fixed(), 100.0);
        assert!(!controller.trouble(S, S));
        controller.stated_limit(10.0, 0);
        controller.stated_limit(10.0, 0);
        assert_eq!(controller.rate(2 * S), 100.0);
    }
}
