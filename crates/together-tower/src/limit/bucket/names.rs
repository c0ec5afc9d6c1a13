//! Model names shared by the buckets of a model.
//!
//! A gateway with many keys holds one bucket per (key, group, model), and most of those
//! buckets name one of a few models. Each bucket would otherwise keep the name it was made
//! with, the request's own copy: one allocation per bucket, as large as a quarter of the
//! bucket. Names are kept once here instead, up to a bound, past which a bucket keeps its
//! own copy as before: a flood of made-up model names costs no more than it did.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::{Arc, Mutex, PoisonError};

/// The most names kept. Together serves a few hundred models.
const MOST_NAMES: usize = 4_096;

/// A model's name as a bucket holds it: one pointer (an `Arc<str>` is two), shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModelName(Arc<Box<str>>);

impl Deref for ModelName {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl Borrow<str> for ModelName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl Hash for ModelName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `str` hashes, so the set can be searched by a `&str`.
        (**self.0).hash(state);
    }
}

/// The model names of a [`Limits`](crate::limit::Limits)' buckets.
#[derive(Debug, Default)]
pub(crate) struct ModelNames {
    names: Mutex<HashSet<ModelName>>,
}

impl ModelNames {
    /// The shared copy of `model` (bounded in length), kept from now on if there is room.
    pub(crate) fn shared(&self, model: &str) -> ModelName {
        let model = crate::model_name::bounded_str(model);
        let mut names = self.names.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = names.get(model.as_ref()) {
            return shared.clone();
        }
        let name = ModelName(Arc::new(Box::from(model.as_ref())));
        if names.len() < MOST_NAMES {
            names.insert(name.clone());
        }
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_of_one_model_share_its_name_and_the_set_is_bounded() {
        let names = ModelNames::default();
        let first = names.shared("meta-llama/Llama-3.3-70B-Instruct-Turbo");
        let second = names.shared("meta-llama/Llama-3.3-70B-Instruct-Turbo");
        assert!(Arc::ptr_eq(&first.0, &second.0));
        assert_eq!(&*first, "meta-llama/Llama-3.3-70B-Instruct-Turbo");
        for i in 0..MOST_NAMES + 10 {
            names.shared(&format!("made-up-{i}"));
        }
        assert_eq!(names.names.lock().unwrap().len(), MOST_NAMES);
        let late = names.shared("late");
        assert_eq!(&*late, "late");
        let long = "m".repeat(10_000);
        assert!(names.shared(&long).len() < 200, "a long name is bounded");
    }
}
