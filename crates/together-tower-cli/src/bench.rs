//! `together-tower bench`: a workload through the stack, and what happened.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::client::Snapshots;
use http_body_util::BodyExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use together_sim::{Algorithm, Hints};
use tower::ServiceExt;

use crate::client::{Endpoint, Mode, Stack, stack};
use crate::observe::{Attempt, Observations};
use crate::target::{ApiKey, SimLimits, Target, TargetArgs, json_request};
use crate::{CliError, flag_word};

/// Flags of `together-tower bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Where to send, and with which key.
    #[command(flatten)]
    pub target: TargetArgs,
    /// The endpoint to exercise.
    #[arg(long, value_enum, default_value = "chat")]
    pub endpoint: Endpoint,
    /// The model to name [default: one Together serves for the endpoint].
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
    /// How many requests to send.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub requests: u64,
    /// How many requests in flight at once.
    #[arg(long, default_value_t = 16, value_name = "C", value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub concurrency: u64,
    /// The client's request quota for the endpoint, a minute; the embedded simulator enforces
    /// the same unless --sim-rpm says otherwise.
    #[arg(long, default_value_t = 600, value_name = "R")]
    pub rpm: u32,
    /// The client's burst: requests that may go back to back.
    #[arg(long, default_value_t = 1, value_name = "B")]
    pub burst: u32,
    /// Retries per request at most.
    #[arg(long, default_value_t = 4, value_name = "K")]
    pub max_retries: u32,
    /// `adaptive` (the whole stack, rates that follow the server; `limited` is an alias),
    /// `static` (the whole stack, the table's rates only) or `retry-only` (no limiter: today's
    /// SDK behaviour).
    #[arg(long, value_enum, default_value = "adaptive")]
    pub mode: Mode,
    /// Print one JSON object with the results on the last line of stdout.
    #[arg(long)]
    pub json: bool,
    /// Draw requests per second over time, the quota and the 429s to this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// The embedded simulator's enforcement algorithm.
    #[arg(long, value_enum, default_value = "gcra")]
    pub sim_algorithm: Algorithm,
    /// The embedded simulator's limit, a minute [default: --rpm].
    #[arg(long, value_name = "R")]
    pub sim_rpm: Option<u32>,
    /// Which hints the embedded simulator's answers carry.
    #[arg(long, value_enum, default_value = "all")]
    pub sim_hints: Hints,
    /// The embedded simulator's answer over its limit: 429, or 503 ("slow down").
    #[arg(long, default_value_t = 429, value_name = "STATUS", value_parser = parse_over_limit_status)]
    pub sim_over_limit_status: u16,
    /// A change of the embedded simulator's limit during the run: AT_MS=RPM, such as
    /// 5000=3000. Repeat for several.
    #[arg(long = "sim-change", value_name = "AT_MS=RPM", value_parser = parse_change)]
    pub sim_changes: Vec<(u64, u32)>,
}

fn parse_over_limit_status(status: &str) -> Result<u16, String> {
    match status.trim() {
        "429" => Ok(429),
        "503" => Ok(503),
        _ => Err(format!("{status:?} is neither 429 nor 503")),
    }
}

fn parse_change(spec: &str) -> Result<(u64, u32), String> {
    let invalid = || format!("{spec:?} is not AT_MS=RPM, such as 5000=3000");
    let (at, rpm) = spec.split_once('=').ok_or_else(invalid)?;
    let at = at.trim().parse().map_err(|_| invalid())?;
    let rpm: u32 = rpm.trim().parse().map_err(|_| invalid())?;
    if rpm == 0 {
        return Err(format!("{spec:?}: the limit must be at least 1 a minute"));
    }
    Ok((at, rpm))
}

