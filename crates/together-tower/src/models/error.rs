//! The error of the model check.

use std::fmt;

/// The request named a model the server does not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelNotFound {
    pub(super) model: String,
    pub(super) closest: Vec<String>,
}

impl ModelNotFound {
    /// The model the request named.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// The known model ids closest to it, closest first (at most three).
    pub fn closest(&self) -> &[String] {
        &self.closest
    }
}

impl fmt::Display for ModelNotFound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model {:?} not found", self.model)?;
        match self.closest.as_slice() {
            [] => Ok(()),
            closest => write!(f, "; did you mean {}?", closest.join(", ")),
        }
    }
}

impl std::error::Error for ModelNotFound {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_the_model_and_the_suggestions() {
        let error = ModelNotFound {
            model: "llama-3".into(),
            closest: vec!["a/llama-3.1".into(), "b/llama-3.3".into()],
        };
        assert_eq!(
            error.to_string(),
            r#"model "llama-3" not found; did you mean a/llama-3.1, b/llama-3.3?"#
        );
    }
}
