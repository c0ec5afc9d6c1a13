//! What an operator reads: `/metrics` in Prometheus text, `/healthz`, `/readyz`, and one log
//! line and a few metrics per request.
//!
//! The library's own metrics (requests sent, answers by status, waits, queue depth, rates in
//! force and their changes, retries) come through the same recorder; the proxy adds:
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `together_tower_proxy_requests_total` | counter | class, tenant, status | requests answered by the proxy, by the status it answered |
//! | `together_tower_proxy_answer_seconds` | histogram | class | from a request's arrival to its answer's head |
//!
//! Labels are bounded: the endpoint class, a tenant named in the configuration (`none` in
//! pass-through mode), an HTTP status.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use together_tower::classify::EndpointClass;
use together_tower::limit::Tenant;

use super::access::Caller;
use crate::CliError;

/// Histogram buckets, in seconds: from a fast answer to a long wait for a turn.
const SECONDS_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];

/// What the operations routes read.
#[derive(Clone)]
pub struct Ops {
    metrics: PrometheusHandle,
    draining: Arc<AtomicBool>,
    redis: Option<together_tower_redis::RedisBackend>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("draining", &self.draining)
            .finish_non_exhaustive()
    }
}

impl Ops {
    /// Installs the Prometheus recorder for this process, and keeps its histograms trimmed.
    pub fn install(redis: Option<together_tower_redis::RedisBackend>) -> Result<Self, CliError> {
        let metrics = PrometheusBuilder::new()
            .set_buckets(&SECONDS_BUCKETS)
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|error| CliError::Setup(format!("cannot record metrics: {error}")))?;
        let upkeep = metrics.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        Ok(Self {
            metrics,
            draining: Arc::default(),
            redis,
        })
    }

    /// Marks the proxy as shutting down: `/readyz` answers 503 from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }
}

/// `GET /metrics`.
pub async fn metrics(State(ops): State<Ops>) -> Response {
    let mut response = Response::new(ops.metrics.render().into());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

/// `GET /healthz`: the process answers.
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /readyz`: 503 while shutting down; 200 otherwise, saying when Redis does not
/// answer (the proxy then decides alone, at its share of the quota).
pub async fn readyz(State(ops): State<Ops>) -> (StatusCode, &'static str) {
    if ops.draining.load(Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match &ops.redis {
        Some(redis) if redis.is_falling_back() => (
            StatusCode::OK,
            "ready; Redis does not answer: deciding alone at this proxy's share\n",
        ),
        _ => (StatusCode::OK, "ready\n"),
    }
}

/// One request's account: its class, its tenant and when it arrived.
#[derive(Debug)]
pub struct Outcome {
    class: EndpointClass,
    tenant: Option<Tenant>,
    started: Instant,
}

impl Outcome {
    /// The account of a request of `class` for `caller`, arrived at `started`.
    pub fn new(class: EndpointClass, caller: Option<&Caller>, started: Instant) -> Self {
        Self {
            class,
            tenant: caller.map(|caller| caller.tenant.clone()),
            started,
        }
    }

    /// Counts and logs the answer, and hands it back.
    pub fn record(self, response: Response) -> Response {
        let status = response.status();
        let elapsed = self.started.elapsed();
        let tenant = self.tenant.as_ref().map_or("none", Tenant::name);
        metrics::counter!(
            "together_tower_proxy_requests_total",
            "class" => self.class.as_str(),
            "tenant" => tenant.to_owned(),
            "status" => status.as_str().to_owned(),
        )
        .increment(1);
        metrics::histogram!("together_tower_proxy_answer_seconds", "class" => self.class.as_str())
            .record(elapsed.as_secs_f64());
        tracing::info!(
            target: "together_tower::proxy",
            class = self.class.as_str(),
            tenant,
            status = status.as_u16(),
            elapsed_ms = elapsed.as_millis() as u64,
            "answered",
        );
        response
    }
}
