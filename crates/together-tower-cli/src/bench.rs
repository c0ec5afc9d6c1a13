//! `together-tower bench`: a workload through the stack, and what happened.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::client::Snapshots;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use together_sim::{Algorithm, Hints};
use tower::ServiceExt;

use crate::client::{Endpoint, Mode, Stack, StackSettings, stack};
use crate::observe::{Attempt, Observations};
use crate::read::read_answer;
use crate::shares::{
    Outcome, PriorityReport, TenantArg, TenantList, TenantReport, mark, parse_tenants, priority_of,
    priority_reports, tenant_reports,
};
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
    /// The client's token budget for the endpoint (prompt and completion tokens), a minute,
    /// with one second of it as its burst; the embedded simulator enforces the same unless
    /// --sim-tpm says otherwise [default: no token budget].
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..))]
    pub tpm: Option<u32>,
    /// The `max_tokens` of each chat or completions request: what the client's token budget
    /// charges until the answer's `usage` settles it.
    #[arg(long, default_value_t = 16, value_name = "M")]
    pub max_tokens: u32,
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
    /// The embedded simulator's token limit, a minute [default: --tpm].
    #[arg(long, value_name = "T", value_parser = clap::value_parser!(u32).range(1..))]
    pub sim_tpm: Option<u32>,
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
    /// The share (0 to 1) of requests the embedded simulator answers 503 at random, whatever
    /// the rate, as a shared platform does when it is out of capacity.
    #[arg(long = "sim-503-share", default_value_t = 0.0, value_name = "SHARE", value_parser = parse_share)]
    pub sim_503_share: f64,
    /// Together's earned rate in the embedded simulator: keys start at this many requests a
    /// minute and earn twice their successful rate of the last ten seconds, up to --sim-rpm.
    #[arg(long, value_name = "RPM")]
    pub sim_earned_base_rpm: Option<u32>,
    /// Ask for streamed answers (`"stream": true`; chat and completions): the report adds
    /// the time to the first token (p50, p99) and the completion tokens a second.
    #[arg(long)]
    pub stream: bool,
    /// Tenants sharing the quota, with their weights: NAME:WEIGHT,... such as a:1,b:1,c:2.
    /// Each runs its own part of the requests with --concurrency workers of its own, so each
    /// offers enough to keep the quota busy; the report adds each tenant's share of the 2xx
    /// answers while all of them still had requests waiting.
    #[arg(long, value_name = "NAME:WEIGHT,...", value_parser = parse_tenants)]
    pub tenants: Option<TenantList>,
    /// Mark this share (0 to 1) of the requests interactive and the rest background; the
    /// report adds each priority's latencies.
    #[arg(long, value_name = "SHARE", value_parser = parse_share)]
    pub interactive_share: Option<f64>,
}

fn parse_share(share: &str) -> Result<f64, String> {
    match share.trim().parse::<f64>() {
        Ok(share) if (0.0..=1.0).contains(&share) => Ok(share),
        _ => Err(format!("{share:?} is not a share between 0 and 1")),
    }
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
    /// goodput, as a share of what the server would have accepted. Under an earned rate, the
    /// time an ideal client would have taken over the time the run took.
    pub server_share: Option<f64>,
    /// Under the embedded simulator's earned rate: seconds an ideal client would have taken.
    pub ideal_s: Option<f64>,
    /// How often the rate in force changed, by the reason (none in retry-only mode).
    pub rate_changes: Option<RateChangeCounts>,
    /// With `--stream`: the median time from a request's send (its wait for a turn
    /// included) to its answer's first event.
    pub first_token_p50_ms: Option<f64>,
    /// With `--stream`: the 99th percentile of that time.
    pub first_token_p99_ms: Option<f64>,
    /// With `--stream`: completion tokens the streams carried (by their `usage`), a second
    /// of the run.
    pub completion_tokens_per_second: Option<f64>,
    /// With `--tpm`: the client's token budget a minute.
    pub quota_tpm: Option<u32>,
    /// Tokens (prompt and completion) of the answers the embedded simulator served 2xx, by
    /// its own count.
    pub server_tokens: Option<u64>,
    /// Under the embedded simulator's token limit: those tokens over what the limit allowed
    /// in the time the run took (a second's worth at once, then its rate).
    pub server_token_share: Option<f64>,
    /// With `--tenants`: what each tenant got.
    pub tenants: Option<Vec<TenantReport>>,
    /// With `--interactive-share`: what each priority got.
    pub priorities: Option<Vec<PriorityReport>>,
}

