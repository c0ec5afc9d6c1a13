//! Telling 503 noise from 503 pressure.
//!
//! Together answers 503 for its own capacity, often at random and unrelated to the caller's
//! rate: its docs say a 503 at or below your dynamic rate is "not due to your usage". Some 503
//! storms do follow load (a model overloaded, a gateway that answers 503 above a capacity), and
//! then slowing down helps. A cut costs quota now and, under earned limits, quota later, so a
//! 503 moves the rate only when the evidence says the rate causes it.
//!
//! The evidence is a *tally*: the answers to requests sent since a given time, once it spans
//! at least one server window ([`Adaptation::window`](super::adapt::Adaptation), a second by
//! default: servers count the last second) and holds at least [`MIN_ANSWERS`] answers. Its
//! share of 503s is compared with the share known to be noise:
//!
//! - **Not clearly above the noise**, nothing moves: the retry layer sends those requests
//!   again, and the server's capacity, not the caller's rate, decided their fate. Clearly
//!   above is [`MARGIN`] above the noise, and by more than chance at [`SURE`] standard errors:
//!   the chance that a tally of its size reads a share at the margin that high, plus the
//!   chance that the noise itself was read low from the answers it was learned from. Before
//!   any noise is known, that keeps a share of a few percent in a tally of a hundred from
//!   starting a trial at all.
//! - **Clearly above it**, a *trial*: the rate is cut to what the server served a second
//!   over the tally (by a tenth at least, and to half at most), and the next
//!   tally, of requests sent one window after the cut (so that the server's window no longer
//!   holds traffic from before it), judges the cut.
//!   - **The share fell**, by more than chance between two tallies of their sizes (three
//!     standard errors) and by a quarter at least: the 503s followed the rate. The cut
//!     stays, the rate goes no higher than what the server served a second (its capacity),
//!     and it probes above that slowly, eight times slower than above a 429's wall, since
//!     503s are judged a window or two late. Should they come back, another trial cuts
//!     again.
//!   - **It did not**: the 503s are noise. The cut is undone at once, and the share the
//!     tally after the cut read is remembered as this bucket's noise (not the one before:
//!     that one started the trial because it read high, by chance more often than not).
//!     Every later tally that starts nothing refines it, weighed by its answers, never above
//!     what the trial read, so that pressure growing slowly cannot pass for noise. Noise
//!     fades (half-life [`NOISE_HALF_LIFE`]), so that a change of conditions is seen.
//!
//! The failure modes it accepts:
//!
//! - **A trial on noise costs two windows at a lower rate** (the settling window and the
//!   judged one), a tenth or more below the rate. Against a server answering 10% of requests
//!   503 at random (`scripts/independent-servers`), runs of 1,500 requests made one trial in
//!   the first seconds, while the noise was still unknown, and undid it; at 3%, none.
//! - **Noise that happens to fall during a trial** by more than three standard errors (one
//!   chance in about seven hundred by the normal approximation; more in practice, since a
//!   trial starts when its tally happened to read high) is taken for pressure: the rate stays
//!   at what the server served, and probes back up over several seconds.
//! - **A storm that ends on its own during a trial** looks the same, with the same cost.
//! - **Pressure that a trial's cut does not show clearly** (a small share, few answers) is
//!   taken for noise: the share seen is remembered, and the rate goes on until the share
//!   is clearly above it, when the next trial shows it plainly.
//! - **Pressure just above the noise** (a capacity a few percent below the rate) is not
//!   acted on until the share is clearly above the noise (a tenth or so, in a tally of a
//!   hundred): those requests are retried, and the server still serves all it can.
//! - **Few answers** make no tally: a bucket sending a request a second waits
//!   [`MIN_ANSWERS`] seconds for its evidence, and until then its 503s only cost retries.

