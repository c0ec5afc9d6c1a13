//! The simulator's settings: from code, a TOML file, or command-line flags.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::earned::Earned;
use crate::meter::Algorithm;

/// The kinds of endpoint the simulator tells apart, and limits and counts by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
    /// `POST /v1/images/generations`.
    Images,
    /// `POST /v1/rerank`.
    Rerank,
    /// `/v1/audio/...` (answered 404: not simulated).
    Audio,
    /// `/v1/fine-tunes...`.
    FineTunes,
    /// `/v1/batches...`.
    Batches,
    /// `/v1/files...`.
    Files,
    /// `GET /v1/models`.
    Models,
    /// Anything else.
    Other,
}

impl Class {
    /// Every class.
    pub const ALL: [Class; 11] = [
        Class::Chat,
        Class::Completions,
        Class::Embeddings,
        Class::Images,
        Class::Rerank,
        Class::Audio,
        Class::FineTunes,
        Class::Batches,
        Class::Files,
        Class::Models,
        Class::Other,
    ];

    /// The class's name in configuration and stats, such as `"fine-tunes"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Class::Chat => "chat",
            Class::Completions => "completions",
            Class::Embeddings => "embeddings",
            Class::Images => "images",
            Class::Rerank => "rerank",
            Class::Audio => "audio",
            Class::FineTunes => "fine-tunes",
            Class::Batches => "batches",
            Class::Files => "files",
            Class::Models => "models",
            Class::Other => "other",
        }
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Class {
    type Err = ConfigError;

    fn from_str(name: &str) -> Result<Self, ConfigError> {
        Class::ALL
            .into_iter()
            .find(|class| class.as_str() == name)
            .ok_or_else(|| ConfigError(format!("unknown class {name:?}; expected one of chat, completions, embeddings, images, rerank, audio, fine-tunes, batches, files, models, other")))
    }
}

/// The limits of one class, per API key (and per model with `per_model`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassLimits {
    /// Requests a minute (enforced per window).
    pub rpm: u64,
    /// Tokens a minute (prompt plus completion), if limited.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// GCRA burst, in requests (tokens get the same share of their limit); default 1.
    #[serde(default = "one")]
    pub burst: u64,
    /// Limit each model separately.
    #[serde(default)]
    pub per_model: bool,
}

fn one() -> u64 {
    1
}

impl ClassLimits {
    /// `rpm` requests a minute, no token limit, burst 1.
    pub const fn rpm(rpm: u64) -> Self {
        Self {
            rpm,
            tpm: None,
            burst: 1,
            per_model: false,
        }
    }

    /// The same, with a token limit.
    pub const fn with_tpm(mut self, tpm: u64) -> Self {
        self.tpm = Some(tpm);
        self
    }

    /// Whether every amount is at least 1.
    pub const fn is_valid(&self) -> bool {
        self.rpm > 0 && self.burst > 0 && !matches!(self.tpm, Some(0))
    }
}

/// How paid jobs (fine-tunes, batches) behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSettings {
    /// Jobs one key may have running at once; one more is answered 409.
    pub concurrent: u32,
    /// How long a job runs before it completes, in milliseconds.
    pub duration_ms: u64,
}

/// Which hints the server puts on its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Hints {
    /// `x-ratelimit-*` and `x-tokenlimit-*` on every answer of a limited class, and
    /// `Retry-After` (whole seconds) on refusals.
    #[default]
    All,
    /// What Together documents: `x-ratelimit-*` and `x-tokenlimit-*`, no `Retry-After`.
    Together,
    /// `Retry-After` (whole seconds) on refusals and nothing else, as many gateways send.
    RetryAfter,
    /// Nothing: the client learns only from the statuses.
    None,
}

/// A change of limits at a given time of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitChange {
    /// When, in milliseconds after the simulator started.
    pub at_ms: u64,
    /// The limits of the classes named, from then on; other classes keep theirs.
    pub limits: BTreeMap<Class, ClassLimits>,
}

