//! The `together-tower` command: `bench` runs a workload through the stack and reports what
//! happened; `embed` embeds a file, resumably; `proxy` puts the stack in front of programs in
//! any language. Each starts an embedded simulator when given no base URL (and, for `proxy`,
//! no key).

pub mod bench;
pub mod client;
pub mod embed;
pub mod observe;
pub mod plot;
pub mod proxy;
pub mod read;
pub mod shares;
pub mod target;

use std::fmt;

/// Why a command stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CliError {
    /// Flags that cannot work together (exit 2).
    Usage(String),
    /// The base URL does not answer (exit 1).
    Unreachable(String),
    /// Something could not be set up (exit 1).
    Setup(String),
    /// A file could not be read or written (exit 1).
    Io(String),
    /// The work stopped part-way (exit 1).
    Failed(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CliError::Usage(message)
            | CliError::Unreachable(message)
            | CliError::Setup(message)
            | CliError::Io(message)
            | CliError::Failed(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for CliError {}

/// A flag's value as the user types it (`chat`, `gcra`, `retry-only`), not its Rust name.
pub fn flag_word<T: clap::ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |value| value.get_name().to_owned())
}
