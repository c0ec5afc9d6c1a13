//! A Redis backend for together-tower's rate limiter: every process that uses the same Redis
//! and namespace shares one quota per (API key, quota group, model).
//!
//! Work in progress (issue 9). What is here: [`RedisLimiter`], a [`Limiter`] whose buckets'
//! GCRA state lives in Redis, decided by one Lua script per decision with Redis's own clock
//! (`TIME`), keys named by the key's fingerprint (never the key) under a `{hash tag}`, `PX`
//! expiry so idle buckets vanish, and a timeout on every call. Not yet: reservations (a
//! waiter polls again after the wait it was told), learned rates shared between processes,
//! the fallback to an in-process limiter when Redis is unreachable, the CLI flags, and the
//! multi-process benchmarks.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use together_tower::limit::{BucketSpec, Cost, Decision, Limiter, Pace, Rates};
use tower::BoxError;

/// GCRA over a request rate and a token rate at once: both go, or neither. Time is Redis's
/// own, in microseconds, so every process shares one clock.
///
/// KEYS: the requests' and the tokens' theoretical arrival times.
/// ARGV: for requests then tokens, the interval and tau in microseconds and the cost (a cost
/// of 0 skips that rate).
/// Returns `{allowed, wait_us_requests, wait_us_tokens}`.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function wait(key, interval, tau, cost)
  if cost <= 0 or interval <= 0 then return 0, nil end
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval * cost
  return new_tat - tau - interval - now, new_tat
end
local ri, rt, rc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ti, tt, tc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rw, rnew = wait(KEYS[1], ri, rt, rc)
local tw, tnew = wait(KEYS[2], ti, tt, tc)
if rw > 0 or tw > 0 then
  return {0, math.max(rw, 0), math.max(tw, 0)}
end
if rnew then redis.call('SET', KEYS[1], rnew, 'PX', math.floor((rnew - now) / 1000) + 1) end
if tnew then redis.call('SET', KEYS[2], tnew, 'PX', math.floor((tnew - now) / 1000) + 1) end
return {1, 0, 0}
";

/// How a [`RedisLimiter`] talks to Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Prefixes every key, so deployments can share a Redis.
    pub namespace: String,
    /// The longest one decision may take, connection included.
    pub call_timeout: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            namespace: "together-tower".into(),
            call_timeout: Duration::from_millis(250),
        }
    }
}

/// Why Redis could not decide.
#[derive(Debug)]
#[non_exhaustive]
pub enum RedisLimiterError {
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
    /// Redis did not answer within the call timeout.
    Timeout(Duration),
}

impl fmt::Display for RedisLimiterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RedisLimiterError::Redis(error) => write!(f, "redis: {error}"),
            RedisLimiterError::Timeout(after) => {
                write!(f, "redis did not answer within {after:?}")
            }
        }
    }
}

impl std::error::Error for RedisLimiterError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RedisLimiterError::Redis(error) => Some(error),
            RedisLimiterError::Timeout(_) => None,
        }
    }
}

/// A [`Limiter`] whose buckets live in Redis.
#[derive(Clone)]
pub struct RedisLimiter {
    connection: ConnectionManager,
    script: Arc<Script>,
    settings: Arc<RedisSettings>,
}

impl fmt::Debug for RedisLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisLimiter {
    /// Connects to the Redis at `url` (`redis://host:port/db`).
    pub async fn connect(url: &str, settings: RedisSettings) -> Result<Self, RedisLimiterError> {
        let client = redis::Client::open(url).map_err(RedisLimiterError::Redis)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.call_timeout))
            .set_response_timeout(Some(settings.call_timeout));
        let connection = tokio::time::timeout(
            settings.call_timeout,
            client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| RedisLimiterError::Timeout(settings.call_timeout))?
        .map_err(RedisLimiterError::Redis)?;
        Ok(Self {
            connection,
            script: Arc::new(Script::new(GCRA)),
            settings: Arc::new(settings),
        })
    }
}

/// A bucket's keys in Redis and the rates in force.
pub struct RedisBucket {
    requests_key: String,
    tokens_key: String,
    rates: Mutex<Rates>,
}

impl fmt::Debug for RedisBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBucket")
            .field("requests_key", &self.requests_key)
            .finish_non_exhaustive()
    }
}

impl RedisBucket {
    fn rates(&self) -> Rates {
        *self.rates.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The key names of a bucket: the namespace, then a `{hash tag}` of the key's fingerprint,
/// the group and the model, so both keys of a bucket live on one Redis Cluster slot.
fn key_names(namespace: &str, spec: &BucketSpec<'_>) -> (String, String) {
    let model = spec.model.map(model_tag).unwrap_or_default();
    let tag = format!("{{{}:{}{model}}}", spec.key, spec.group);
    (
        format!("{namespace}:{tag}:requests"),
        format!("{namespace}:{tag}:tokens"),
    )
}

/// A model name as a short, stable part of a key: FNV-1a, so every process agrees.
fn model_tag(model: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in model.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!(":{hash:016x}")
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

fn pace_args(pace: Option<Pace>, cost: u64) -> [u64; 3] {
    match pace {
        Some(pace) => [micros(pace.interval()).max(1), micros(pace.tau()), cost],
        None => [0, 0, 0],
    }
}

impl Limiter for RedisLimiter {
    type Bucket = RedisBucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> RedisBucket {
        let (requests_key, tokens_key) = key_names(&self.settings.namespace, &spec);
        RedisBucket {
            requests_key,
            tokens_key,
            rates: Mutex::new(spec.rates),
        }
    }

    fn try_acquire(&self, _: &RedisBucket, _: Cost, _: Duration) -> Option<Decision> {
        // Every decision is Redis's.
        None
    }

    async fn acquire(
        &self,
        bucket: &RedisBucket,
        cost: Cost,
        _: Duration,
    ) -> Result<Decision, BoxError> {
        let rates = bucket.rates();
        let [ri, rt, rc] = pace_args(rates.requests, cost.requests);
        let [ti, tt, tc] = pace_args(rates.tokens, cost.tokens);
        let mut invocation = self.script.key(&bucket.requests_key);
        invocation
            .key(&bucket.tokens_key)
            .arg(ri)
            .arg(rt)
            .arg(rc)
            .arg(ti)
            .arg(tt)
            .arg(tc);
        let mut connection = self.connection.clone();
        let timeout = self.settings.call_timeout;
        let answer: (u8, u64, u64) =
            tokio::time::timeout(timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| RedisLimiterError::Timeout(timeout))?
                .map_err(RedisLimiterError::Redis)?;
        Ok(match answer {
            (1, _, _) => Decision::Allow,
            (_, requests, tokens) if tokens > requests => Decision::WaitForTokens {
                request: Duration::from_micros(requests),
                tokens: Duration::from_micros(tokens),
            },
            (_, requests, _) => Decision::Wait(Duration::from_micros(requests.max(1))),
        })
    }

    fn release(&self, _: &RedisBucket, _: Cost, _: Duration) {
        // Not yet: a turn taken and not used stays spent (at most one interval per cancel).
    }

    fn correct_tokens(&self, _: &RedisBucket, _: u64, _: u64, _: Duration) {
        // Not yet: token charges keep their estimate.
    }

    fn set_rates(&self, bucket: &RedisBucket, rates: Rates, _: Duration) {
        *bucket.rates.lock().unwrap_or_else(PoisonError::into_inner) = rates;
    }

    fn until_rest(&self, _: &RedisBucket, _: Duration) -> Duration {
        // The state lives in Redis and expires there.
        Duration::ZERO
    }
}