/// Injected failures and latency.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// The chance (0 to 1) that a request is answered 503.
    pub unavailable_rate: f64,
    /// 503 bursts: every `unavailable_every_ms`, answer everything 503 for `unavailable_for_ms`.
    pub unavailable_every_ms: u64,
    /// How long each 503 burst lasts, in milliseconds.
    pub unavailable_for_ms: u64,
    /// Latency added to every answer, in milliseconds.
    pub latency_ms: u64,
    /// Up to this much more latency, drawn at random, in milliseconds.
    pub latency_jitter_ms: u64,
    /// The chance (0 to 1) that a request is read whole and then the connection is closed
    /// without an answer: the client cannot tell whether it was acted on.
    pub hangup_rate: f64,
    /// The chance (0 to 1) that a streamed answer is cut halfway, its connection closed
    /// without the stream's end.
    pub stream_cut_rate: f64,
}

/// How streamed answers (`"stream": true`) are paced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamSettings {
    /// Events (a word each) sent a second.
    pub chunks_per_second: f64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            chunks_per_second: 100.0,
        }
    }
}

/// Everything the simulator can be told.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Where to listen; port 0 picks a free one.
    pub listen: SocketAddr,
    /// How limits are enforced.
    pub algorithm: Algorithm,
    /// The window per-minute limits are enforced over, in milliseconds (Together: one second).
    pub window_ms: u64,
    /// GCRA only: how early a request may arrive before its exact turn, in milliseconds
    /// (network jitter allowance).
    pub gcra_tolerance_ms: u64,
    /// Limits by class; classes not listed are not limited. A file's limits are added to the
    /// defaults (replacing those of the classes it names) unless it says `default_limits = false`.
    pub limits: BTreeMap<Class, ClassLimits>,
    /// In a file: keep the default limits of the classes the file does not name (default true).
    #[serde(skip_serializing)]
    pub default_limits: bool,
    /// The models the server knows; a request naming another is answered 404 `model_not_found`.
    pub models: Vec<String>,
    /// Known models that are overloaded: every request naming one is answered 503.
    pub overloaded_models: Vec<String>,
    /// Length of the simulated embedding vectors.
    pub embedding_dimensions: usize,
    /// Fine-tune jobs.
    pub fine_tunes: JobSettings,
    /// Batch jobs.
    pub batches: JobSettings,
    /// Injected failures and latency.
    pub faults: Faults,
    /// How streamed answers are paced.
    pub stream: StreamSettings,
    /// Seed of the random draws (faults, latency), so runs repeat.
    pub seed: u64,
    /// How long a client may take to send a request's headers, and then its body, in
    /// milliseconds; a slower one is cut off (a closed connection, or 408 for a body).
    pub read_timeout_ms: u64,
    /// The largest request head (start line and headers) read, in bytes; a larger one is
    /// answered 431. At least 8192.
    pub max_header_bytes: usize,
    /// Which hints answers carry.
    pub hints: Hints,
    /// The status of an answer over a limit: 429, or 503 as Together answers when it is out of
    /// capacity below a client's dynamic limit.
    pub over_limit_status: u16,
    /// Changes of limits at given times of the run, in any order.
    pub schedule: Vec<LimitChange>,
    /// Together's earned rate, on top of the limits: a key may send about twice its recent
    /// successful rate, between a base and a cap (`[earned]` in a file).
    pub earned: Option<Earned>,
}

impl Default for SimConfig {
    /// Together's published limits for one key (chat and completions 600 requests and 180,000
    /// tokens a minute, embeddings 300, images 60), GCRA per second, no faults.
    fn default() -> Self {
        let limits = BTreeMap::from([
            (Class::Chat, ClassLimits::rpm(600).with_tpm(180_000)),
            (Class::Completions, ClassLimits::rpm(600).with_tpm(180_000)),
            (Class::Embeddings, ClassLimits::rpm(300)),
            (Class::Images, ClassLimits::rpm(60)),
        ]);
        let models = [
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo",
            "mistralai/Mixtral-8x7B-Instruct-v0.1",
            "BAAI/bge-large-en-v1.5",
            "togethercomputer/m2-bert-80M-8k-retrieval",
            "black-forest-labs/FLUX.1-schnell",
            "Salesforce/Llama-Rank-V1",
        ];
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            algorithm: Algorithm::Gcra,
            window_ms: 1_000,
            gcra_tolerance_ms: 5,
            limits,
            default_limits: true,
            models: models.into_iter().map(str::to_owned).collect(),
            overloaded_models: Vec::new(),
            embedding_dimensions: 32,
            fine_tunes: JobSettings {
                concurrent: 3,
                duration_ms: 60_000,
            },
            batches: JobSettings {
                concurrent: 10,
                duration_ms: 30_000,
            },
            faults: Faults::default(),
            stream: StreamSettings::default(),
            seed: 0x5eed,
            read_timeout_ms: 10_000,
            max_header_bytes: 16 * 1024,
            hints: Hints::All,
            over_limit_status: 429,
            schedule: Vec::new(),
            earned: None,
        }
    }
}