/// A tally needs this many answers to say anything.
pub(crate) const MIN_ANSWERS: u32 = 30;
/// A trial needs at least this many 503s in its tally, whatever the share.
const MIN_UNAVAILABLE: u32 = 3;
/// A share this far above the noise starts a trial.
pub(crate) const MARGIN: f64 = 0.05;
/// How many standard errors a fall of the share must be, to be more than chance. Three, not
/// two: a trial starts when its tally happened to read high, so the next one reads lower by
/// chance alone more often than the test assumes.
const SURE: f64 = 3.0;
/// The deepest trial cut: the rate kept at least.
const DEEPEST: f64 = 0.5;
/// The shallowest trial cut: a smaller one could not be told from the noise in a second's
/// answers.
const SHALLOWEST: f64 = 0.9;
/// Noise known for this long counts half as much.
pub(crate) const NOISE_HALF_LIFE: u64 = 60_000_000_000;
/// The noise is read from this many answers at most: older ones give way to new.
const NOISE_ANSWERS_KEPT: f64 = 2_000.0;

/// What a tally said.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// Nothing to do yet, or nothing to do.
    Nothing,
    /// Start a trial: cut the rate to about what the server served a second (less the noise
    /// it would refuse at any rate), by a tenth at least and by half at most
    /// ([`Pressure::trial_keep`]).
    Trial { served: f64 },
    /// The trial's cut made the 503s fall: keep it. The server served about `capacity`
    /// answers a second.
    Pressure { capacity: f64 },
    /// The trial's cut did not: undo it.
    Noise,
}

/// The 503 evidence of one bucket.
#[derive(Debug, Clone, Default)]
pub(crate) struct Pressure {
    tally: Tally,
    /// The share of 503s known not to follow the rate, and when it was last confirmed.
    noise: f64,
    noise_at: u64,
    /// How many answers the noise was read from: the more, the closer a tally must come
    /// to it to agree.
    noise_answers: f64,
    /// The share the last trial showed not to follow the rate: later tallies refine the
    /// noise up to it, never above, so that pressure growing slowly cannot pass for noise.
    noise_cap: f64,
    /// The trial under way.
    trial: Option<Trial>,
    /// Every answer is being counted (the bucket asks [`Pressure::watching`] after each).
    counting: bool,
}

/// What a tally read.
#[derive(Debug, Clone, Copy)]
struct Reading {
    /// The answers counted.
    answers: u32,
    /// The share of 503s.
    share: f64,
    /// Answers served a second.
    served: f64,
}

/// A trial: what the tally before it read.
#[derive(Debug, Clone, Copy)]
struct Trial {
    before: Reading,
}

/// Answers to requests sent since `from`.
#[derive(Debug, Clone, Copy, Default)]
struct Tally {
    from: u64,
    served: u32,
    unavailable: u32,
}

impl Pressure {
    /// Starts counting with the answer to a request sent at `sent_at`.
    pub(crate) fn starting_at(sent_at: u64) -> Self {
        Self {
            tally: Tally {
                from: sent_at,
                ..Tally::default()
            },
            counting: true,
            ..Self::default()
        }
    }

    /// The share of 503s known to be noise at `now`.
    pub(crate) fn noise(&self, now: u64) -> f64 {
        let age = now.saturating_sub(self.noise_at) as f64 / NOISE_HALF_LIFE as f64;
        self.noise * 0.5f64.powf(age)
    }

    /// The share of `rate` a trial keeps, to bring it to what the server `served` a second.
    pub(crate) fn trial_keep(served: f64, rate: f64) -> f64 {
        (served / rate).clamp(DEEPEST, SHALLOWEST)
    }

    /// Whether a trial is under way.
    pub(crate) fn in_trial(&self) -> bool {
        self.trial.is_some()
    }

    /// Whether every answer should still be counted: a trial, 503s in the tally, or noise
    /// that has not faded.
    pub(crate) fn watching(&self, now: u64) -> bool {
        self.trial.is_some() || self.tally.unavailable > 0 || self.noise(now) > 0.005
    }

    /// A 429 cut the rate during a trial: the trial ends, its cut kept.
    pub(crate) fn end_trial(&mut self, now: u64) {
        if self.trial.take().is_some() {
            self.restart(now);
        }
    }