/// How often the rate in force changed, by the reason, summed over the run's buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RateChangeCounts {
    /// The server stated a new limit.
    pub stated: u64,
    /// An unexpected 429 cut the rate.
    pub refused_429: u64,
    /// A share of 503s above the noise started a trial cut.
    pub unavailable_503: u64,
    /// A trial cut that did not make the 503s fall, undone.
    pub noise_503: u64,
}

impl RateChangeCounts {
    fn of(limits: &Snapshots) -> Self {
        limits()
            .iter()
            .map(|bucket| bucket.rate_changes)
            .fold(Self::default(), |sum, changes| Self {
                stated: sum.stated + changes.stated,
                refused_429: sum.refused_429 + changes.refused,
                unavailable_503: sum.unavailable_503 + changes.unavailable,
                noise_503: sum.noise_503 + changes.noise,
            })
    }

    /// The reasons whose count grew since `before`.
    fn grown_since(self, before: Self) -> impl Iterator<Item = &'static str> {
        [
            (self.stated > before.stated, "stated"),
            (self.refused_429 > before.refused_429, "429"),
            (self.unavailable_503 > before.unavailable_503, "503 trial"),
            (self.noise_503 > before.noise_503, "503 noise"),
        ]
        .into_iter()
        .filter_map(|(grown, reason)| grown.then_some(reason))
    }
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
    /// When the rate in force changed, and why.
    pub rate_changes: Vec<(Duration, &'static str)>,
    /// With `--tenants`: each tenant's name and when each of its 2xx answers came.
    pub tenants: Vec<(String, Vec<Duration>)>,
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
    if args.stream && !matches!(args.endpoint, Endpoint::Chat | Endpoint::Completions) {
        return Err(CliError::Usage(
            "--stream needs --endpoint chat or completions".into(),
        ));
    }
    let sim_limits = sim_limits(args);
    let sim_started = Instant::now();
    let target = Target::resolve(args.target.base_url.as_deref(), sim_limits.clone()).await?;
    let observations = Observations::new();
    let settings = stack_settings(args);
    let (service, limits) = stack(&settings, &observations, args.target.redis().await?)?;
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
        stream: args.stream,
        max_tokens: args.max_tokens,
        tenant: None,
        interactive_share: args.interactive_share,
        started: Instant::now(),
    };
    let started = workload.started;
    let samples = Arc::new(Mutex::new(Samples::default()));
    let sampler = limits
        .clone()
        .map(|limits| tokio::spawn(sample_rates(limits, started, Arc::clone(&samples))));
    let driven = match &args.tenants {
        Some(tenants) => {
            drive_tenants(workload, &tenants.0, args.concurrency, &observations).await?
        }
        None => drive(workload, args.concurrency, &observations).await?,
    };
    if let Some(sampler) = sampler {
        sampler.abort();
    }
    // The simulator started a little before the run: measure its allowance over the run.
    let mut server = None;
    if let Some(sim) = target.sim {
        server = Some(ServerView {
            limits: sim_limits,
            offset: started.saturating_duration_since(sim_started),
            tokens: sim.stats().class(args.endpoint.sim_class()).tokens,
        });
        sim.shutdown().await;
    }
    let report = report(
        args,
        &driven,
        &observations,
        limits.as_ref(),
        server.as_ref(),
    );
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(PoisonError::into_inner));
    let timeline = Timeline {
        attempts: observations.attempts_log(),
        rates: samples.rates,
        server_rates: server.map_or_else(Vec::new, |server| server.rates(driven.elapsed)),
        rate_changes: samples.changes,
        tenants: tenant_answers(args, &driven.outcomes),
    };
    Ok((report, timeline))
}

