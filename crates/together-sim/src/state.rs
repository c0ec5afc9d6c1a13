//! What the simulator remembers: limit meters, counts of what it saw, and running jobs.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Class, ClassLimits, LimitChange, SimConfig};
use crate::earned::{Earned, Ledger};
use crate::meter::{Algorithm, Limit, Meter, Verdict};

/// A label for an API key in stats: a hash of it, never the key itself.
///
/// FNV-1a, so the label is the same in every process and every version; `"anonymous"` for a
/// request without a key.
pub fn key_label(key: &str) -> String {
    if key.is_empty() {
        return "anonymous".to_owned();
    }
    format!("key-{:016x}", fnv1a(key.as_bytes()))
}

/// FNV-1a, 64-bit: a hash that is the same in every process and every version.
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |hash, &byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Counts of what the server answered, for one key and class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Requests seen.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// Answered 503 (injected faults).
    pub unavailable: u64,
    /// Answered 409 (too many running jobs).
    pub conflict: u64,
    /// Answered 401 (no key).
    pub unauthorized: u64,
    /// Answered with another 4xx (bad JSON, unknown model or endpoint).
    pub other_errors: u64,
    /// Read and hung up on without an answer (injected faults).
    #[serde(default)]
    pub hung_up: u64,
    /// Tokens (prompt plus completion) of the requests answered 2xx.
    pub tokens: u64,
}

impl Counters {
    fn add(&mut self, status: u16, tokens: u64) {
        self.requests += 1;
        match status {
            200..=299 => {
                self.ok += 1;
                self.tokens += tokens;
            }
            429 => self.rate_limited += 1,
            503 => self.unavailable += 1,
            409 => self.conflict += 1,
            401 => self.unauthorized += 1,
            _ => self.other_errors += 1,
        }
    }
}

/// `GET /sim/stats`: what the server saw, by key label and class, and in all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// By key label (see [`key_label`]), then by class name.
    pub keys: BTreeMap<String, BTreeMap<String, Counters>>,
    /// By class name, over every key.
    pub classes: BTreeMap<String, Counters>,
    /// By the model requests named, over every key and class.
    #[serde(default)]
    pub models: BTreeMap<String, Counters>,
}

impl Stats {
    /// The counters of `class` over every key: all zero if it saw no request.
    pub fn class(&self, class: Class) -> Counters {
        self.classes
            .get(class.as_str())
            .copied()
            .unwrap_or_default()
    }

    /// The counters of requests naming `model`: all zero if none did.
    pub fn model(&self, model: &str) -> Counters {
        self.models.get(model).copied().unwrap_or_default()
    }
}

/// A class's limits as meters see them: requests and tokens per window.
fn limits_per_window(limits: &ClassLimits, window: Duration) -> (Limit, Option<Limit>) {
    let requests = Limit::per_minute(limits.rpm, window, limits.burst);
    // A whole window's tokens may go at once: one large request must fit in an empty meter.
    let tokens = limits
        .tpm
        .map(|tpm| Limit::per_minute(tpm, window, u64::MAX));
    (requests, tokens)
}

/// A paid job (fine-tune or batch).
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) id: String,
    pub(crate) key: String,
    pub(crate) class: Class,
    pub(crate) created: Duration,
    pub(crate) finishes: Duration,
    pub(crate) cancelled: bool,
    pub(crate) detail: serde_json::Value,
}

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobStatus {
    Running,
    Completed,
    Cancelled,
}

impl JobStatus {
    /// The status as Together spells it for a job of `class`.
    pub(crate) fn as_str(self, class: Class) -> &'static str {
        match (self, class) {
            (JobStatus::Running, Class::Batches) => "in_progress",
            (JobStatus::Running, _) => "running",
            (JobStatus::Completed, _) => "completed",
            (JobStatus::Cancelled, _) => "cancelled",
        }
    }
}

impl Job {
    pub(crate) fn status(&self, now: Duration) -> JobStatus {
        if self.cancelled {
            JobStatus::Cancelled
        } else if now >= self.finishes {
            JobStatus::Completed
        } else {
            JobStatus::Running
        }
    }

    fn is_running(&self, now: Duration) -> bool {
        self.status(now) == JobStatus::Running
    }
}

/// The meters of one (key, class[, model]).
#[derive(Debug)]
struct Meters {
    requests: Meter,
    tokens: Option<Meter>,
}

/// What the limit check said, for the response headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LimitOutcome {
    pub(crate) requests: Verdict,
    pub(crate) tokens: Option<Verdict>,
}

impl LimitOutcome {
    pub(crate) fn allowed(&self) -> bool {
        self.requests.allowed && self.tokens.is_none_or(|tokens| tokens.allowed)
    }
}

