//! What the stack tells the outside world: `tracing` events and, with the `metrics` feature,
//! metrics on the `metrics` facade. One function per thing that happens, so the layers' logic
//! reads without it.
//!
//! No key ever appears: events name a caller by its fingerprint (`key`), and metrics carry no
//! caller at all. Metric labels are bounded: the endpoint class (13 values), the quota group,
//! the model and the tenant (each at most [`MODEL_LABELS`] live at once, following recent
//! traffic, then `"other"`: see [`labels`]), the priority (3 values), and a coarse status. The events and metrics are listed in the
//! crate docs, for users.

use std::time::Duration;

use http::StatusCode;

use crate::classify::EndpointClass;
use crate::key::ApiKeyId;
use crate::limit::Priority;

#[cfg(feature = "metrics")]
mod labels;

/// The most model names that are metric labels at once; other names are `"other"`.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) const MODEL_LABELS: usize = 64;

/// Why a bucket was closed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Closure {
    /// A 429, for its hint (or the default pause).
    Refused,
    /// `x-ratelimit-remaining: 0`, until the reset.
    UsedUp,
}

/// Why a rate changed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RateChange {
    /// The server stated a limit.
    Stated,
    /// A 429 the pace did not expect.
    Refused,
    /// A share of 503s above the noise: a trial cut.
    Unavailable,
    /// A trial cut that did not make the 503s fall, undone.
    Noise,
}

impl RateChange {
    /// The reason, as logs and metrics name it.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RateChange::Stated => "stated limit",
            RateChange::Refused => "unexpected 429",
            RateChange::Unavailable => "503s above the noise",
            RateChange::Noise => "503s were noise",
        }
    }
}

/// Why a job slot went back.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SlotRelease {
    /// An answer showed the job ended.
    Ended,
    /// Its time passed without news.
    Expired,
    /// A list showed no running job for it.
    NotListed,
}

impl SlotRelease {
    pub(crate) const fn as_str(self) -> &'static str {
        match self {
            SlotRelease::Ended => "ended",
            SlotRelease::Expired => "expired",
            SlotRelease::NotListed => "not_listed",
        }
    }
}

/// A request the limiter refused itself.
pub(crate) fn refused(class: EndpointClass, reason: &'static str, error: &dyn std::fmt::Display) {
    tracing::debug!(target: "together_tower", class = %class, reason, %error, "refused before sending");
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_refused_total", "class" => class.as_str(), "reason" => reason)
        .increment(1);
}

/// A request queued for its turn behind `ahead` others.
pub(crate) fn queued(class: EndpointClass, model: Option<&str>, ahead: usize, estimate: Duration) {
    tracing::debug!(
        target: "together_tower",
        class = %class,
        model,
        position = ahead,
        expected_wait_ms = estimate.as_millis() as u64,
        "waiting for a turn"
    );
    #[cfg(feature = "metrics")]
    metrics::gauge!("together_tower_waiting", "class" => class.as_str(), "model" => model_label(model))
        .increment(1.0);
}

/// A waiter leaving its queue: what telemetry says of it.
pub(crate) struct Leaving<'a> {
    pub(crate) class: EndpointClass,
    pub(crate) model: Option<&'a str>,
    pub(crate) priority: Priority,
    pub(crate) tenant: Option<&'a str>,
}

/// A waiter left its queue: its turn taken (`sent`), or its place given up.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn left_queue(leaving: &Leaving<'_>, waited: Duration, sent: bool) {
    let Leaving {
        class,
        model,
        priority,
        tenant,
    } = *leaving;
    let waited_ms = waited.as_millis() as u64;
    let priority_name = priority.as_str();
    if sent {
        tracing::debug!(target: "together_tower", class = %class, model, priority = priority_name, tenant, waited_ms, "turn taken");
    } else {
        tracing::debug!(target: "together_tower", class = %class, model, priority = priority_name, tenant, waited_ms, "gave up its place");
    }
    #[cfg(feature = "metrics")]
    {
        let model = model_label(model);
        metrics::gauge!("together_tower_waiting", "class" => class.as_str(), "model" => model.clone())
            .decrement(1.0);
        if sent {
            metrics::counter!("together_tower_requests_total", "class" => class.as_str(), "model" => model)
                .increment(1);
            metrics::histogram!("together_tower_wait_seconds", "class" => class.as_str())
                .record(waited.as_secs_f64());
            metrics::histogram!("together_tower_queue_wait_seconds", "priority" => priority_name)
                .record(waited.as_secs_f64());
            metrics::counter!(
                "together_tower_queued_turns_total",
                "priority" => priority_name, "tenant" => tenant_label(tenant)
            )
            .increment(1);
        }
    }
}

