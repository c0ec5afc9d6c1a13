//! Why Redis could not decide: an outage, which the backend may decide through, or a
//! configuration that can never work, which it must not hide.

use std::fmt;
use std::time::Duration;

use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Why Redis could not decide.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisBackendError {
    /// Redis answered with an error, or the connection failed.
    Redis(RedisError),
    /// Redis did not answer within the call timeout.
    Timeout(Duration),
    /// Redis answered, and the answer says the limiter is configured wrong: a cluster node
    /// reached without the cluster client (`MOVED`, `ASK`), keys across slots (`CROSSSLOT`),
    /// a wrong password or a missing permission. This is not an outage: waiting will not
    /// mend it, and deciding in this process instead would quietly give every process a
    /// quota of its own. It fails the request whatever [`Unreachable`](crate::Unreachable)
    /// says, and is logged at `error`.
    Misconfigured(String),
}

impl RedisBackendError {
    /// A redis-rs error from one Redis, typed by what it means for the limiter.
    pub(crate) fn from_redis(error: RedisError) -> Self {
        Self::typed(error, false)
    }

    /// A redis-rs error on a connection that is `cluster` or not. The cluster client follows
    /// `MOVED` and `ASK` itself; one that still comes out means the node that owns the slot
    /// did not answer, an outage like any other. From a single connection it means that
    /// Redis is a cluster node.
    pub(crate) fn typed(error: RedisError, cluster: bool) -> Self {
        let redirected = matches!(
            error.kind(),
            ErrorKind::Server(ServerErrorKind::Moved | ServerErrorKind::Ask)
        );
        if configured_wrong(&error) && !(cluster && redirected) {
            RedisBackendError::Misconfigured(error.to_string())
        } else {
            RedisBackendError::Redis(error)
        }
    }

    /// Whether this is [`RedisBackendError::Misconfigured`].
    pub fn is_misconfigured(&self) -> bool {
        matches!(self, RedisBackendError::Misconfigured(_))
    }
}

/// Whether Redis's answer says the configuration is wrong, rather than that Redis is away.
fn configured_wrong(error: &RedisError) -> bool {
    let by_kind = matches!(
        error.kind(),
        ErrorKind::AuthenticationFailed
            | ErrorKind::InvalidClientConfig
            | ErrorKind::Server(
                ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::CrossSlot
                    | ServerErrorKind::NoPerm
            )
    );
    // Codes redis-rs has no kind for.
    let by_code = error
        .code()
        .is_some_and(|code| matches!(code, "NOAUTH" | "WRONGPASS" | "NOPERM"));
    by_kind || by_code
}

impl fmt::Display for RedisBackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisBackendError::Redis(error) => write!(f, "redis: {error}"),
            RedisBackendError::Timeout(after) => {
                write!(f, "redis did not answer within {after:?}")
            }
            RedisBackendError::Misconfigured(why) => {
                write!(f, "redis is configured wrong for the limiter: {why}")
            }
        }
    }
}

impl std::error::Error for RedisBackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisBackendError::Redis(error) => Some(error),
            RedisBackendError::Timeout(_) | RedisBackendError::Misconfigured(_) => None,
        }
    }
}
