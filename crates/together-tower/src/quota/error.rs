use std::fmt;
use std::time::Duration;

use crate::classify::EndpointClass;

/// A quota table that cannot be used, and what to fix.
///
/// Its message quotes at most a short excerpt of anything it was given (a group name, a rate,
/// a line of a file), so an error about a huge value is still a short line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaError {
    group: String,
    problem: Problem,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Problem {
    ZeroRate,
    ZeroBurst,
    BurstExceedsRate {
        burst: u32,
        amount: u32,
        period: Duration,
    },
    RateTooFine {
        amount: u32,
        period: Duration,
    },
    ToleranceTooLarge {
        tolerance: Duration,
        interval: Duration,
    },
    ZeroConcurrency,
    NoLimit,
    UnknownGroup(EndpointClass),
    TooManyGroups {
        count: usize,
        max: usize,
    },
    #[cfg_attr(not(feature = "toml"), allow(dead_code))]
    TooLarge {
        bytes: usize,
        max: usize,
    },
    #[cfg_attr(not(feature = "toml"), allow(dead_code))]
    UnknownClass(String),
    #[cfg_attr(not(feature = "toml"), allow(dead_code))]
    InvalidRate(String),
    #[cfg_attr(not(feature = "toml"), allow(dead_code))]
    UnknownPreset(String),
    #[cfg_attr(not(feature = "toml"), allow(dead_code))]
    Syntax(String),
}

impl QuotaError {
    pub(super) fn new(group: &str, problem: Problem) -> Self {
        Self {
            group: excerpt(group),
            problem,
        }
    }

    /// The group the problem is in (an excerpt, if its name is long), or `""` when it is not
    /// about one group.
    pub fn group(&self) -> &str {
        &self.group
    }
}

/// The longest piece of a value an error quotes, in characters.
const EXCERPT_CHARS: usize = 64;

/// `text` itself if short, else its first characters and how long it was, so that an error
/// about a 10 MB value is still one short line.
pub(super) fn excerpt(text: &str) -> String {
    match text.char_indices().nth(EXCERPT_CHARS) {
        None => text.to_owned(),
        Some((end, _)) => format!("{}… ({} bytes in all)", &text[..end], text.len()),
    }
}

impl fmt::Display for QuotaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let group = &self.group;
        match &self.problem {
            Problem::ZeroRate => write!(
                f,
                "group {group:?}: the rate allows no requests; give it at least 1 request per non-zero period"
            ),
            Problem::ZeroBurst => write!(f, "group {group:?}: burst is 0; it must be at least 1"),
            Problem::BurstExceedsRate {
                burst,
                amount,
                period,
            } => write!(
                f,
                "group {group:?}: burst {burst} is more than the {amount} requests allowed per {period:?}; lower the burst to at most {amount}"
            ),
            Problem::RateTooFine { amount, period } => write!(
                f,
                "group {group:?}: {amount} requests per {period:?} is more than one per nanosecond; use a lower rate"
            ),
            Problem::ToleranceTooLarge {
                tolerance,
                interval,
            } => write!(
                f,
                "group {group:?}: a tolerance of {tolerance:?} is not below one interval ({interval:?}); lower it, or raise the burst for whole requests"
            ),
            Problem::ZeroConcurrency => write!(
                f,
                "group {group:?}: concurrency is 0; it must be at least 1, or left out"
            ),
            Problem::NoLimit => write!(
                f,
                "group {group:?} has neither a rate nor a concurrency limit; give it one, or leave its classes unlimited"
            ),
            Problem::UnknownGroup(class) => write!(
                f,
                "class {class} is put in group {group:?}, which is not defined; define the group or fix its name"
            ),
            Problem::TooManyGroups { count, max } => {
                write!(f, "{count} groups is more than the {max} a table may hold")
            }
            Problem::TooLarge { bytes, max } => write!(
                f,
                "the quota file is {bytes} bytes, more than the {max} a quota file may be"
            ),
            Problem::UnknownClass(name) => {
                write!(f, "unknown endpoint class {name:?}; expected one of ")?;
                for (i, class) in EndpointClass::ALL.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(class.as_str())?;
                }
                Ok(())
            }
            Problem::InvalidRate(text) => write!(
                f,
                "group {group:?}: rate {text:?} is not of the form N/s, N/min or N/h"
            ),
            Problem::UnknownPreset(name) => write!(
                f,
                "unknown preset {name:?}; expected one of free, tier-1, tier-2, tier-3, tier-4, tier-5"
            ),
            Problem::Syntax(message) => write!(f, "invalid quota file: {message}"),
        }
    }
}

impl std::error::Error for QuotaError {}