    /// Counts the answer to a request sent at `sent_at` (a 503 if `unavailable`), and judges
    /// the tally once it spans `window` and holds enough answers.
    pub(crate) fn answered(
        &mut self,
        sent_at: u64,
        unavailable: bool,
        now: u64,
        window: u64,
    ) -> Verdict {
        if unavailable && !self.counting {
            // The first 503 since answers were last counted: a tally starts with it.
            self.restart(sent_at);
            self.counting = true;
        }
        if sent_at < self.tally.from {
            // Sent before this tally began: under the rate of another.
            return Verdict::Nothing;
        }
        if unavailable {
            self.tally.unavailable += 1;
        } else {
            self.tally.served += 1;
        }
        let answers = self.tally.served + self.tally.unavailable;
        if now < self.tally.from.saturating_add(window) || answers < MIN_ANSWERS {
            return Verdict::Nothing;
        }
        let seconds = now.saturating_sub(self.tally.from).max(1) as f64 / 1e9;
        let reading = Reading {
            answers,
            share: f64::from(self.tally.unavailable) / f64::from(answers),
            served: f64::from(self.tally.served) / seconds,
        };
        let noise = self.noise(now);
        let verdict = self.judge(reading, noise, now);
        match verdict {
            // The next tally counts requests sent once the server's window holds none from
            // before the cut.
            Verdict::Trial { .. } => self.restart(now.saturating_add(window)),
            _ => self.restart(now),
        }
        self.counting = self.watching(now);
        verdict
    }

    fn judge(&mut self, reading: Reading, noise: f64, now: u64) -> Verdict {
        let share = reading.share;
        if let Some(trial) = self.trial.take() {
            return self.judge_trial(trial, reading, noise, now);
        }
        if self.tally.unavailable >= MIN_UNAVAILABLE && share > self.trial_above(noise, reading) {
            self.trial = Some(Trial { before: reading });
            return Verdict::Trial {
                served: reading.served / (1.0 - noise),
            };
        }
        if noise > 0.0 {
            // Nothing that follows the rate: this tally refines the noise, up or down.
            self.refine_noise(reading, now);
        }
        Verdict::Nothing
    }

    /// The share of 503s above which a tally starts a trial: [`MARGIN`] above the noise, and
    /// by more than chance, at [`SURE`] standard errors, of a tally of this size and of the
    /// answers the noise was read from. Chance is taken at the share of the margin, so that
    /// before any noise is known a few 503s in a small tally start nothing.
    fn trial_above(&self, noise: f64, reading: Reading) -> f64 {
        let margin = noise + MARGIN;
        let mut variance = margin * (1.0 - margin) / f64::from(reading.answers);
        if self.noise_answers > 0.0 {
            variance += noise * (1.0 - noise) / self.noise_answers;
        }
        margin + SURE * variance.sqrt()
    }

