//! `together-tower proxy`: an OpenAI-compatible HTTP proxy that puts the whole stack in front
//! of programs not written in Rust.
//!
//! It forwards `/v1/*` to the base URL through the library's stack, built as any user builds
//! it; every other path but its own `/metrics`, `/healthz` and `/readyz` answers 404.
//!
//! # Layout
//! - [`config`]: the configuration file (quota table, tenants), checked at start.
//! - [`access`]: pass-through or managed keys; tenants by key.
//! - [`stack`]: the library's stack around hyper-util's client.
//! - [`forward`]: one `/v1/*` request, upstream and back.
//! - [`answers`]: the proxy's own answers, in Together's error shape.
//! - [`ops`]: metrics, health, readiness, the log line of each request.
//! - [`serve`]: connections, timeouts and the graceful shutdown.
//!
//! Imports go one way: `forward` uses `access`, `answers`, `ops` and `stack`; this file
//! uses them all; none of them uses `forward` or this file.

pub mod access;
pub mod answers;
pub mod config;
pub mod forward;
pub mod ops;
pub mod serve;
pub mod stack;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{any, get};
use together_sim::{Algorithm, Class};
use together_tower::classify::EndpointClass;
use together_tower::limit::Adaptation;
use together_tower::quota::QuotaTable;

use self::access::Access;
use self::config::ProxyConfig;
use self::forward::Forward;
use self::ops::Ops;
use self::serve::{Drained, ServeSettings};
use self::stack::StackSettings;
use crate::CliError;
use crate::target::{SimLimits, Target, TargetArgs};

/// Flags of `together-tower proxy`.
#[derive(Debug, Clone, clap::Args)]
pub struct ProxyArgs {
    /// Where to send, and with which key.
    #[command(flatten)]
    pub target: TargetArgs,
    /// Where to listen; port 0 picks a free one (the first line on stdout names it).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "ADDR")]
    pub listen: SocketAddr,
    /// A configuration file: a `[quota]` table and `[tenants.NAME]` with the keys clients
    /// present (see the README). With --api-key, its tenants' keys are the only ones
    /// accepted.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A quota table in TOML, as the library reads it [default: the configuration's
    /// `[quota]`, else Together's published defaults].
    #[arg(long, value_name = "FILE")]
    pub quota: Option<PathBuf>,
    /// Chat and completions at R requests a minute, over the quota table's.
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    pub rpm: Option<u32>,
    /// With --rpm: how many requests may go back to back.
    #[arg(long, default_value_t = 1, value_name = "B", requires = "rpm")]
    pub burst: u32,
    /// How the stack paces.
    #[arg(long, value_enum, default_value = "adaptive")]
    pub mode: Pacing,
    /// The longest a request waits for its turn; past it, the client gets a 429 with
    /// `Retry-After` and `retry-after-ms` (e.g. 60s, 500ms, 2m).
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "TIME")]
    pub max_wait: Duration,
    /// The largest request body accepted, in bytes; a larger one gets a 413.
    #[arg(long, default_value_t = 4 << 20, value_name = "BYTES")]
    pub max_body: usize,
    /// The longest a client may take to send a request's head, on a new connection or a
    /// kept-alive one after its last answer (so also how long an idle connection stays).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "TIME")]
    pub header_timeout: Duration,
    /// The longest a request body may send nothing; the request then gets a 408.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "TIME")]
    pub idle_timeout: Duration,
    /// On SIGTERM or Ctrl-C, how long the requests in flight may take to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "TIME")]
    pub shutdown_grace: Duration,
    /// Logs as JSON lines rather than text.
    #[arg(long)]
    pub log_json: bool,
    /// With the embedded simulator: its chat limit, requests a minute [default: the
    /// proxy's chat rate].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    pub sim_rpm: Option<u32>,
}

/// How the proxy's stack paces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pacing {
    /// The table's rates only.
    Static,
    /// Rates that follow the server's stated limits, 429s and 503s above the noise.
    Adaptive,
}

/// `30s`, `500ms`, `2m`, `1h`, or a number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a time such as 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1_000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3_600.0,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{text:?} is out of range"))
}