/// With `--tenants`, each tenant's name and the times of its 2xx answers, for the plot.
fn tenant_answers(args: &BenchArgs, outcomes: &[Outcome]) -> Vec<(String, Vec<Duration>)> {
    let tenants = args.tenants.iter().flat_map(|tenants| &tenants.0);
    tenants
        .enumerate()
        .map(|(index, tenant)| {
            let answers = outcomes
                .iter()
                .filter(|outcome| outcome.ok && outcome.tenant == index)
                .map(|outcome| outcome.done)
                .collect();
            (tenant.name.clone(), answers)
        })
        .collect()
}

/// What the embedded simulator enforces, by the `--sim-*` flags.
fn sim_limits(args: &BenchArgs) -> SimLimits {
    SimLimits {
        hints: args.sim_hints,
        over_limit_status: args.sim_over_limit_status,
        changes: args.sim_changes.clone(),
        unavailable_share: args.sim_503_share,
        earned_base_rpm: args.sim_earned_base_rpm,
        tpm: args.sim_tpm.or(args.tpm),
        ..SimLimits::new(
            args.endpoint.sim_class(),
            args.sim_rpm.unwrap_or(args.rpm),
            args.sim_algorithm,
        )
    }
}

/// The stack the flags describe.
fn stack_settings(args: &BenchArgs) -> StackSettings {
    StackSettings {
        mode: args.mode,
        endpoint: args.endpoint,
        rpm: args.rpm,
        burst: args.burst,
        tpm: args.tpm,
        max_retries: args.max_retries,
        tenant_weights: (args.tenants.iter().flat_map(|tenants| &tenants.0))
            .map(|tenant| (tenant.name.clone(), tenant.weight))
            .collect(),
    }
}

/// What the workers send: `total` requests of `endpoint` through `service`.
struct Workload {
    service: Stack,
    url: String,
    key: ApiKey,
    model: String,
    endpoint: Endpoint,
    total: u64,
    /// Ask for streamed answers.
    stream: bool,
    /// Each request's `max_tokens`.
    max_tokens: u32,
    /// The tenant its requests are for, with `--tenants`, and its place in the list.
    tenant: Option<(usize, together_tower::limit::Tenant)>,
    /// The share of its requests that are interactive, the rest background.
    interactive_share: Option<f64>,
    /// When the run began.
    started: Instant,
}

/// What a run did: the answers that succeeded, each request's latency (sorted), and how long
/// it took.
struct Driven {
    ok: u64,
    latencies: Vec<Duration>,
    elapsed: Duration,
    streams: Streams,
    /// How each request ended.
    outcomes: Vec<Outcome>,
}