/// The smallest bound on a request head hyper's HTTP/1 server accepts.
const MIN_HEADER_BYTES: usize = 8_192;

/// A configuration that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl SimConfig {
    /// Reads a configuration from TOML; missing settings keep their defaults.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let mut config: SimConfig = toml::from_str(text).map_err(|error| {
            ConfigError(format!(
                "invalid simulator config: {}",
                error.to_string().trim_end()
            ))
        })?;
        if config.default_limits {
            let named = std::mem::take(&mut config.limits);
            config.limits = SimConfig::default().limits;
            config.limits.extend(named);
        }
        config.validate()
    }

    /// Checks the settings make sense.
    pub fn validate(self) -> Result<Self, ConfigError> {
        let pace = self.stream.chunks_per_second;
        if !(pace.is_finite() && pace > 0.0) {
            return Err(ConfigError(
                "stream.chunks_per_second must be a number above 0".into(),
            ));
        }
        if self.window_ms == 0 {
            return Err(ConfigError("window_ms must be at least 1".into()));
        }
        for (class, limits) in &self.limits {
            if !limits.is_valid() {
                return Err(ConfigError(format!(
                    "limits of {class}: rpm, tpm and burst must be at least 1"
                )));
            }
        }
        for (name, rate) in [
            ("unavailable_rate", self.faults.unavailable_rate),
            ("hangup_rate", self.faults.hangup_rate),
            ("stream_cut_rate", self.faults.stream_cut_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(ConfigError(format!(
                    "faults.{name} must be between 0 and 1"
                )));
            }
        }
        if self.faults.unavailable_for_ms > 0 && self.faults.unavailable_every_ms == 0 {
            return Err(ConfigError(
                "faults.unavailable_for_ms needs faults.unavailable_every_ms".into(),
            ));
        }
        if !matches!(self.over_limit_status, 429 | 503) {
            return Err(ConfigError(format!(
                "over_limit_status must be 429 or 503, not {}",
                self.over_limit_status
            )));
        }
        for change in &self.schedule {
            if change.limits.values().any(|limits| !limits.is_valid()) {
                return Err(ConfigError(format!(
                    "the limits changed at {} ms: rpm, tpm and burst must be at least 1",
                    change.at_ms
                )));
            }
        }
        if self.read_timeout_ms == 0 {
            return Err(ConfigError("read_timeout_ms must be at least 1".into()));
        }
        if let Some(earned) = &self.earned {
            earned.validate().map_err(ConfigError)?;
        }
        if self.max_header_bytes < MIN_HEADER_BYTES {
            return Err(ConfigError(format!(
                "max_header_bytes must be at least {MIN_HEADER_BYTES}"
            )));
        }
        if self.fine_tunes.concurrent == 0 || self.batches.concurrent == 0 {
            return Err(ConfigError(
                "jobs' concurrent limits must be at least 1".into(),
            ));
        }
        Ok(self)
    }

    /// The window as a duration.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// The read timeout as a duration.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