/// What a run did. Serialised as the `--json` line.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Requests sent by the caller.
    pub requests: u64,
    /// Requests that ended 2xx.
    pub ok: u64,
    /// Requests that did not (after retries).
    pub failed: u64,
    /// 429 answers that reached the stack from the server, counted below the retry layer.
    pub server_429: u64,
    /// 503 answers ("slow down") from the server, counted the same way.
    pub refused_503: u64,
    /// Attempts beyond the first of each request.
    pub retries: u64,
    /// Seconds from the first send to the last answer.
    pub elapsed_s: f64,
    /// 2xx answers a minute.
    pub achieved_rpm: f64,
    /// The client's quota a minute.
    pub quota_rpm: u32,
    /// 2xx answers over what the client's quota allowed in that time (its burst plus its rate
    /// times the elapsed time). Above 1 when the server let more through than the quota.
    pub quota_share: f64,
    /// Median latency of a request, waiting and retries included.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
    /// The mode.
    pub mode: Mode,
    /// The endpoint.
    pub endpoint: Endpoint,
    /// The embedded simulator's algorithm, if one ran.
    pub sim_algorithm: Option<Algorithm>,
    /// Requests in flight at once.
    pub concurrency: u64,
    /// The request rate in force at the end of the run, a minute (none in retry-only mode).
    pub final_rate_rpm: Option<f64>,
    /// The embedded simulator's limit at the end of the run, a minute.
    pub server_rate_rpm: Option<u32>,
    /// 2xx answers over what the embedded simulator allowed in the time the run took: the
    /// goodput, as a share of what the server would have accepted.
    pub server_share: Option<f64>,
}

/// What a run saw, for the plot.
#[derive(Debug, Clone, Default)]
pub struct Timeline {
    /// Every attempt the server answered.
    pub attempts: Vec<Attempt>,
    /// The request rate in force over the run, per second, sampled.
    pub rates: Vec<(Duration, f64)>,
    /// The server's limit over the run, per second (embedded simulator only).
    pub server_rates: Vec<(Duration, f64)>,
}

/// How often the rate in force is sampled for the plot.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// Runs a bench; returns the report and what it saw over time.
pub async fn run(args: &BenchArgs) -> Result<(BenchReport, Timeline), CliError> {
    if args.requests == 0 || args.rpm == 0 || args.burst == 0 {
        return Err(CliError::Usage(
            "--requests, --rpm and --burst must be at least 1".into(),
        ));
    }
    let sim_limits = SimLimits {
        hints: args.sim_hints,
        over_limit_status: args.sim_over_limit_status,
        changes: args.sim_changes.clone(),
        ..SimLimits::new(
            args.endpoint.sim_class(),
            args.sim_rpm.unwrap_or(args.rpm),
            args.sim_algorithm,
        )
    };
    let sim_started = Instant::now();
    let target = Target::resolve(args.target.base_url.as_deref(), sim_limits.clone()).await?;
    let observations = Observations::new();
    let (service, limits) = stack(
        args.mode,
        args.endpoint,
        args.rpm,
        args.burst,
        args.max_retries,
        &observations,
        args.target.redis().await?,
    )?;
    let workload = Workload {
        service,
        url: format!("{}{}", target.base_url, args.endpoint.path()),
        key: args.target.key_or("together-tower-bench"),
        model: args
            .model
            .clone()
            .unwrap_or_else(|| args.endpoint.default_model().to_owned()),
        endpoint: args.endpoint,
        total: args.requests,
    };
    let started = Instant::now();
    let rates = Arc::new(Mutex::new(Vec::new()));
    let sampler = limits
        .clone()
        .map(|limits| tokio::spawn(sample_rates(limits, started, Arc::clone(&rates))));
    let driven = drive(workload, args.concurrency, &observations).await?;
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    let embedded = target.sim.is_some();
    if let Some(sim) = target.sim {
        sim.shutdown().await;
    }
    // The simulator started a little before the run: measure its allowance over the run.
    let server = embedded.then(|| ServerView {
        limits: sim_limits,
        offset: started.saturating_duration_since(sim_started),
    });
    let report = report(
        args,
        &driven,
        &observations,
        limits.as_ref(),
        server.as_ref(),
    );
    let timeline = Timeline {
        attempts: observations.attempts_log(),
        rates: std::mem::take(&mut *rates.lock().unwrap_or_else(PoisonError::into_inner)),
        server_rates: server.map_or_else(Vec::new, |server| server.rates(driven.elapsed)),
    };
    Ok((report, timeline))
}