/// The embedded simulator's limits, and when the run began on its clock.
struct ServerView {
    limits: SimLimits,
    offset: Duration,
    /// Tokens of the answers it served 2xx.
    tokens: u64,
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
    let streams = Arc::new(Mutex::new(Streams::default()));
    let outcomes = Arc::new(Mutex::new(Vec::new()));
    let workload = Arc::new(workload);
    let started = workload.started;
    let workers: Vec<_> = (0..concurrency.min(workload.total))
        .map(|_| {
            let worker = Worker {
                workload: Arc::clone(&workload),
                next: Arc::clone(&next),
                ok: Arc::clone(&ok),
                latencies: Arc::clone(&latencies),
                streams: Arc::clone(&streams),
                outcomes: Arc::clone(&outcomes),
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
    let mut streams = std::mem::take(&mut *streams.lock().unwrap_or_else(PoisonError::into_inner));
    streams.first_tokens.sort();
    let outcomes = std::mem::take(&mut *outcomes.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Driven {
        ok: ok.load(Ordering::Relaxed),
        latencies,
        elapsed,
        streams,
        outcomes,
    })
}

/// Runs one workload for each tenant at once, each with `concurrency` workers and its part
/// of the requests, and puts what they did together.
async fn drive_tenants(
    workload: Workload,
    tenants: &[TenantArg],
    concurrency: u64,
    observations: &Arc<Observations>,
) -> Result<Driven, CliError> {
    let count = tenants.len() as u64;
    let runs: Vec<_> = tenants
        .iter()
        .enumerate()
        .map(|(index, tenant)| {
            let part = Workload {
                // The first tenants take what does not divide evenly.
                total: workload.total / count + u64::from((index as u64) < workload.total % count),
                tenant: Some((index, together_tower::limit::Tenant::new(&tenant.name))),
                service: workload.service.clone(),
                url: workload.url.clone(),
                key: workload.key.clone(),
                model: workload.model.clone(),
                ..workload
            };
            let observations = Arc::clone(observations);
            tokio::spawn(async move { drive(part, concurrency, &observations).await })
        })
        .collect();
    let mut all = Driven {
        ok: 0,
        latencies: Vec::new(),
        elapsed: Duration::ZERO,
        streams: Streams::default(),
        outcomes: Vec::new(),
    };
    for run in runs {
        let driven = run
            .await
            .map_err(|error| CliError::Setup(format!("a tenant's run failed: {error}")))??;
        all.ok += driven.ok;
        all.latencies.extend(driven.latencies);
        all.elapsed = all.elapsed.max(driven.elapsed);
        all.streams.first_tokens.extend(driven.streams.first_tokens);
        all.streams.completion_tokens += driven.streams.completion_tokens;
        all.outcomes.extend(driven.outcomes);
    }
    all.latencies.sort();
    all.streams.first_tokens.sort();
    Ok(all)
}

/// What the streamed answers of a run showed: each one's time to its first token (sorted
/// once the run is over), and the completion tokens of them all.
#[derive(Debug, Default)]
struct Streams {
    first_tokens: Vec<Duration>,
    completion_tokens: u64,
}

/// One worker of [`drive`], and what it shares with the others.
struct Worker {
    workload: Arc<Workload>,
    next: Arc<AtomicU64>,
    ok: Arc<AtomicU64>,
    latencies: Arc<Mutex<Vec<Duration>>>,
    streams: Arc<Mutex<Streams>>,
    outcomes: Arc<Mutex<Vec<Outcome>>>,
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
            let mut body = workload
                .endpoint
                .body(&workload.model, index, workload.max_tokens);
            if workload.stream {
                body["stream"] = true.into();
            }
            let mut request = json_request(&workload.url, &workload.key, body.to_string());
            let priority = priority_of(index, workload.interactive_share);
            let tenant = workload.tenant.as_ref().map(|(_, tenant)| tenant);
            mark(&mut request, tenant, priority);
            let sent = Instant::now();
            let mut success = false;
            if let Ok(response) = workload.service.clone().oneshot(request).await {
                success = response.status().is_success();
                let stream = workload.stream && success;
                let read = read_answer(response.into_body(), sent, stream).await;
                if success {
                    self.ok.fetch_add(1, Ordering::Relaxed);
                }
                if let Some(first_token) = read.first_token {
                    let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
                    streams.first_tokens.push(first_token);
                    streams.completion_tokens += read.completion_tokens;
                }
            }
            self.latencies
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(sent.elapsed());
            self.outcomes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Outcome {
                    done: workload.started.elapsed(),
                    latency: sent.elapsed(),
                    ok: success,
                    tenant: workload.tenant.as_ref().map_or(0, |(index, _)| *index),
                    priority,
                });
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
    let ideal = server.and_then(|server| server.limits.ideal_seconds(args.requests));
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
        server_share: server.map(|server| match ideal {
            Some(ideal) => ideal / seconds,
            None => ok as f64 / (1.0 + server.limits.allowed_between(server.offset, end(server))),
        }),
        ideal_s: ideal,
        rate_changes: limits.map(RateChangeCounts::of),
        first_token_p50_ms: args
            .stream
            .then(|| percentile(&driven.streams.first_tokens, 50.0)),
        first_token_p99_ms: args
            .stream
            .then(|| percentile(&driven.streams.first_tokens, 99.0)),
        completion_tokens_per_second: args
            .stream
            .then(|| driven.streams.completion_tokens as f64 / seconds),
        quota_tpm: args.tpm,
        server_tokens: server.map(|server| server.tokens),
        server_token_share: server.and_then(|server| {
            let allowed = server.limits.tokens_allowed(driven.elapsed)?;
            Some(server.tokens as f64 / allowed)
        }),
        tenants: (args.tenants.as_ref())
            .map(|tenants| tenant_reports(&tenants.0, &driven.outcomes)),
        priorities: args
            .interactive_share
            .map(|_| priority_reports(&driven.outcomes)),
    }
}

/// The request rate in force of the run's one bucket, per second.
fn rate_in_force(limits: &Snapshots) -> Option<f64> {
    limits()
        .into_iter()
        .filter_map(|bucket| bucket.requests_per_second)
        .reduce(f64::min)
}

/// The rate in force over a run, and when and why it changed.
#[derive(Debug, Default)]
struct Samples {
    rates: Vec<(Duration, f64)>,
    changes: Vec<(Duration, &'static str)>,
}

/// Samples the rate in force and its changes into `samples` every [`SAMPLE_EVERY`], until
/// aborted.
async fn sample_rates(limits: Snapshots, started: Instant, samples: Arc<Mutex<Samples>>) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    let mut counted = RateChangeCounts::default();
    loop {
        every.tick().await;
        let at = started.elapsed();
        let changes = RateChangeCounts::of(&limits);
        let mut samples = samples.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(rate) = rate_in_force(&limits) {
            samples.rates.push((at, rate));
        }
        samples
            .changes
            .extend(changes.grown_since(counted).map(|reason| (at, reason)));
        counted = changes;
    }
}

/// The latency below which `percent` of requests finished, in milliseconds.
pub(crate) fn percentile(sorted: &[Duration], percent: f64) -> f64 {
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
    ) + &extra_lines(report)
}