/// `together-sim`: a simulated Together AI API on your machine.
///
/// Answers Together's endpoints with OpenAI-shaped JSON, enforces per-key limits with the
/// algorithm you choose, injects failures, and reports what it saw at `GET /sim/stats`.
/// Flags override the settings of `--config`.
#[derive(Debug, Clone, Default, clap::Parser)]
#[command(name = "together-sim", version)]
pub struct Args {
    /// A TOML file of settings (see the README of together-sim); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080 for the binary].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// How limits are enforced [default: gcra].
    #[arg(long, value_enum)]
    pub algorithm: Option<Algorithm>,
    /// The window per-minute limits are enforced over, in milliseconds [default: 1000].
    #[arg(long, value_name = "MS")]
    pub window_ms: Option<u64>,
    /// A class's limit, per key: CLASS=RPM or CLASS=RPM/TPM (such as chat=600/180000).
    /// Repeat for several classes. Classes: chat, completions, embeddings, images, rerank,
    /// audio, fine-tunes, batches, files, models, other.
    #[arg(long = "limit", value_name = "CLASS=RPM[/TPM]")]
    pub limits: Vec<String>,
    /// Removes every default limit first (then only --limit and the file's limits apply).
    #[arg(long)]
    pub no_default_limits: bool,
    /// GCRA only: how early a request may arrive before its exact turn, in milliseconds
    /// [default: 5].
    #[arg(long, value_name = "MS")]
    pub gcra_tolerance_ms: Option<u64>,
    /// GCRA burst, in requests, for every limited class [default: 1].
    #[arg(long, value_name = "N")]
    pub burst: Option<u64>,
    /// Limit each model separately, for every limited class.
    #[arg(long)]
    pub per_model: bool,
    /// The models the server knows, comma-separated (replaces the default list).
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub models: Option<Vec<String>>,
    /// Models answered 503 whenever they are named, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "ID,...")]
    pub overloaded_models: Option<Vec<String>>,
    /// Fine-tune jobs one key may run at once [default: 3].
    #[arg(long, value_name = "N")]
    pub fine_tune_concurrency: Option<u32>,
    /// How long a fine-tune job runs, in milliseconds [default: 60000].
    #[arg(long, value_name = "MS")]
    pub fine_tune_duration_ms: Option<u64>,
    /// Batch jobs one key may run at once [default: 10].
    #[arg(long, value_name = "N")]
    pub batch_concurrency: Option<u32>,
    /// How long a batch runs, in milliseconds [default: 30000].
    #[arg(long, value_name = "MS")]
    pub batch_duration_ms: Option<u64>,
    /// The chance (0 to 1) that a request is answered 503 [default: 0].
    #[arg(long, value_name = "P")]
    pub unavailable_rate: Option<f64>,
    /// The chance (0 to 1) that a request is read and the connection closed without an
    /// answer [default: 0].
    #[arg(long, value_name = "P")]
    pub hangup_rate: Option<f64>,
    /// The chance (0 to 1) that a streamed answer is cut halfway [default: 0].
    #[arg(long, value_name = "P")]
    pub stream_cut_rate: Option<f64>,
    /// Events of a streamed answer (a word each) sent a second [default: 100].
    #[arg(long, value_name = "N")]
    pub stream_chunks_per_second: Option<f64>,
    /// 503 bursts: one every this many milliseconds [default: none].
    #[arg(long, value_name = "MS")]
    pub unavailable_every_ms: Option<u64>,
    /// How long each 503 burst lasts, in milliseconds.
    #[arg(long, value_name = "MS")]
    pub unavailable_for_ms: Option<u64>,
    /// Latency added to every answer, in milliseconds [default: 0].
    #[arg(long, value_name = "MS")]
    pub latency_ms: Option<u64>,
    /// Up to this much more latency, at random, in milliseconds [default: 0].
    #[arg(long, value_name = "MS")]
    pub latency_jitter_ms: Option<u64>,
    /// Length of embedding vectors [default: 32].
    #[arg(long, value_name = "N")]
    pub embedding_dimensions: Option<usize>,
    /// Seed of the random draws, so runs repeat.
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// How long a client may take to send its headers, and then its body, in milliseconds
    /// [default: 10000].
    #[arg(long, value_name = "MS")]
    pub read_timeout_ms: Option<u64>,
    /// The largest request head read, in bytes; larger ones get 431 [default: 16384].
    #[arg(long, value_name = "BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Which hints answers carry [default: all].
    #[arg(long, value_enum)]
    pub hints: Option<Hints>,
    /// The status of an answer over a limit: 429, or 503 ("slow down") [default: 429].
    #[arg(long, value_name = "STATUS")]
    pub over_limit_status: Option<u16>,
    /// A change of a class's limit at a time of the run: AT_MS:CLASS=RPM[/TPM], such as
    /// 5000:chat=3000. Repeat for several.
    #[arg(long = "change", value_name = "AT_MS:CLASS=RPM[/TPM]")]
    pub changes: Vec<String>,
    /// Together's earned rate: keys start at this many requests a minute and earn twice
    /// their successful rate of the last ten seconds, up to --earned-cap-rpm.
    #[arg(long, value_name = "RPM")]
    pub earned_base_rpm: Option<u64>,
    /// The most a key earns, requests a minute [default: 20 times the base].
    #[arg(long, value_name = "RPM", requires = "earned_base_rpm")]
    pub earned_cap_rpm: Option<u64>,
}