/// Everything behind the simulator's one lock.
#[derive(Debug)]
pub(crate) struct State {
    algorithm: Algorithm,
    window: Duration,
    tolerance: Duration,
    limits: BTreeMap<Class, ClassLimits>,
    meters: HashMap<(String, Class, Option<String>), Meters>,
    /// Changes still to come, latest first.
    schedule: Vec<LimitChange>,
    /// The earned-rate rule, and each meter's successes under it.
    earned: Option<Earned>,
    ledgers: HashMap<(String, Class, Option<String>), Ledger>,
    stats: Stats,
    pub(crate) jobs: Vec<Job>,
    next_id: u64,
}

impl State {
    pub(crate) fn new(config: &SimConfig) -> Self {
        Self {
            algorithm: config.algorithm,
            window: config.window(),
            tolerance: Duration::from_millis(config.gcra_tolerance_ms),
            limits: config.limits.clone(),
            meters: HashMap::new(),
            schedule: {
                let mut schedule = config.schedule.clone();
                schedule.sort_by_key(|change| std::cmp::Reverse(change.at_ms));
                schedule
            },
            earned: config.earned,
            ledgers: HashMap::new(),
            stats: Stats::default(),
            jobs: Vec::new(),
            next_id: 1,
        }
    }

    /// Checks and spends one request and `tokens` tokens of `class` for `key`; both limits
    /// must allow, or nothing is spent. `None` if the class is not limited.
    pub(crate) fn check_limits(
        &mut self,
        now: Duration,
        key: &str,
        class: Class,
        model: Option<&str>,
        tokens: u64,
    ) -> Option<LimitOutcome> {
        self.apply_schedule(now);
        let limits = *self.limits.get(&class)?;
        let (request_limit, token_limit) = limits_per_window(&limits, self.window);
        let request_limit = request_limit.with_tolerance(self.tolerance);
        let model = if limits.per_model {
            model.map(str::to_owned)
        } else {
            None
        };
        let algorithm = self.algorithm;
        let id = (key.to_owned(), class, model);
        let mut ledger = match &self.earned {
            Some(rule) => {
                let ledger = self.ledgers.entry(id.clone()).or_default();
                let verdict = ledger.check(rule, now);
                if !verdict.allowed {
                    // Above what was earned: Together's `dynamic_request_limited`.
                    return Some(LimitOutcome {
                        requests: verdict,
                        tokens: None,
                    });
                }
                Some(ledger)
            }
            None => None,
        };
        let meters = self.meters.entry(id).or_insert_with(|| Meters {
            requests: Meter::new(algorithm, request_limit),
            tokens: token_limit.map(|limit| Meter::new(algorithm, limit)),
        });
        // Try on copies and keep them only if both allow, so a refusal spends nothing.
        let mut requests = meters.requests.clone();
        let mut token_meter = meters.tokens.clone();
        let outcome = LimitOutcome {
            requests: requests.check(now, 1),
            tokens: token_meter.as_mut().map(|meter| meter.check(now, tokens)),
        };
        if outcome.allowed() {
            meters.requests = requests;
            meters.tokens = token_meter;
            if let Some(ledger) = ledger.as_mut() {
                ledger.served(now);
            }
        }
        Some(outcome)
    }

    /// Makes the scheduled changes that are due at `now`.
    pub(crate) fn apply_schedule(&mut self, now: Duration) {
        while self
            .schedule
            .last()
            .is_some_and(|change| Duration::from_millis(change.at_ms) <= now)
        {
            if let Some(change) = self.schedule.pop() {
                self.set_limits(change.limits);
            }
        }
    }

    /// Replaces the limits of the classes named. Their meters start afresh under the new
    /// limits: a raised limit takes effect at once, as a server's would.
    pub(crate) fn set_limits(&mut self, changes: BTreeMap<Class, ClassLimits>) {
        self.meters
            .retain(|(_, class, _), _| !changes.contains_key(class));
        self.limits.extend(changes);
    }

    pub(crate) fn limits(&self) -> &BTreeMap<Class, ClassLimits> {
        &self.limits
    }

    /// Counts one answer.
    pub(crate) fn record(
        &mut self,
        key_label: &str,
        class: Class,
        model: Option<&str>,
        status: u16,
        tokens: u64,
    ) {
        for counters in self.counters(key_label, class) {
            counters.add(status, tokens);
        }
        if let Some(model) = model {
            self.stats
                .models
                .entry(model.to_owned())
                .or_default()
                .add(status, tokens);
        }
    }

    /// Counts one request that was read and hung up on.
    pub(crate) fn record_hangup(&mut self, key_label: &str, class: Class) {
        for counters in self.counters(key_label, class) {
            counters.requests += 1;
            counters.hung_up += 1;
        }
    }