/// What the workers send: `total` requests of `endpoint` through `service`.
struct Workload {
    service: Stack,
    url: String,
    key: ApiKey,
    model: String,
    endpoint: Endpoint,
    total: u64,
}

/// What a run did: the answers that succeeded, each request's latency (sorted), and how long
/// it took.
struct Driven {
    ok: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
}

/// The embedded simulator's limits, and when the run began on its clock.
struct ServerView {
    limits: SimLimits,
    offset: Duration,
}

impl ServerView {
    /// What the server allowed each [`SAMPLE_EVERY`] of a run `elapsed` long, per second.
    fn rates(&self, elapsed: Duration) -> Vec<(Duration, f64)> {
        let steps = (elapsed.as_millis() / SAMPLE_EVERY.as_millis()) as u32 + 1;
        (0..=steps)
            .map(|step| {
                let at = SAMPLE_EVERY * step;
                (at, f64::from(self.limits.rpm_at(self.offset + at)) / 60.0)
            })
            .collect()
    }
}

/// Sends the workload from `concurrency` workers, each taking the next request when its last
/// is answered.
async fn drive(
    workload: Workload,
    concurrency: u64,
    observations: &Arc<Observations>,
) -> Result<Driven, CliError> {
    let progress = progress_bar(workload.total);
    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(workload.total as usize)));
    let workload = Arc::new(workload);
    let started = Instant::now();
    let workers: Vec<_> = (0..concurrency.min(workload.total))
        .map(|_| {
            let worker = Worker {
                workload: Arc::clone(&workload),
                next: Arc::clone(&next),
                ok: Arc::clone(&ok),
                latencies: Arc::clone(&latencies),
                progress: progress.clone(),
                observations: Arc::clone(observations),
            };
            tokio::spawn(worker.run())
        })
        .collect();
    for worker in workers {
        worker
            .await
            .map_err(|error| CliError::Setup(format!("a worker failed: {error}")))?;
    }
    let elapsed = started.elapsed();
    progress.finish_and_clear();
    let mut latencies =
        std::mem::take(&mut *latencies.lock().unwrap_or_else(PoisonError::into_inner));
    latencies.sort();
    Ok(Driven {
        ok: ok.load(Ordering::Relaxed),
        latencies,
        elapsed,
    })
}

/// One worker of [`drive`], and what it shares with the others.
struct Worker {
    workload: Arc<Workload>,
    next: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    progress: ProgressBar,
    observations: Arc<Observations>,
}