impl Args {
    /// The configuration these flags describe, over the file's (if any) over the defaults.
    pub fn into_config(self) -> Result<SimConfig, ConfigError> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    ConfigError(format!("cannot read {}: {error}", path.display()))
                })?;
                SimConfig::from_toml(&text)?
            }
            None => SimConfig::default(),
        };
        if self.no_default_limits {
            config.limits.clear();
        }
        for spec in &self.limits {
            let (class, limits) = parse_limit(spec)?;
            config.limits.insert(class, limits);
        }
        for limits in config.limits.values_mut() {
            if let Some(burst) = self.burst {
                limits.burst = burst;
            }
            limits.per_model |= self.per_model;
        }
        let set = |target: &mut u64, value: Option<u64>| *target = value.unwrap_or(*target);
        set(&mut config.window_ms, self.window_ms);
        set(&mut config.gcra_tolerance_ms, self.gcra_tolerance_ms);
        set(
            &mut config.fine_tunes.duration_ms,
            self.fine_tune_duration_ms,
        );
        set(&mut config.batches.duration_ms, self.batch_duration_ms);
        set(
            &mut config.faults.unavailable_every_ms,
            self.unavailable_every_ms,
        );
        set(
            &mut config.faults.unavailable_for_ms,
            self.unavailable_for_ms,
        );
        set(&mut config.faults.latency_ms, self.latency_ms);
        set(&mut config.faults.latency_jitter_ms, self.latency_jitter_ms);
        set(&mut config.seed, self.seed);
        set(&mut config.read_timeout_ms, self.read_timeout_ms);
        config.hints = self.hints.unwrap_or(config.hints);
        config.over_limit_status = self.over_limit_status.unwrap_or(config.over_limit_status);
        for spec in &self.changes {
            config.schedule.push(parse_change(spec)?);
        }
        config.max_header_bytes = self.max_header_bytes.unwrap_or(config.max_header_bytes);
        config.listen = self.listen.unwrap_or(config.listen);
        config.algorithm = self.algorithm.unwrap_or(config.algorithm);
        config.models = self.models.unwrap_or(config.models);
        config.overloaded_models = self.overloaded_models.unwrap_or(config.overloaded_models);
        config.fine_tunes.concurrent = self
            .fine_tune_concurrency
            .unwrap_or(config.fine_tunes.concurrent);
        config.batches.concurrent = self.batch_concurrency.unwrap_or(config.batches.concurrent);
        config.faults.unavailable_rate = self
            .unavailable_rate
            .unwrap_or(config.faults.unavailable_rate);
        config.faults.hangup_rate = self.hangup_rate.unwrap_or(config.faults.hangup_rate);
        config.faults.stream_cut_rate = self
            .stream_cut_rate
            .unwrap_or(config.faults.stream_cut_rate);
        config.stream.chunks_per_second = self
            .stream_chunks_per_second
            .unwrap_or(config.stream.chunks_per_second);
        config.embedding_dimensions = self
            .embedding_dimensions
            .unwrap_or(config.embedding_dimensions);
        if let Some(base) = self.earned_base_rpm {
            let cap = self.earned_cap_rpm.unwrap_or(base.saturating_mul(20));
            config.earned = Some(Earned::new(base, cap));
        }
        config.validate()
    }
}

/// `AT_MS:CLASS=RPM[/TPM]`.
fn parse_change(spec: &str) -> Result<LimitChange, ConfigError> {
    let invalid = || {
        ConfigError(format!(
            "--change {spec:?}: expected AT_MS:CLASS=RPM[/TPM], such as 5000:chat=3000"
        ))
    };
    let (at_ms, limit) = spec.split_once(':').ok_or_else(invalid)?;
    let at_ms = at_ms.trim().parse().map_err(|_| invalid())?;
    let (class, limits) = parse_limit(limit)?;
    Ok(LimitChange {
        at_ms,
        limits: BTreeMap::from([(class, limits)]),
    })
}

