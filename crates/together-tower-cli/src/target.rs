//! Where requests go: a given base URL, or the embedded simulator.

use std::fmt;
use std::time::Duration;

use together_sim::earned::Earned;
use together_sim::{
    Algorithm, Class, ClassLimits, Faults, Hints, LimitChange, Sim, SimConfig, SimHandle,
};

use crate::CliError;

/// The flags every command shares: where to send, and with which key.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TargetArgs {
    /// Base URL of the API [default: env TOGETHER_BASE_URL; without either, an embedded
    /// simulator is started on a loopback port].
    #[arg(long, env = "TOGETHER_BASE_URL", value_name = "URL")]
    pub base_url: Option<String>,
    /// API key [default: env TOGETHER_API_KEY; the simulator accepts any].
    #[arg(
        long,
        env = "TOGETHER_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Option<ApiKey>,
    /// Keep the client's quota in this Redis (`redis://host:port/db`), so every process given
    /// the same URL shares it [default: env TOGETHER_REDIS_URL; without either, in this
    /// process].
    #[arg(long, env = "TOGETHER_REDIS_URL", value_name = "URL")]
    pub redis_url: Option<String>,
    /// With --redis-url: how many processes share the quota; while Redis does not answer,
    /// each decides alone at its share.
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub redis_replicas: u32,
    /// With --redis-url: the URL is a node of a Redis Cluster; the other nodes are found from
    /// it [default: env TOGETHER_REDIS_CLUSTER=1].
    #[arg(long, env = "TOGETHER_REDIS_CLUSTER")]
    pub redis_cluster: bool,
}

impl TargetArgs {
    /// The Redis backend, connected, if `--redis-url` was given.
    pub async fn redis(&self) -> Result<Option<together_tower_redis::RedisBackend>, CliError> {
        let Some(url) = &self.redis_url else {
            return Ok(None);
        };
        let settings = together_tower_redis::RedisSettings {
            unreachable: together_tower_redis::Unreachable::FallBack {
                replicas: self.redis_replicas,
            },
            ..together_tower_redis::RedisSettings::default()
        };
        let connected = if self.redis_cluster {
            together_tower_redis::RedisBackend::connect_cluster([url], settings).await
        } else {
            together_tower_redis::RedisBackend::connect(url, settings).await
        };
        connected.map(Some).map_err(|error| {
            let message = format!("--redis-url: {error}");
            if error.is_misconfigured() {
                CliError::Usage(message)
            } else {
                CliError::Unreachable(message)
            }
        })
    }

    /// The key given, or `fallback` (the simulator accepts any key).
    pub fn key_or(&self, fallback: &str) -> ApiKey {
        self.api_key
            .clone()
            .unwrap_or_else(|| ApiKey(fallback.to_owned()))
    }
}

/// A JSON POST to `url` with the key as a bearer token.
pub fn json_request(
    url: &str,
    key: &ApiKey,
    body: impl Into<bytes::Bytes>,
) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    http::Request::post(url)
        .header("authorization", format!("Bearer {}", key.expose()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(body.into()))
        .expect("a URL that parsed and fixed headers make a valid request")
}

/// An API key that never prints: `Debug` and `Display` show `<hidden>`.
#[derive(Clone, Default)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key, for the `Authorization` header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(key: &str) -> Result<Self, Self::Err> {
        Ok(Self(key.to_owned()))
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<hidden>")
    }
}

/// The server a command talks to. Holding it keeps an embedded simulator running.
#[derive(Debug)]
pub struct Target {
    /// The base URL, up to but without `/v1`.
    pub base_url: String,
    /// The simulator, when one was started for this run.
    pub sim: Option<SimHandle>,
}

/// What an embedded simulator should enforce.
#[derive(Debug, Clone)]
pub struct SimLimits {
    /// The class it limits.
    pub class: Class,
    /// Its requests a minute.
    pub rpm: u32,
    /// How it enforces them.
    pub algorithm: Algorithm,
    /// Which hints its answers carry.
    pub hints: Hints,
    /// Its answer over the limit: 429, or 503.
    pub over_limit_status: u16,
    /// Changes of its limit: (milliseconds after it starts, requests a minute).
    pub changes: Vec<(u64, u32)>,
    /// The share of requests answered 503 at random, whatever the rate.
    pub unavailable_share: f64,
    /// Together's earned rate: keys start at this many requests a minute and earn up to
    /// `rpm`.
    pub earned_base_rpm: Option<u32>,
    /// Its tokens a minute, if it limits tokens.
    pub tpm: Option<u32>,
}

impl SimLimits {
    /// Limits of `rpm` for `class`, enforced by `algorithm`, with every hint and 429s.
    pub fn new(class: Class, rpm: u32, algorithm: Algorithm) -> Self {
        Self {
            class,
            rpm,
            algorithm,
            hints: Hints::All,
            over_limit_status: 429,
            changes: Vec::new(),
            unavailable_share: 0.0,
            earned_base_rpm: None,
            tpm: None,
        }
    }