    /// Judges a trial by the tally after its cut: pressure if the share of 503s fell, by
    /// more than chance would make it fall between two tallies of these sizes (a
    /// two-proportion test, at [`SURE`] standard errors) and by a quarter at least. A cut to
    /// what the server served leaves a server at its capacity with almost no 503s; noise
    /// keeps its share whatever the rate.
    fn judge_trial(&mut self, trial: Trial, after: Reading, noise: f64, now: u64) -> Verdict {
        let before = trial.before;
        let (n1, n2) = (f64::from(before.answers), f64::from(after.answers));
        let pooled = (before.share * n1 + after.share * n2) / (n1 + n2);
        let error = (pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2)).sqrt();
        let fell = before.share - after.share > SURE * error && after.share <= before.share * 0.75;
        if fell {
            return Verdict::Pressure {
                capacity: before.served.max(after.served),
            };
        }
        // Whatever the rate, about this share: noise. It is read from the tally after the
        // cut, since the one before was read high by chance more often than not (that is
        // what started the trial). Later tallies refine it, but never above it: pressure a
        // trial did not show plainly, or pressure that grows slowly, must not pass for noise.
        self.noise = noise.max(after.share);
        self.noise_answers = f64::from(after.answers);
        self.noise_cap = self.noise;
        self.noise_at = now;
        Verdict::Noise
    }

    /// Folds a tally into the noise, weighed by answers: the noise's own count up to
    /// [`NOISE_ANSWERS_KEPT`] (so that a change is followed), and faded as the noise is, so
    /// that after a long quiet the new tally counts most. Never above the cap.
    fn refine_noise(&mut self, reading: Reading, now: u64) {
        let answers = f64::from(reading.answers);
        let faded = self.noise(now) / self.noise;
        let weight = self.noise_answers.min(NOISE_ANSWERS_KEPT) * faded;
        let pooled = (self.noise * weight + reading.share * answers) / (weight + answers);
        self.noise = pooled.min(self.noise_cap);
        self.noise_answers = weight + answers;
        self.noise_at = now;
    }

    fn restart(&mut self, from: u64) {
        self.tally = Tally {
            from,
            ..Tally::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    const MS: u64 = 1_000_000;

    /// Answers `count` requests sent evenly over one second from `start`, a share
    /// `unavailable` of them 503s; returns the verdicts that were not `Nothing`.
    fn second(pressure: &mut Pressure, start: u64, count: u64, unavailable: f64) -> Vec<Verdict> {
        let mut owed = 0.0;
        (0..count)
            .filter_map(|i| {
                let at = start + i * S / count;
                owed += unavailable;
                let is_503 = owed >= 1.0;
                if is_503 {
                    owed -= 1.0;
                }
                let verdict = pressure.answered(at, is_503, at + 20 * MS, S);
                (verdict != Verdict::Nothing).then_some(verdict)
            })
            .collect()
    }

    #[test]
    fn a_share_that_does_not_follow_the_rate_is_learned_as_noise() {
        let mut pressure = Pressure::starting_at(0);
        // One 503 in five: a trial, at about what was served.
        let verdicts = second(&mut pressure, 0, 100, 0.2);
        assert!(
            matches!(verdicts[..], [Verdict::Trial { served }] if (served - 80.0).abs() < 2.0),
            "{verdicts:?}"
        );
        // The settling second says nothing; the next one, at the lower rate, still one in five.
        assert!(second(&mut pressure, S, 80, 0.2).is_empty());
        assert_eq!(second(&mut pressure, 2 * S, 80, 0.2), vec![Verdict::Noise]);
        assert!((pressure.noise(3 * S) - 0.2).abs() < 0.02);
        // The same share again starts nothing, and keeps the noise known.
        for i in 3..200 {
            let verdicts = second(&mut pressure, i * S, 100, 0.2);
            assert!(verdicts.is_empty(), "{i} {verdicts:?} {pressure:?}");
        }
        assert!((pressure.noise(200 * S) - 0.2).abs() < 0.02, "{pressure:?}");
    }

    #[test]
    fn a_share_near_the_margin_needs_more_than_chance_to_start_a_trial() {
        // Before any noise is known, one in ten of a hundred answers is within what a share
        // at the margin reads by chance.
        let mut pressure = Pressure::starting_at(0);
        for i in 0..10 {
            assert!(second(&mut pressure, i * S, 100, 0.1).is_empty());
        }
    }

    #[test]
    fn a_share_that_falls_with_the_rate_is_pressure() {
        let mut pressure = Pressure::starting_at(0);
        // Four in ten: the trial goes to what the server served, 60 a second.
        let verdicts = second(&mut pressure, 0, 100, 0.4);
        assert!(
            matches!(verdicts[..], [Verdict::Trial { served }] if (served - 60.0).abs() < 2.0),
            "{verdicts:?}"
        );
        assert!(second(&mut pressure, S, 60, 0.3).is_empty());
        let verdicts = second(&mut pressure, 2 * S, 60, 0.02);
        assert!(
            matches!(verdicts[..], [Verdict::Pressure { capacity }] if (capacity - 60.0).abs() < 2.0),
            "{verdicts:?}"
        );
    }

    #[test]
    fn a_share_below_the_margin_or_too_few_answers_start_nothing() {
        let mut pressure = Pressure::starting_at(0);
        assert!(second(&mut pressure, 0, 100, 0.04).is_empty());
        // Ten answers a second: a tally waits for thirty.
        let mut pressure = Pressure::starting_at(0);
        assert!(second(&mut pressure, 0, 10, 0.5).is_empty());
        assert!(second(&mut pressure, S, 10, 0.5).is_empty());
        assert_eq!(second(&mut pressure, 2 * S, 10, 0.5).len(), 1);
    }

    #[test]
    fn noise_fades() {
        let mut pressure = Pressure {
            noise: 0.1,
            ..Pressure::default()
        };
        assert!((pressure.noise(NOISE_HALF_LIFE) - 0.05).abs() < 1e-9);
        pressure.noise = 0.0;
        assert!(!pressure.watching(0));
    }
}
