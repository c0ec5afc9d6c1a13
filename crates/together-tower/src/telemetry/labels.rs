//! Names as metric labels (models, tenants): a bounded set that follows recent traffic.
//!
//! A metrics backend keeps a series for every label value it ever saw, so the set of model
//! labels must be bounded; but a fixed "first 64 names seen" would hide a model that became
//! busy later for the life of the process. So a label that has gone unused for
//! [`STALE_AFTER`] gives its place to a name used [`PROMOTE_AFTER`] times since, and every
//! other name is `"other"`. At most [`MODEL_LABELS`] labels are live at once; a retired one
//! stops growing and a backend's own expiry can drop it.
//!
//! A label is retired only after minutes without use, longer than a request waits by default,
//! so a gauge raised under a label (requests waiting) is lowered under the same one.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use super::MODEL_LABELS;

/// How long a label must go unused before another name may take its place.
pub(crate) const STALE_AFTER: Duration = Duration::from_secs(600);

/// How many uses make an unlabelled name worth a label.
pub(crate) const PROMOTE_AFTER: u32 = 100;

/// The most unlabelled names counted at once; past it the counts start again.
const CANDIDATES: usize = 4 * MODEL_LABELS;

/// The labels in force, and the names waiting for one.
#[derive(Debug, Default)]
pub(crate) struct BoundedLabels {
    /// Each label, and when it was last used.
    labels: HashMap<String, Instant>,
    /// Names without a label, and their uses since they were first counted.
    candidates: HashMap<String, u32>,
}

impl BoundedLabels {
    /// The label for `model`, used now: the name itself, or `"other"`.
    pub(crate) fn label(&mut self, model: &str, now: Instant) -> String {
        if let Some(last_used) = self.labels.get_mut(model) {
            *last_used = now;
            return model.to_owned();
        }
        if self.labels.len() < MODEL_LABELS {
            self.labels.insert(model.to_owned(), now);
            return model.to_owned();
        }
        if self.candidates.len() >= CANDIDATES && !self.candidates.contains_key(model) {
            self.candidates.clear();
        }
        let uses = self.candidates.entry(model.to_owned()).or_default();
        *uses += 1;
        if *uses < PROMOTE_AFTER || !self.retire_a_stale_label(now) {
            return "other".to_owned();
        }
        self.candidates.remove(model);
        self.labels.insert(model.to_owned(), now);
        model.to_owned()
    }

    /// Retires the label unused the longest, if it has been unused for [`STALE_AFTER`].
    fn retire_a_stale_label(&mut self, now: Instant) -> bool {
        let oldest = self
            .labels
            .iter()
            .min_by_key(|(_, last_used)| **last_used)
            .filter(|(_, last_used)| now.duration_since(**last_used) >= STALE_AFTER)
            .map(|(label, _)| label.clone());
        oldest.is_some_and(|label| self.labels.remove(&label).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_that_becomes_busy_later_gets_a_label_once_an_old_one_goes_quiet() {
        let start = Instant::now();
        let mut labels = BoundedLabels::default();
        for i in 0..MODEL_LABELS {
            assert_eq!(
                labels.label(&format!("early-{i}"), start),
                format!("early-{i}")
            );
        }
        // While every early label is recent, a new name is "other", however busy.
        for _ in 0..2 * PROMOTE_AFTER {
            assert_eq!(labels.label("late", start), "other");
        }
        // The early ones go quiet but one; the late one, still busy, takes a quiet one's place.
        let later = start + STALE_AFTER;
        labels.label("early-0", later);
        let seen: Vec<String> = (0..PROMOTE_AFTER)
            .map(|_| labels.label("late", later))
            .collect();
        assert_eq!(seen.last().unwrap(), "late");
        assert_eq!(labels.labels.len(), MODEL_LABELS);
        assert!(
            labels.labels.contains_key("early-0"),
            "a recent label was retired"
        );
        // A name used once in a while never takes a place.
        for i in 0..10_000 {
            assert_eq!(labels.label(&format!("rare-{i}"), later), "other");
        }
        assert!(labels.candidates.len() <= CANDIDATES);
    }
}