/// A request admitted at once, without waiting.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn admitted(class: EndpointClass, model: Option<&str>) {
    #[cfg(feature = "metrics")]
    {
        metrics::counter!("together_tower_requests_total", "class" => class.as_str(), "model" => model_label(model))
            .increment(1);
        metrics::histogram!("together_tower_wait_seconds", "class" => class.as_str()).record(0.0);
    }
}

/// The answer to a request, as far as the limiter cares.
pub(crate) fn answered(class: EndpointClass, model: Option<&str>, status: Option<StatusCode>) {
    let status = match status.map(|status| status.as_u16()) {
        Some(200..=299) => "2xx",
        Some(429) => "429",
        Some(503) => "503",
        Some(400..=499) => "4xx",
        Some(_) => "5xx",
        None => "error",
    };
    if matches!(status, "429" | "503") {
        tracing::debug!(target: "together_tower", class = %class, model, status, "the server refused");
    }
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "together_tower_answers_total",
        "class" => class.as_str(), "model" => model_label(model), "status" => status
    )
    .increment(1);
}

/// An answer reported more tokens than any admitted request can use; it was charged `bound`.
pub(crate) fn usage_not_believed(
    key: ApiKeyId,
    group: &str,
    model: Option<&str>,
    reported: u64,
    bound: u64,
) {
    tracing::warn!(
        target: "together_tower",
        key = %key,
        group,
        model,
        reported,
        charged = bound,
        "an answer's usage is larger than the token burst: charged the burst instead"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_usage_not_believed_total", "group" => group.to_owned())
        .increment(1);
}

/// An answer's `usage` settled its token charge: `used` of the `charged` estimate.
pub(crate) fn tokens_settled(
    key: ApiKeyId,
    group: &str,
    model: Option<&str>,
    charged: u64,
    used: u64,
) {
    tracing::trace!(
        target: "together_tower",
        key = %key,
        group,
        model,
        charged,
        used,
        "token charge settled"
    );
    #[cfg(feature = "metrics")]
    if used < charged {
        metrics::counter!("together_tower_tokens_returned_total", "group" => group.to_owned())
            .increment(charged - used);
    }
}

/// An answer ended without its `usage`: its estimate stays charged.
pub(crate) fn estimate_kept(key: ApiKeyId, group: &str, model: Option<&str>, charged: u64) {
    tracing::debug!(
        target: "together_tower",
        key = %key,
        group,
        model,
        charged,
        "an answer ended without its usage: its estimate stays charged"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_estimates_kept_total", "group" => group.to_owned())
        .increment(1);
}

/// The models list was fetched for the model check.
pub(crate) fn models_fetched(models: usize) {
    tracing::debug!(target: "together_tower", models, "models list fetched");
}

/// The models list could not be had; 404s are handed back as they came for `remembered`.
pub(crate) fn models_unavailable(why: &'static str, remembered: std::time::Duration) {
    tracing::warn!(
        target: "together_tower",
        why,
        retry_in_s = remembered.as_secs(),
        "models list unavailable: 404s pass through unchecked"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_models_list_failures_total").increment(1);
}

/// The server's word closed a bucket.
pub(crate) fn closed(
    key: ApiKeyId,
    group: &str,
    model: Option<&str>,
    pause: Duration,
    why: Closure,
) {
    let reason = match why {
        Closure::Refused => "429",
        Closure::UsedUp => "x-ratelimit-remaining: 0",
    };
    tracing::info!(
        target: "together_tower",
        key = %key,
        group,
        model,
        pause_ms = pause.as_millis() as u64,
        reason,
        "bucket closed by the server"
    );
}

/// A bucket's request rate changed.
pub(crate) fn rate_changed(
    key: ApiKeyId,
    group: &str,
    model: Option<&str>,
    from: f64,
    to: f64,
    why: RateChange,
) {
    let reason = why.as_str();
    tracing::info!(
        target: "together_tower",
        key = %key,
        group,
        model,
        from_per_second = from,
        to_per_second = to,
        reason,
        "rate changed"
    );
    #[cfg(feature = "metrics")]
    {
        metrics::gauge!("together_tower_rate_per_second", "group" => group.to_owned(), "model" => model_label(model))
            .set(to);
        metrics::counter!("together_tower_rate_changes_total", "group" => group.to_owned(), "reason" => reason)
            .increment(1);
    }
}

/// The retry layer sends a request again, after `delay`; the shared budget had room for it,
/// and this request may be retried `retries_left` more times.
pub(crate) fn retrying(
    class: EndpointClass,
    attempt: u32,
    reason: &'static str,
    delay: Duration,
    retries_left: u32,
) {
    tracing::info!(
        target: "together_tower",
        class = %class,
        attempt,
        reason,
        delay_ms = delay.as_millis() as u64,
        retries_left,
        "retrying"
    );
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_retries_total", "class" => class.as_str(), "reason" => reason)
        .increment(1);
}

/// The retry layer hands an answer or error back without retrying, though the answer was one
/// it retries.
pub(crate) fn gave_up(class: EndpointClass, attempts: u32, reason: &'static str) {
    tracing::info!(target: "together_tower", class = %class, attempts, reason, "giving up");
    #[cfg(feature = "metrics")]
    metrics::counter!("together_tower_retries_refused_total", "class" => class.as_str(), "reason" => reason)
        .increment(1);
}

/// A created job keeps its slot; `held` jobs hold slots of the group now.
pub(crate) fn job_slot_held(key: ApiKeyId, group: &str, held: usize) {
    tracing::debug!(target: "together_tower", key = %key, group, held, "job slot held");
    #[cfg(feature = "metrics")]
    metrics::gauge!("together_tower_job_slots_held", "group" => group.to_owned()).increment(1.0);
}

/// A job's slot went back.
pub(crate) fn job_slot_released(key: ApiKeyId, group: &str, why: SlotRelease) {
    let reason = why.as_str();
    tracing::debug!(target: "together_tower", key = %key, group, reason, "job slot released");
    #[cfg(feature = "metrics")]
    metrics::gauge!("together_tower_job_slots_held", "group" => group.to_owned()).decrement(1.0);
}

/// A 409 on create: the free slots were taken as placeholders for `recheck`.
pub(crate) fn job_slots_taken_by_409(key: ApiKeyId, group: &str, taken: usize, recheck: Duration) {
    tracing::info!(
        target: "together_tower",
        key = %key,
        group,
        taken,
        recheck_ms = recheck.as_millis() as u64,
        "409: every job slot is in use at the server"
    );
    #[cfg(feature = "metrics")]
    metrics::gauge!("together_tower_job_slots_held", "group" => group.to_owned())
        .increment(taken as f64);
}

/// A retry goes with the fallback model `to` instead of `from`.
pub(crate) fn fell_back(class: EndpointClass, from: Option<&str>, to: &str) {
    let from = from.map(crate::model_name::bounded_str);
    let from = from.as_deref();
    tracing::info!(target: "together_tower", class = %class, from, to, "falling back to another model");
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "together_tower_fallbacks_total",
        "class" => class.as_str(), "from" => model_label(from), "to" => model_label(Some(to))
    )
    .increment(1);
}

/// A model name as a metric label: the name itself while it has one of the
/// [`MODEL_LABELS`] places (see [`labels`]), `"other"` otherwise, `"none"` without one.
#[cfg(feature = "metrics")]
fn model_label(model: Option<&str>) -> String {
    static LABELS: std::sync::OnceLock<std::sync::Mutex<labels::BoundedLabels>> =
        std::sync::OnceLock::new();
    bounded_label(&LABELS, model)
}

/// A tenant's name as a metric label, bounded as model names are (see [`labels`]).
#[cfg(feature = "metrics")]
fn tenant_label(tenant: Option<&str>) -> String {
    static LABELS: std::sync::OnceLock<std::sync::Mutex<labels::BoundedLabels>> =
        std::sync::OnceLock::new();
    bounded_label(&LABELS, tenant)
}

/// `name` as a label of the set `labels`: itself, `"other"`, or `"none"` without a name.
#[cfg(feature = "metrics")]
fn bounded_label(
    labels: &std::sync::OnceLock<std::sync::Mutex<labels::BoundedLabels>>,
    name: Option<&str>,
) -> String {
    let Some(name) = name else {
        return "none".to_owned();
    };
    let name = crate::model_name::bounded_str(name);
    labels
        .get_or_init(std::sync::Mutex::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .label(&name, tokio::time::Instant::now())
}