    /// How long a client that always sent exactly what the earned rate allowed would take to
    /// have `requests` served; `None` without an earned rate. Worked out in steps of a
    /// millisecond, by the simulator's rule: twice the successes of the last ten seconds,
    /// between the base and the cap.
    pub fn ideal_seconds(&self, requests: u64) -> Option<f64> {
        let rule = Earned::new(u64::from(self.earned_base_rpm?), u64::from(self.rpm));
        let base = rule.base_rpm as f64 / 60.0;
        let cap = (rule.cap_rpm as f64 / 60.0).max(base);
        let (window, factor) = (rule.window_ms as usize, rule.factor);
        let step = 0.001;
        let mut served_per_step = std::collections::VecDeque::from(vec![0.0; window]);
        let (mut in_window, mut served, mut steps) = (0.0, 0.0, 0u64);
        while served < requests as f64 && steps < 3_600_000 {
            let rate = (factor * in_window / (window as f64 * step)).clamp(base, cap);
            let now = rate * step;
            served += now;
            in_window += now - served_per_step.pop_front().unwrap_or(0.0);
            served_per_step.push_back(now);
            steps += 1;
        }
        Some(steps as f64 * step)
    }

    /// The class's limits at `rpm` requests a minute, with the token limit if there is one.
    fn class_limits(&self, rpm: u32) -> ClassLimits {
        let limits = ClassLimits::rpm(u64::from(rpm));
        match self.tpm {
            Some(tpm) => limits.with_tpm(u64::from(tpm)),
            None => limits,
        }
    }

    /// How many tokens the simulator allows in a run `elapsed` long: a second's worth at
    /// once (its token meter's burst), then its rate; `None` without a token limit.
    pub fn tokens_allowed(&self, elapsed: Duration) -> Option<f64> {
        let per_second = f64::from(self.tpm?) / 60.0;
        Some(per_second * (1.0 + elapsed.as_secs_f64()))
    }

    /// The limit in force at `at` after the simulator started, requests a minute.
    pub fn rpm_at(&self, at: Duration) -> u32 {
        let mut changes = self.changes.clone();
        changes.sort_unstable();
        changes
            .iter()
            .take_while(|(at_ms, _)| Duration::from_millis(*at_ms) <= at)
            .last()
            .map_or(self.rpm, |(_, rpm)| *rpm)
    }

    /// How many requests the simulator allows from `from` to `to` after it started.
    pub fn allowed_between(&self, from: Duration, to: Duration) -> f64 {
        let mut edges: Vec<Duration> = self
            .changes
            .iter()
            .map(|(at_ms, _)| Duration::from_millis(*at_ms))
            .filter(|at| *at > from && *at < to)
            .collect();
        edges.sort_unstable();
        edges.push(to);
        let mut start = from;
        let mut allowed = 0.0;
        for end in edges {
            allowed += f64::from(self.rpm_at(start)) / 60.0 * (end - start).as_secs_f64();
            start = end;
        }
        allowed
    }
}

impl Target {
    /// The given base URL if it answers, else a simulator started on a loopback port.
    pub async fn resolve(base_url: Option<&str>, limits: SimLimits) -> Result<Self, CliError> {
        match base_url {
            Some(url) => {
                check_reachable(url).await?;
                Ok(Self {
                    base_url: url.trim_end_matches('/').trim_end_matches("/v1").to_owned(),
                    sim: None,
                })
            }
            None => {
                let schedule = limits
                    .changes
                    .iter()
                    .map(|&(at_ms, rpm)| LimitChange {
                        at_ms,
                        limits: [(limits.class, limits.class_limits(rpm))].into(),
                    })
                    .collect();
                let config = SimConfig {
                    algorithm: limits.algorithm,
                    limits: [(limits.class, limits.class_limits(limits.rpm))].into(),
                    hints: limits.hints,
                    over_limit_status: limits.over_limit_status,
                    schedule,
                    faults: Faults {
                        unavailable_rate: limits.unavailable_share,
                        ..Faults::default()
                    },
                    earned: limits
                        .earned_base_rpm
                        .map(|base| Earned::new(u64::from(base), u64::from(limits.rpm.max(base)))),
                    ..SimConfig::default()
                };
                let sim = Sim::start(config).await.map_err(|error| {
                    CliError::Setup(format!("cannot start the embedded simulator: {error}"))
                })?;
                eprintln!(
                    "no --base-url or TOGETHER_BASE_URL: started the embedded simulator at {} ({} {} requests/min, {})",
                    sim.url(),
                    limits.class,
                    limits.rpm,
                    crate::flag_word(&limits.algorithm)
                );
                Ok(Self {
                    base_url: sim.url(),
                    sim: Some(sim),
                })
            }
        }
    }
}

/// Fails fast, with one line, when nothing answers at the URL's host and port.
async fn check_reachable(url: &str) -> Result<(), CliError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| CliError::Usage(format!("--base-url {url:?} is not a URL")))?;
    let host = uri
        .host()
        .ok_or_else(|| CliError::Usage(format!("--base-url {url:?} has no host")))?;
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let connect = tokio::net::TcpStream::connect((host, port));
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(error)) => Err(CliError::Unreachable(format!(
            "cannot reach {url}: {error}"
        ))),
        Err(_) => Err(CliError::Unreachable(format!(
            "cannot reach {url}: no answer in 5 s"
        ))),
    }
}