/// The lines only some runs have: 503s, the server's share, the rate changes.
fn extra_lines(report: &BenchReport) -> String {
    let mut lines = String::new();
    if report.refused_503 > 0 {
        lines += &format!("{:<14} {:>10}\n", "server 503s", report.refused_503);
    }
    if let Some(share) = report.server_share {
        lines += &format!("{:<14} {:>9.1}%\n", "server share", share * 100.0);
    }
    if let (Some(p50), Some(p99)) = (report.first_token_p50_ms, report.first_token_p99_ms) {
        lines += &format!("{:<14} {:>10.1}\n", "1st token p50", p50);
        lines += &format!("{:<14} {:>10.1}\n", "1st token p99", p99);
    }
    if let Some(tokens) = report.completion_tokens_per_second {
        lines += &format!("{:<14} {:>10.1}\n", "tokens/s", tokens);
    }
    if let Some(share) = report.server_token_share {
        lines += &format!("{:<14} {:>9.1}%\n", "server tokens", share * 100.0);
    }
    if let Some(ideal) = report.ideal_s {
        lines += &format!("{:<14} {:>10.1}\n", "ideal s", ideal);
    }
    for tenant in report.tenants.iter().flatten() {
        let label = format!("tenant {} x{}", tenant.name, tenant.weight);
        lines += &format!(
            "{label:<14} {:>9.1}% of 2xx, {} ok, p50 {:.0} ms, p99 {:.0} ms\n",
            tenant.share * 100.0,
            tenant.ok,
            tenant.p50_ms,
            tenant.p99_ms
        );
    }
    for priority in report.priorities.iter().flatten() {
        lines += &format!(
            "{:<14} {:>10} ok, p50 {:.0} ms, p99 {:.0} ms\n",
            priority.name, priority.ok, priority.p50_ms, priority.p99_ms
        );
    }
    if let Some(changes) = report.rate_changes {
        lines += &format!(
            "{:<14} {:>10}\n",
            "rate changes",
            format!(
                "{} stated, {} on 429s, {} on 503s, {} undone",
                changes.stated, changes.refused_429, changes.unavailable_503, changes.noise_503
            )
        );
    }
    lines
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
