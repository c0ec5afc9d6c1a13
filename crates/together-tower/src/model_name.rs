//! Model names as the stack keeps them: bounded.
//!
//! The model comes from the request body, and in a gateway the end user writes it. A bucket
//! lives for minutes, a metric label for the process, a log line for ever: none of them may
//! hold a name of any length. A name up to [`MAX_MODEL_NAME_BYTES`] is kept as it is (borrowed,
//! no copy); a longer one becomes its first bytes, an ellipsis and a hash of the
//! whole, so two long names stay apart and every process agrees on the result.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// The longest model name kept whole, in bytes. Together's ids are under 100.
pub(crate) const MAX_MODEL_NAME_BYTES: usize = 128;

/// How much of a longer name is kept before its hash.
const PREFIX_BYTES: usize = 64;

/// `model`, or a bounded stand-in for it if it is too long: borrowed back when it is short
/// enough.
pub(crate) fn bounded_str(model: &str) -> std::borrow::Cow<'_, str> {
    if model.len() <= MAX_MODEL_NAME_BYTES {
        return std::borrow::Cow::Borrowed(model);
    }
    let mut cut = PREFIX_BYTES;
    while !model.is_char_boundary(cut) {
        cut -= 1;
    }
    // A fixed key: the stand-in must be the same in every process that shares a backend.
    let mut hasher = SipHasher13::new();
    hasher.write(model.as_bytes());
    std::borrow::Cow::Owned(format!("{}…#{:016x}", &model[..cut], hasher.finish()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_name_is_kept_and_a_long_one_is_bounded_and_distinct() {
        let short = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
        assert!(matches!(bounded_str(short), std::borrow::Cow::Borrowed(kept) if kept == short));
        let long_a = "é".repeat(128 * 1024);
        let long_b = format!("{}x", "é".repeat(128 * 1024));
        let (a, b) = (bounded_str(&long_a), bounded_str(&long_b));
        assert!(a.len() <= MAX_MODEL_NAME_BYTES, "{} bytes", a.len());
        assert!(a.starts_with("éé"));
        assert_ne!(a, b);
        assert_eq!(a, bounded_str(&long_a), "the same name, the same stand-in");
    }
}