impl Worker {
    async fn run(self) {
        let workload = &*self.workload;
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= workload.total {
                break;
            }
            let body = workload.endpoint.body(&workload.model, index).to_string();
            let request = json_request(&workload.url, &workload.key, body);
            let sent = Instant::now();
            if let Ok(response) = workload.service.clone().oneshot(request).await {
                let success = response.status().is_success();
                // Read the body, so the connection goes back to the pool.
                let _ = response.into_body().collect().await;
                if success {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            self.latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(sent.elapsed());
            self.progress.inc(1);
            let attempts = self.observations.attempts.load(Ordering::Relaxed);
            let done = self.progress.position();
            self.progress.set_message(format!(
                "sent {attempts}, 429s {}, retries {}",
                self.observations.server_429.load(Ordering::Relaxed),
                attempts.saturating_sub(done)
            ));
        }
    }
}

/// The report of a run.
fn report(
    args: &BenchArgs,
    driven: &Driven,
    observations: &Observations,
    limits: Option<&Snapshots>,
    server: Option<&ServerView>,
) -> BenchReport {
    let ok = driven.ok;
    let attempts = observations.attempts.load(Ordering::Relaxed);
    let seconds = driven.elapsed.as_secs_f64().max(f64::EPSILON);
    let allowed = f64::from(args.burst) + f64::from(args.rpm) / 60.0 * seconds;
    let end = |server: &ServerView| server.offset + driven.elapsed;
    BenchReport {
        requests: args.requests,
        ok,
        failed: args.requests - ok,
        server_429: observations.server_429.load(Ordering::Relaxed),
        refused_503: observations.server_503.load(Ordering::Relaxed),
        retries: attempts.saturating_sub(args.requests),
        elapsed_s: seconds,
        achieved_rpm: ok as f64 / seconds * 60.0,
        quota_rpm: args.rpm,
        quota_share: ok as f64 / allowed,
        p50_ms: percentile(&driven.latencies, 50.0),
        p99_ms: percentile(&driven.latencies, 99.0),
        mode: args.mode,
        endpoint: args.endpoint,
        sim_algorithm: server.map(|_| args.sim_algorithm),
        concurrency: args.concurrency,
        final_rate_rpm: limits.and_then(rate_in_force).map(|rate| rate * 60.0),
        server_rate_rpm: server.map(|server| server.limits.rpm_at(end(server))),
        server_share: server.map(|server| {
            ok as f64 / (1.0 + server.limits.allowed_between(server.offset, end(server)))
        }),
    }
}

/// The request rate in force of the run's one bucket, per second.
fn rate_in_force(limits: &Snapshots) -> Option<f64> {
    limits()
        .into_iter()
        .filter_map(|bucket| bucket.requests_per_second)
        .reduce(f64::min)
}

/// Samples the rate in force into `samples` every [`SAMPLE_EVERY`], until aborted.
async fn sample_rates(
    limits: Snapshots,
    started: Instant,
    samples: Arc<Mutex<Vec<(Duration, f64)>>>,
) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        every.tick().await;
        if let Some(rate) = rate_in_force(&limits) {
            samples
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push((started.elapsed(), rate));
        }
    }
}

/// The latency below which `percent` of requests finished, in milliseconds.
fn percentile(sorted: &[Duration], percent: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((percent / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1_000.0
}

/// A progress bar on stderr, or a hidden one when stderr is not a terminal.
pub(crate) fn progress_bar(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{bar:30} {pos}/{len} done, {per_sec} · {msg} · {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// The short table printed at the end of a run.
pub fn table(report: &BenchReport) -> String {
    let target = report
        .sim_algorithm
        .map_or("the given base URL".to_owned(), |algorithm| {
            format!("the embedded simulator ({})", flag_word(&algorithm))
        });
    format!(
        "bench: {} requests to {} through the {} stack, {} at a time, against {target}\n\
         \n\
         {:<14} {:>10}\n{:<14} {:>10}\n{:<14} {:>10}\n{:<14} {:>10}\n{:<14} {:>10}\n\
         {:<14} {:>10.2}\n{:<14} {:>10.1}\n{:<14} {:>10}\n{:<14} {:>9.1}%\n{:<14} {:>10.1}\n{:<14} {:>10.1}\n",
        report.requests,
        flag_word(&report.endpoint),
        flag_word(&report.mode),
        report.concurrency,
        "ok",
        report.ok,
        "failed",
        report.failed,
        "server 429s",
        report.server_429,
        "retries",
        report.retries,
        "requests",
        report.requests,
        "elapsed s",
        report.elapsed_s,
        "achieved rpm",
        report.achieved_rpm,
        "quota rpm",
        report.quota_rpm,
        "quota used",
        report.quota_share * 100.0,
        "p50 ms",
        report.p50_ms,
        "p99 ms",
        report.p99_ms,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ranks_of_the_sorted_latencies() {
        let latencies: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&latencies, 50.0), 50.0);
        assert_eq!(percentile(&latencies, 99.0), 99.0);
        assert_eq!(percentile(&latencies[..1], 99.0), 1.0);
        assert_eq!(percentile(&[], 50.0), 0.0);
    }
}