    /// The counters an answer adds to: the key's for its class, and the class's over all keys.
    fn counters(&mut self, key_label: &str, class: Class) -> [&mut Counters; 2] {
        let name = class.as_str();
        let by_key = self.stats.keys.entry(key_label.to_owned()).or_default();
        [
            by_key.entry(name.to_owned()).or_default(),
            self.stats.classes.entry(name.to_owned()).or_default(),
        ]
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Forgets every count, meter and job.
    pub(crate) fn reset(&mut self) {
        self.stats = Stats::default();
        self.meters.clear();
        self.jobs.clear();
    }

    /// Drops meters that hold nothing, so many keys do not grow memory for ever.
    pub(crate) fn prune(&mut self, now: Duration) {
        self.meters.retain(|_, meters| {
            !(meters.requests.is_full(now)
                && meters
                    .tokens
                    .as_ref()
                    .is_none_or(|meter| meter.is_full(now)))
        });
        if let Some(rule) = &self.earned {
            self.ledgers.retain(|_, ledger| {
                ledger.earned(rule, now);
                !ledger.is_empty()
            });
        }
    }

    pub(crate) fn running_jobs(&self, key: &str, class: Class, now: Duration) -> usize {
        self.jobs
            .iter()
            .filter(|job| job.key == key && job.class == class && job.is_running(now))
            .count()
    }

    pub(crate) fn new_id(&mut self, prefix: &str) -> String {
        let id = format!("{prefix}-{:06}", self.next_id);
        self.next_id += 1;
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(limits: BTreeMap<Class, ClassLimits>) -> State {
        State::new(&SimConfig {
            limits,
            ..SimConfig::default()
        })
    }

    #[test]
    fn key_labels_are_stable_and_hide_the_key() {
        assert_eq!(key_label("sk-test"), key_label("sk-test"));
        assert_ne!(key_label("sk-test"), key_label("sk-tesT"));
        assert!(!key_label("sk-secret-material").contains("secret"));
        assert_eq!(key_label(""), "anonymous");
        assert_eq!(key_label("a").len(), 20);
    }

    #[test]
    fn a_refusal_by_tokens_spends_no_request() {
        let mut state = state_with(BTreeMap::from([(
            Class::Chat,
            ClassLimits::rpm(600).with_tpm(60_000),
        )]));
        let now = Duration::ZERO;
        // 1,000 tokens a second: a 1,500-token request is refused, and the request meter keeps
        // its one request a 100 ms for the next.
        let refused = state
            .check_limits(now, "k", Class::Chat, None, 1_500)
            .unwrap();
        assert!(!refused.allowed() && refused.requests.allowed && !refused.tokens.unwrap().allowed);
        let granted = state
            .check_limits(now, "k", Class::Chat, None, 500)
            .unwrap();
        assert!(granted.allowed());
        assert!(
            state
                .check_limits(now, "other", Class::Chat, None, 500)
                .unwrap()
                .allowed()
        );
        assert!(
            state
                .check_limits(now, "k", Class::Embeddings, None, 500)
                .is_none()
        );
    }

    #[test]
    fn per_model_limits_keep_models_apart() {
        let mut state = state_with(BTreeMap::from([(
            Class::Chat,
            ClassLimits {
                per_model: true,
                ..ClassLimits::rpm(60)
            },
        )]));
        let now = Duration::ZERO;
        assert!(
            state
                .check_limits(now, "k", Class::Chat, Some("a"), 1)
                .unwrap()
                .allowed()
        );
        assert!(
            !state
                .check_limits(now, "k", Class::Chat, Some("a"), 1)
                .unwrap()
                .allowed()
        );
        assert!(
            state
                .check_limits(now, "k", Class::Chat, Some("b"), 1)
                .unwrap()
                .allowed()
        );
    }

    #[test]
    fn limits_change_at_run_time() {
        let mut state = state_with(BTreeMap::from([(Class::Chat, ClassLimits::rpm(60))]));
        let at = Duration::from_millis;
        assert!(
            state
                .check_limits(at(0), "k", Class::Chat, None, 1)
                .unwrap()
                .allowed()
        );
        assert!(
            !state
                .check_limits(at(500), "k", Class::Chat, None, 1)
                .unwrap()
                .allowed()
        );
        state.set_limits(BTreeMap::from([(Class::Chat, ClassLimits::rpm(600))]));
        let outcome = state
            .check_limits(at(500), "k", Class::Chat, None, 1)
            .unwrap();
        assert!(outcome.allowed());
        assert_eq!(outcome.requests.limit, 10);
    }
}