/// Starts the proxy and serves until SIGTERM or Ctrl-C.
pub async fn run(args: &ProxyArgs) -> Result<(), CliError> {
    let config = match &args.config {
        Some(path) => {
            ProxyConfig::load(path).map_err(|error| CliError::Usage(error.to_string()))?
        }
        None => ProxyConfig::default(),
    };
    let access = access(args, &config)?;
    let table = table(args, &config)?;
    let chat_rpm = chat_rpm(&table);
    let sim_limits = SimLimits::new(
        Class::Chat,
        args.sim_rpm.unwrap_or(chat_rpm),
        Algorithm::Gcra,
    );
    let no_key = args.target.api_key.is_none();
    let base_url = args.target.base_url.as_deref();
    let target = match (base_url, no_key) {
        (None, false) => Target::resolve(Some(TOGETHER), sim_limits).await?,
        _ => Target::resolve(base_url, sim_limits).await?,
    };
    let redis = args.target.redis().await?;
    let settings = StackSettings {
        table,
        adaptation: match args.mode {
            Pacing::Static => Adaptation::fixed(),
            Pacing::Adaptive => Adaptation::adaptive(),
        },
        max_wait: args.max_wait,
        body_limit: args.max_body,
        tenants: config.tenants,
    };
    let ops = Ops::install(redis.clone())?;
    let forward = Arc::new(Forward {
        upstream: target.base_url.clone(),
        description: access.describe(),
        access,
        stack: stack::build(&settings, redis),
        body_limit: args.max_body,
        body_idle: args.idle_timeout,
    });
    serve_until_signal(args, &target, forward, ops).await
}

/// Together's API, where a proxy with a key of its own and no base URL sends.
const TOGETHER: &str = "https://api.together.xyz";

async fn serve_until_signal(
    args: &ProxyArgs,
    target: &Target,
    forward: Arc<Forward>,
    ops: Ops,
) -> Result<(), CliError> {
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|error| CliError::Setup(format!("--listen {}: {error}", args.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|error| CliError::Setup(format!("--listen {}: {error}", args.listen)))?;
    eprintln!(
        "together-tower proxy: forwarding http://{address}/v1/* to {}/v1 ({})",
        target.base_url, forward.description
    );
    // The first line on stdout, for scripts that asked for port 0.
    println!("listening on http://{address}");
    let app = router(forward, ops.clone());
    let settings = ServeSettings {
        header_timeout: args.header_timeout,
        shutdown_grace: args.shutdown_grace,
    };
    let shutdown = async {
        serve::signal().await;
        ops.start_draining();
    };
    match serve::serve(listener, app, settings, shutdown).await {
        Drained::All => {
            eprintln!("together-tower proxy: stopped; every request in flight was answered");
            Ok(())
        }
        Drained::Cut => Err(CliError::Failed(format!(
            "stopped after {:?}, the shutdown grace, with requests still in flight",
            args.shutdown_grace
        ))),
    }
}

/// The routes: `/v1/*` forwarded, the operations routes, and 404 for the rest.
fn router(forward: Arc<Forward>, ops: Ops) -> Router {
    let operations = Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/readyz", get(ops::readyz))
        .with_state(ops);
    Router::new()
        .route("/v1/{*path}", any(forward::forward))
        .with_state(forward)
        .route("/healthz", get(ops::healthz))
        .merge(operations)
        .fallback(|uri: http::Uri| async move { answers::not_found(uri.path()) })
}

/// Managed keys with a key of the proxy's own and tenants; pass-through with neither.
fn access(args: &ProxyArgs, config: &ProxyConfig) -> Result<Access, CliError> {
    match (&args.target.api_key, config.tenants.is_empty()) {
        (None, true) => Ok(Access::PassThrough),
        (Some(key), false) => Access::managed(key, &config.tenants).map_err(CliError::Usage),
        (Some(_), true) => Err(CliError::Usage(
            "--api-key (or TOGETHER_API_KEY) without tenants would lend the key to anyone who \
             reaches the proxy: give --config with [tenants.NAME] keys, or unset the key to \
             pass each client's own key through"
                .into(),
        )),
        (None, false) => Err(CliError::Usage(
            "the configuration gives tenants keys, but the proxy has no key of its own to call \
             with: give --api-key or TOGETHER_API_KEY"
                .into(),
        )),
    }
}

/// The quota table: `--quota`, else the configuration's, else Together's defaults; with
/// `--rpm` over it.
fn table(args: &ProxyArgs, config: &ProxyConfig) -> Result<QuotaTable, CliError> {
    let table = match (&args.quota, &config.quota) {
        (Some(path), _) => config::load_quota_file(path)
            .map_err(|error| CliError::Usage(format!("--quota: {error}")))?,
        (None, Some(table)) => table.clone(),
        (None, None) => QuotaTable::together_defaults(),
    };
    match args.rpm {
        Some(rpm) => stack::with_chat_rate(&table, rpm, args.burst),
        None => Ok(table),
    }
}

/// The table's chat rate, in requests a minute (600 if chat is unlimited).
fn chat_rpm(table: &QuotaTable) -> u32 {
    table
        .group_of(EndpointClass::Chat)
        .and_then(|group| group.rate())
        .map_or(600, |rate| {
            let per_minute = rate.per_second_f64() * 60.0;
            per_minute.round().clamp(1.0, f64::from(u32::MAX)) as u32
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 days").is_err());
        assert!(parse_duration("1e400").is_err());
    }
}
