//! A Redis backend for together-tower's rate limiter: every process that uses the same Redis
//! and namespace shares one quota per (API key, quota group, model).
//!
//! Work in progress. What is here: [`RedisLimiter`], a [`Limiter`] whose buckets' GCRA state
//! lives in Redis, decided by one Lua script per decision with Redis's own clock (`TIME`), keys
//! named by the key's fingerprint (never the key) under a `{hash tag}`, `PX` expiry so idle
//! buckets vanish, a timeout on every call, turns and tokens given back, and a policy for when
//! Redis cannot be reached ([`Unreachable`]): decide in this process at a share of the quota,
//! or fail. redis-rs reloads the script when Redis answers `NOSCRIPT` (a restart, a failover,
//! `SCRIPT FLUSH`).
//!
//! Not yet: reservations (a waiter asks Redis again after the wait it was told, so a wait
//! costs a round trip more, and a turn taken and given back costs one more call), and learned
//! rates shared between processes (each process adapts on its own, from what it sees).
//!
//! Every process must fingerprint keys alike for their buckets to meet: the default
//! `KeyHasher` does; a deployment with a secret of its own gives every process the same one.
//!
//! ```no_run
//! use together_tower::Limits;
//! use together_tower::quota::QuotaTable;
//! use together_tower_redis::{RedisLimiter, RedisSettings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisLimiter::connect("redis://127.0.0.1:6379/", RedisSettings::default()).await?;
//! let limits = Limits::builder(QuotaTable::together_defaults()).limiter(redis).build();
//! # let _ = limits;
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use together_tower::limit::{BucketSpec, Cost, Decision, Limiter, LocalLimiter, Pace, Rates};
use tokio::time::Instant;
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

/// Gives back time a bucket's theoretical arrival time holds: a turn not used, or tokens not
/// spent (a negative amount charges more). A key that is gone has nothing to give back.
///
/// KEYS: the requests' and the tokens' theoretical arrival times.
/// ARGV: microseconds to give back to each (may be negative).
const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, 2 do
  local amount = tonumber(ARGV[i])
  if amount ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat or amount < 0 then
      local new = (tat or now) - amount
      if new <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], new, 'PX', math.floor((new - now) / 1000) + 1)
      end
    end
  end
end
return 1
";

/// What a [`RedisLimiter`] does when Redis does not answer within the call timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Decides in this process, at the quota divided by `replicas` (the processes that share
    /// the quota), until Redis answers again. The default, with one replica.
    FallBack {
        /// How many processes share the quota.
        replicas: u32,
    },
    /// Fails the request with [`RedisLimiterError`].
    Fail,
}

/// How a [`RedisLimiter`] talks to Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Prefixes every key, so deployments can share a Redis.
    pub namespace: String,
    /// The longest one decision may take, connection included.
    pub call_timeout: Duration,
    /// What to do when Redis does not answer.
    pub unreachable: Unreachable,
    /// After Redis failed to answer, how long to decide without it before asking it again.
    pub retry_after: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            namespace: "together-tower".into(),
            call_timeout: Duration::from_millis(250),
            unreachable: Unreachable::FallBack { replicas: 1 },
            retry_after: Duration::from_secs(1),
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
    give_back: Arc<Script>,
    settings: Arc<RedisSettings>,
    /// While set and not passed, Redis is not asked: it failed to answer.
    down_until: Arc<Mutex<Option<Instant>>>,
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
            give_back: Arc::new(Script::new(GIVE_BACK)),
            settings: Arc::new(settings),
            down_until: Arc::new(Mutex::new(None)),
        })
    }

    /// Whether Redis failed to answer lately, so decisions are made in this process.
    pub fn is_falling_back(&self) -> bool {
        let down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        down.is_some_and(|until| Instant::now() < until)
    }

    fn mark_down(&self, error: &RedisLimiterError) {
        let mut down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.is_none() {
            tracing::warn!(target: "together_tower", %error, "redis unreachable: deciding in this process");
        }
        *down = Some(Instant::now() + self.settings.retry_after);
    }

    fn mark_up(&self) {
        let mut down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if down.take().is_some() {
            tracing::info!(target: "together_tower", "redis answers again: deciding there");
        }
    }

    /// One GCRA decision in Redis.
    async fn decide(
        &self,
        bucket: &RedisBucket,
        cost: Cost,
    ) -> Result<Decision, RedisLimiterError> {
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

    /// Gives back `requests` and `tokens` microseconds of a bucket's state, in the background:
    /// the caller does not wait for it, and a failure only leaves the bucket stricter.
    fn give_back(&self, bucket: &RedisBucket, requests: i64, tokens: i64) {
        if (requests == 0 && tokens == 0) || self.is_falling_back() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (script, mut connection) = (Arc::clone(&self.give_back), self.connection.clone());
        let keys = [bucket.requests_key.clone(), bucket.tokens_key.clone()];
        let timeout = self.settings.call_timeout;
        runtime.spawn(async move {
            let mut invocation = script.key(&keys[0]);
            invocation.key(&keys[1]).arg(requests).arg(tokens);
            let call = invocation.invoke_async::<i64>(&mut connection);
            let _ = tokio::time::timeout(timeout, call).await;
        });
    }
}