/// `CLASS=RPM` or `CLASS=RPM/TPM`.
fn parse_limit(spec: &str) -> Result<(Class, ClassLimits), ConfigError> {
    let invalid = || {
        ConfigError(format!(
            "--limit {spec:?}: expected CLASS=RPM or CLASS=RPM/TPM, such as chat=600/180000"
        ))
    };
    let (class, amounts) = spec.split_once('=').ok_or_else(invalid)?;
    let class: Class = class.trim().parse()?;
    let (rpm, tpm) = match amounts.split_once('/') {
        Some((rpm, tpm)) => (rpm, Some(tpm)),
        None => (amounts, None),
    };
    let rpm = rpm.trim().parse().map_err(|_| invalid())?;
    let tpm = tpm
        .map(|tpm| tpm.trim().parse())
        .transpose()
        .map_err(|_| invalid())?;
    Ok((
        class,
        ClassLimits {
            tpm,
            ..ClassLimits::rpm(rpm)
        },
    ))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn args(flags: &[&str]) -> Args {
        Args::try_parse_from(std::iter::once("together-sim").chain(flags.iter().copied())).unwrap()
    }

    #[test]
    fn flags_override_the_defaults() {
        let config = args(&[
            "--algorithm",
            "sliding-window",
            "--limit",
            "chat=60/6000",
            "--limit",
            "rerank=30",
            "--burst",
            "2",
            "--unavailable-rate",
            "0.1",
            "--models",
            "a,b",
        ])
        .into_config()
        .unwrap();
        assert_eq!(config.algorithm, Algorithm::SlidingWindow);
        assert_eq!(
            config.limits[&Class::Chat],
            ClassLimits {
                rpm: 60,
                tpm: Some(6_000),
                burst: 2,
                per_model: false
            }
        );
        assert_eq!(config.limits[&Class::Rerank].rpm, 30);
        assert_eq!(config.limits[&Class::Embeddings].burst, 2);
        assert_eq!(config.faults.unavailable_rate, 0.1);
        assert_eq!(config.models, ["a", "b"]);
    }

    #[test]
    fn a_file_sets_what_it_names_and_keeps_the_rest() {
        let config = SimConfig::from_toml(
            r#"
            algorithm = "fixed-window"
            window_ms = 500
            [limits.embeddings]
            rpm = 120
            tpm = 50000
            per_model = true
            [faults]
            latency_ms = 20
            "#,
        )
        .unwrap();
        assert_eq!(config.algorithm, Algorithm::FixedWindow);
        assert_eq!(config.window(), Duration::from_millis(500));
        assert_eq!(
            config.limits[&Class::Embeddings],
            ClassLimits {
                rpm: 120,
                tpm: Some(50_000),
                burst: 1,
                per_model: true
            }
        );
        assert_eq!(config.limits[&Class::Chat].rpm, 600);
        assert_eq!(config.faults.latency_ms, 20);

        let only =
            SimConfig::from_toml("default_limits = false\n[limits.rerank]\nrpm = 6").unwrap();
        assert_eq!(
            only.limits.keys().copied().collect::<Vec<_>>(),
            [Class::Rerank]
        );
    }

    #[test]
    fn bad_settings_are_errors_that_say_what_is_wrong() {
        let error = |flags: &[&str]| args(flags).into_config().unwrap_err().0;
        assert!(error(&["--limit", "chats=5"]).contains("unknown class \"chats\""));
        assert!(error(&["--limit", "chat=lots"]).contains("expected CLASS=RPM"));
        assert!(error(&["--limit", "chat=0"]).contains("at least 1"));
        assert!(error(&["--unavailable-rate", "1.5"]).contains("between 0 and 1"));
        assert!(error(&["--window-ms", "0"]).contains("window_ms"));
        assert!(error(&["--unavailable-for-ms", "100"]).contains("unavailable_every_ms"));
        let file = SimConfig::from_toml("[limits.chat]\nrpm = 5\nrpn = 3")
            .unwrap_err()
            .0;
        assert!(file.contains("invalid simulator config"), "{file}");
        assert!(SimConfig::from_toml("algorithm = \"leaky\"").is_err());
    }

    #[test]
    fn help_documents_every_flag() {
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for flag in [
            "--config",
            "--listen",
            "--algorithm",
            "--window-ms",
            "--gcra-tolerance-ms",
            "--limit",
            "--no-default-limits",
            "--burst",
            "--per-model",
            "--models",
            "--fine-tune-concurrency",
            "--fine-tune-duration-ms",
            "--batch-concurrency",
            "--batch-duration-ms",
            "--unavailable-rate",
            "--hangup-rate",
            "--unavailable-every-ms",
            "--unavailable-for-ms",
            "--latency-ms",
            "--latency-jitter-ms",
            "--embedding-dimensions",
            "--seed",
            "--read-timeout-ms",
            "--max-header-bytes",
            "--hints",
            "--over-limit-status",
            "--change",
        ] {
            assert!(help.contains(flag), "{flag} is not in --help");
        }
    }
}
