//! What the Redis backend tells the outside world: `tracing` events and, with the `metrics`
//! feature, metrics on the `metrics` facade. No label or field ever names a key.

use std::time::Duration;

/// How one decision went, as a metric label.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Redis let the request go now.
    Allow,
    /// Redis took a turn for later.
    Reserved,
    /// Redis said wait, and took nothing.
    Wait,
    /// The cost is more than the bucket holds.
    TooLarge,
    /// Redis did not answer, or answered with an error.
    Error,
    /// Decided in this process, Redis being unreachable.
    Here,
}

impl Outcome {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Allow => "allow",
            Outcome::Reserved => "reserved",
            Outcome::Wait => "wait",
            Outcome::TooLarge => "too_large",
            Outcome::Error => "error",
            Outcome::Here => "here",
        }
    }
}

/// One decision, and how long the call to Redis took (none when decided here).
pub(crate) fn decided(outcome: Outcome, call: Option<Duration>) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("together_tower_redis_decisions_total", "outcome" => outcome.as_str())
            .increment(1);
        if let Some(call) = call {
            metrics::histogram!("together_tower_redis_call_seconds").record(call.as_secs_f64());
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (outcome, call);
}

/// Redis answered that the limiter is configured wrong: the request fails, loudly.
pub(crate) fn misconfigured(error: &dyn std::fmt::Display) {
    tracing::error!(target: "together_tower", %error, "redis is configured wrong: failing the request");
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_redis_decisions_total", "outcome" => "misconfigured")
        .increment(1);
}

/// Redis stopped answering: from now on decisions are made in this process (`deciding_here`),
/// or fail.
pub(crate) fn unreachable(
    error: &dyn std::fmt::Display,
    retry_after: Duration,
    deciding_here: bool,
) {
    let retry_ms = u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX);
    if deciding_here {
        tracing::warn!(target: "together_tower", %error, retry_ms, "redis unreachable: deciding in this process");
    } else {
        tracing::warn!(target: "together_tower", %error, retry_ms, "redis unreachable: failing requests");
    }
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("together_tower_redis_unreachable_total").increment(1);
        metrics::gauge!("together_tower_redis_deciding_here").set(if deciding_here {
            1.0
        } else {
            0.0
        });
    }
}

/// Redis answered again: decisions go back to it.
pub(crate) fn answers_again(after: Duration) {
    let down_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
    tracing::info!(target: "together_tower", down_ms, "redis answers again: deciding there");
    #[cfg(feature = "metrics")]
    metrics::gauge!("together_tower_redis_deciding_here").set(0.0);
}

/// This process published its rate for a bucket, or withdrew it.
pub(crate) fn published(group: &str, per_second: Option<f64>) {
    match per_second {
        Some(per_second) => {
            tracing::debug!(target: "together_tower", group, per_second, "rate published to the other processes");
        }
        None => {
            tracing::debug!(target: "together_tower", group, "published rate withdrawn");
        }
    }
}