/// A bucket's keys in Redis, the rates in force, and the in-process bucket decisions fall
/// back to when Redis does not answer.
pub struct RedisBucket {
    requests_key: String,
    tokens_key: String,
    rates: Mutex<Rates>,
    local: <LocalLimiter as Limiter>::Bucket,
    replicas: u32,
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

/// A process's share of `rates` when `replicas` processes share them.
fn share(rates: Rates, replicas: u32) -> Rates {
    let part = |pace: Pace| Pace::new(pace.interval().saturating_mul(replicas.max(1)), pace.tau());
    Rates {
        requests: rates.requests.map(part),
        tokens: rates.tokens.map(part),
    }
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
        let replicas = match self.settings.unreachable {
            Unreachable::FallBack { replicas } => replicas,
            Unreachable::Fail => 1,
        };
        let local_spec = BucketSpec::new(
            spec.key,
            spec.group,
            spec.model,
            share(spec.rates, replicas),
        );
        RedisBucket {
            requests_key,
            tokens_key,
            rates: Mutex::new(spec.rates),
            local: LocalLimiter.bucket(local_spec),
            replicas,
        }
    }

    fn try_acquire(&self, bucket: &RedisBucket, cost: Cost, now: Duration) -> Option<Decision> {
        // Redis decides, on the waiting path; while it is unreachable, this process does.
        if matches!(self.settings.unreachable, Unreachable::FallBack { .. })
            && self.is_falling_back()
        {
            return LocalLimiter.try_acquire(&bucket.local, cost, now);
        }
        None
    }

    async fn acquire(
        &self,
        bucket: &RedisBucket,
        cost: Cost,
        now: Duration,
    ) -> Result<Decision, BoxError> {
        let fall_back = matches!(self.settings.unreachable, Unreachable::FallBack { .. });
        if fall_back && self.is_falling_back() {
            return LocalLimiter.acquire(&bucket.local, cost, now).await;
        }
        match self.decide(bucket, cost).await {
            Ok(decision) => {
                self.mark_up();
                Ok(decision)
            }
            Err(error) => {
                self.mark_down(&error);
                if fall_back {
                    LocalLimiter.acquire(&bucket.local, cost, now).await
                } else {
                    Err(error.into())
                }
            }
        }
    }

    fn release(&self, bucket: &RedisBucket, cost: Cost, now: Duration) {
        LocalLimiter.release(&bucket.local, cost, now);
        let rates = bucket.rates();
        let back = |pace: Option<Pace>, units: u64| {
            pace.map_or(0, |pace| micros(pace.interval()).saturating_mul(units))
        };
        let requests = i64::try_from(back(rates.requests, cost.requests)).unwrap_or(i64::MAX);
        let tokens = i64::try_from(back(rates.tokens, cost.tokens)).unwrap_or(i64::MAX);
        self.give_back(bucket, requests, tokens);
    }

    fn correct_tokens(&self, bucket: &RedisBucket, charged: u64, used: u64, now: Duration) {
        LocalLimiter.correct_tokens(&bucket.local, charged, used, now);
        let Some(pace) = bucket.rates().tokens else {
            return;
        };
        let interval = i64::try_from(micros(pace.interval())).unwrap_or(i64::MAX);
        let unused =
            i64::try_from(charged).unwrap_or(i64::MAX) - i64::try_from(used).unwrap_or(i64::MAX);
        self.give_back(bucket, 0, unused.saturating_mul(interval));
    }

    fn set_rates(&self, bucket: &RedisBucket, rates: Rates, now: Duration) {
        *bucket.rates.lock().unwrap_or_else(PoisonError::into_inner) = rates;
        LocalLimiter.set_rates(&bucket.local, share(rates, bucket.replicas), now);
    }

    fn until_rest(&self, _: &RedisBucket, _: Duration) -> Duration {
        // The state lives in Redis and expires there.
        Duration::ZERO
    }
}
