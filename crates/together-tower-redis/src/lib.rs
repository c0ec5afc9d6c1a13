//! A Redis backend for together-tower's rate limiter: every process that uses the same Redis
//! and namespace shares one quota per (API key, quota group, model).
//!
//! [`RedisBackend`] keeps each bucket's GCRA state in Redis: one Lua script per decision,
//! on Redis's own clock (`TIME`, microseconds), so every process shares one clock as well as
//! one state. Keys are named by the key's fingerprint (never the key) under a `{hash tag}`, so
//! both keys of a bucket live on one Redis Cluster slot, and expire (`PX`) once the bucket is
//! full again. redis-rs loads the script again when Redis answers `NOSCRIPT` (a restart, a
//! failover, `SCRIPT FLUSH`).
//!
//! ## Reservations
//!
//! A request that must wait asks Redis once: the script takes its turn now, for the time the
//! turn is due, if that is within the request's max wait (and [`RedisSettings::reserve_ahead`]).
//! The request sleeps until then and goes without asking again, and turns go out in the order
//! the processes asked for them. Only the head of a bucket's queue in a process asks, so a
//! process holds at most one reservation per bucket at a time.
//!
//! A request dropped before its time gives its turn back, in one background call, if no
//! process took a turn after it: the next asker gets that time. If one did, the turn is lost:
//! one state per bucket cannot hold a hole, and giving the time back would let two requests go
//! at once, which a strict server would answer with a 429. So a cancelled reservation costs at
//! most one turn of the bucket's rate, and never more than one per process and bucket at a
//! time. A process killed while holding a reservation loses that one turn as well, and so does
//! a reservation whose answer comes after the call timeout. A reservation is never made
//! farther ahead than the request may wait, nor than `reserve_ahead` (5 s by default); a
//! request with longer to wait asks again when its turn is that close.
//!
//! ## Shared rates
//!
//! What one process learns, the others use. When a process's rate for a bucket differs from
//! the table (a limit header said less, or a 429 or a 503 cut it), it publishes that rate in
//! the bucket's `rates` hash, and every decision for the bucket paces at the slowest rate any
//! live process published. A process withdraws its entry when its rate is back at the table;
//! an entry not published again within [`RedisSettings::rates_ttl`] expires, so a process that
//! died while cut holds the others down no longer than that. Each process's own adaptation
//! goes on as before, from what it sees; `Limits::snapshot` shows that rate, while decisions
//! pace at the slowest published. The state is kept with its interval, and a decision at a
//! longer one rescales what the bucket owes, so a cut never hands out a fresh burst; at a
//! shorter one the debt is kept as it is (reserved turns stay an interval apart), which costs
//! at most one turn at the old rate.
//!
//! ## When Redis does not answer
//!
//! Every call has a timeout ([`RedisSettings::call_timeout`]). [`Unreachable`] says what
//! happens then: decide in this process at a share of the quota (the default, logged at
//! `warn` when it starts and at `info` when Redis answers again), or fail the request with
//! [`RedisBackendError`]. Redis is asked again after [`RedisSettings::retry_after`]. The first
//! decision of an outage finds the bucket's burst spent, since what Redis granted just before
//! is not known here. While some processes decide alone and others in Redis (for up to
//! `retry_after` after Redis is back), they may together exceed the quota by a little.
//!
//! ## Redis Cluster
//!
//! [`RedisBackend::connect_cluster`] takes any node of a cluster (Redis or Valkey) and finds
//! the rest. Every key of a bucket shares one hash tag, so each decision is one script call
//! to the node that owns the bucket's slot, and the cluster client follows `MOVED` and `ASK`
//! while slots move. A node that does not answer is an outage for its buckets only: they are
//! decided in this process, at the share [`Unreachable::FallBack`] gives, while the other
//! nodes' buckets stay in Redis. A node restarted without persistence comes back empty, so
//! each of its buckets may let one turn through early.
//!
//! An answer that says the limiter is configured wrong is never taken for an outage:
//! [`RedisBackend::connect`] to a cluster node fails at once with
//! [`RedisBackendError::Misconfigured`] (its keys on other nodes would only ever answer
//! `MOVED`), and so does a wrong password; at run time such an answer (`CROSSSLOT`, `NOAUTH`,
//! `WRONGPASS`, `NOPERM`, or `MOVED` on a single connection) fails the request and is logged
//! at `error`, whatever the fallback policy. Deciding in this process instead would quietly
//! give each process a quota of its own.
//!
//! ## Tracing and metrics
//!
//! Events, with target `together_tower`:
//!
//! | event | level | fields |
//! |---|---|---|
//! | redis unreachable: deciding in this process (or: failing requests) | warn | error, retry_ms |
//! | redis answers again: deciding there | info | down_ms |
//! | redis is configured wrong: failing the request | error | error |
//! | rate published to the other processes | debug | group, per_second |
//! | published rate withdrawn | debug | group |
//!
//! With the `metrics` feature, on the `metrics` facade (no label names a key):
//!
//! | metric | kind | labels | what |
//! |---|---|---|---|
//! | `together_tower_redis_decisions_total` | counter | outcome (`allow`, `reserved`, `wait`, `too_large`, `error`, `here`, `misconfigured`) | decisions, by how they went; `here`: made in this process while Redis was unreachable |
//! | `together_tower_redis_call_seconds` | histogram | | how long each decision's call to Redis took |
//! | `together_tower_redis_unreachable_total` | counter | | times Redis stopped answering |
//! | `together_tower_redis_deciding_here` | gauge | | 1 while decisions are made in this process, else 0 |
//!
//! ## The fast path
//!
//! Every decision is one round trip to Redis: a request that finds room goes after that one
//! call, with no queue and no second call, and concurrent decisions share one multiplexed
//! connection, so they are pipelined. There is no decision without Redis while it answers: a
//! process that decided alone would spend the quota the others count on.
//!
//! ## Keys
//!
//! `namespace:{fingerprint:group[:model hash]}:requests`, `:tokens` and `:rates`. Every
//! process must fingerprint keys alike for their buckets to meet: the default `KeyHasher`
//! does; a deployment with a secret of its own gives every process the same one.
//!
//! ```no_run
//! use together_tower::Limits;
//! use together_tower::quota::QuotaTable;
//! use together_tower_redis::{RedisBackend, RedisSettings};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let redis = RedisBackend::connect("redis://127.0.0.1:6379/", RedisSettings::default()).await?;
//! let limits = Limits::builder(QuotaTable::together_defaults()).backend(redis).build();
//! # let _ = limits;
//! # Ok(())
//! # }
//! ```

mod connection;
mod error;
mod telemetry;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::Script;
use together_tower::limit::{
    Backend, BucketSpec, Cost, Decision, Immediate, LocalBackend, Pace, Rates,
};
use tokio::time::Instant;
use tower::BoxError;

use crate::connection::Connection;
pub use crate::error::RedisBackendError;

/// The Redis backend's former name.
#[deprecated(note = "renamed `RedisBackend`, after the `Backend` trait it implements")]
pub type RedisLimiter = RedisBackend;

/// The Redis backend's error's former name.
#[deprecated(note = "renamed `RedisBackendError`")]
pub type RedisLimiterError = RedisBackendError;

use crate::telemetry::Outcome;

/// GCRA over a request rate and a token rate at once: both go, or neither. Time is Redis's
/// own, in microseconds, so every process shares one clock. A request that must wait no longer
/// than it may reserve takes its turn now, for the time it is due.
///
/// Each key holds `"<theoretical arrival time> <interval>"`, both in microseconds. When the
/// interval in force is longer than the one the state was kept at, what the bucket owes is
/// rescaled, so a cut keeps the bucket's used share and never hands out a burst. A shorter
/// one keeps what the bucket owes as it is: it may hold turns reserved for later, and
/// shrinking it would put the next turn closer to them than the interval.
///
/// KEYS: the requests' and the tokens' states; the rates processes published.
/// ARGV: for requests then tokens, the interval and tau in microseconds and the cost (a cost
/// of 0 skips that rate); the longest wait to reserve, in microseconds.
/// Returns `{answer, wait_us_requests, wait_us_tokens, tat_requests, tat_tokens}`: answer 1
/// took the cost for a turn `wait_us_requests` from now, leaving the arrival times given; 0
/// took nothing (the waits say how long); 2 took nothing because the cost is more than the
/// bucket holds.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ri, rt, rc = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ti, tt, tc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local reserve = tonumber(ARGV[7])
-- The slowest pace a live process published is in force for every process.
local published = redis.call('HGETALL', KEYS[3])
for i = 1, #published, 2 do
  local a, b, c, d, expires = string.match(published[i + 1], '^(%d+) (%d+) (%d+) (%d+) (%d+)$')
  if a == nil or tonumber(expires) < now then
    redis.call('HDEL', KEYS[3], published[i])
  else
    a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    if ri > 0 and a > ri then ri, rt = a, b end
    if ti > 0 and c > ti then ti, tt = c, d end
  end
end
local function tat(key, interval, tau, cost)
  if cost <= 0 or interval <= 0 then return nil end
  if (cost - 1) * interval > tau then return false end
  local state = redis.call('GET', key)
  if not state then return now end
  local at, was = string.match(state, '^(%d+) (%d+)$')
  at, was = tonumber(at), tonumber(was)
  if not at or not was or at <= now then return now end
  -- Slower than the state was kept at: what the bucket owes grows with the interval, so the
  -- change hands out no burst. Faster: kept as it is, since part of it may be turns reserved
  -- for later, and shrinking it would put the next turn too close to them.
  if interval > was then at = now + math.floor((at - now) * interval / was) end
  return at
end
local rtat, ttat = tat(KEYS[1], ri, rt, rc), tat(KEYS[2], ti, tt, tc)
if rtat == false or ttat == false then return {2, 0, 0, 0, 0} end
local function wait(at, interval, tau, cost)
  if not at then return 0 end
  return math.max(at + interval * (cost - 1) - tau - now, 0)
end
local rw, tw = wait(rtat, ri, rt, rc), wait(ttat, ti, tt, tc)
local start = math.max(rw, tw)
if start > reserve then return {0, rw, tw, 0, 0} end
local function take(key, at, interval, cost)
  if not at then return 0 end
  local new = math.max(at, now + start) + interval * cost
  local state = string.format('%.0f %.0f', new, interval)
  redis.call('SET', key, state, 'PX', math.floor((new - now) / 1000) + 1)
  return new
end
return {1, start, 0, take(KEYS[1], rtat, ri, rc), take(KEYS[2], ttat, ti, tc)}
";

/// Gives back units a bucket's state holds: a turn not used, or tokens not spent (a negative
/// count charges more), at the interval the state is kept at.
///
/// A turn is given back only while it is the last one taken (the arrival time is still the
/// one it left): one state per bucket cannot hold a hole, so giving back a turn that others
/// took turns after would let two of them go at once.
///
/// KEYS: the requests' and the tokens' states.
/// ARGV: units to give back to each (may be negative); for each, the arrival time it must
/// still hold (0: any); for each, the interval to charge at when there is no state.
const GIVE_BACK: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, 2 do
  local units, expected = tonumber(ARGV[i]), tonumber(ARGV[i + 2])
  local state = redis.call('GET', KEYS[i])
  local at, interval = nil, tonumber(ARGV[i + 4])
  if state then
    local a, b = string.match(state, '^(%d+) (%d+)$')
    at, interval = tonumber(a), tonumber(b) or interval
  end
  if units ~= 0 and interval and interval > 0 and (at or units < 0)
      and (expected == 0 or at == expected) then
    local new = math.max(at or now, now) - units * interval
    if new <= now then
      redis.call('DEL', KEYS[i])
    else
      local kept = string.format('%.0f %.0f', new, interval)
      redis.call('SET', KEYS[i], kept, 'PX', math.floor((new - now) / 1000) + 1)
    end
  end
end
return 1
";

/// Publishes the rates this process holds for a bucket when they differ from the table (it
/// learned a limit, or cut its rate after trouble), or withdraws them.
///
/// KEYS: the rates processes published.
/// ARGV: the process, then the requests' and the tokens' interval and tau in microseconds, and
/// how long the entry lives, in microseconds; no rates withdraws the process's entry.
const PUBLISH_RATES: &str = r"
if #ARGV == 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local ttl = tonumber(ARGV[6])
local entry = string.format('%s %s %s %s %.0f', ARGV[2], ARGV[3], ARGV[4], ARGV[5], now + ttl)
redis.call('HSET', KEYS[1], ARGV[1], entry)
redis.call('PEXPIRE', KEYS[1], math.floor(ttl / 1000) + 1)
return 1
";

/// What a [`RedisBackend`] does when Redis does not answer within the call timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Decides in this process, at the quota divided by `replicas` (the processes that share
    /// the quota), until Redis answers again. The default, with one replica.
    FallBack {
        /// How many processes share the quota.
        replicas: u32,
    },
    /// Fails the request with [`RedisBackendError`].
    Fail,
}

/// How a [`RedisBackend`] talks to Redis.
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
    /// The farthest ahead a waiting request reserves its turn. A request that must wait
    /// longer asks again when its turn is this close.
    pub reserve_ahead: Duration,
    /// How long a rate this process published (one it learned, or cut to after trouble) stays
    /// in force for the others without being published again: what a process that died while
    /// cut holds the others down for.
    pub rates_ttl: Duration,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            namespace: "together-tower".into(),
            call_timeout: Duration::from_millis(250),
            unreachable: Unreachable::FallBack { replicas: 1 },
            retry_after: Duration::from_secs(1),
            reserve_ahead: Duration::from_secs(5),
            rates_ttl: Duration::from_secs(10),
        }
    }
}

/// A [`Backend`] whose buckets live in Redis.
#[derive(Clone)]
pub struct RedisBackend {
    connection: Connection,
    script: Arc<Script>,
    give_back: Arc<Script>,
    publish: Arc<Script>,
    settings: Arc<RedisSettings>,
    /// Names this process's entry among the published rates.
    process: Arc<str>,
    /// Set while Redis fails to answer.
    down: Arc<Mutex<Option<Down>>>,
    /// Counts the times Redis stopped answering, so each bucket knows when an outage is new.
    outages: Arc<AtomicU64>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Connects to the Redis at `url` (`redis://host:port/db`). A Redis Cluster node is a
    /// [`RedisBackendError::Misconfigured`]: use [`RedisBackend::connect_cluster`].
    pub async fn connect(url: &str, settings: RedisSettings) -> Result<Self, RedisBackendError> {
        let connection = Connection::single(url, &settings).await?;
        Ok(Self::with_connection(connection, settings))
    }

    /// Connects to a Redis Cluster (or a Valkey cluster) through any of its nodes' URLs; the
    /// other nodes are discovered. Each bucket's keys share one hash tag, so every decision
    /// goes to the one node that owns the bucket's slot, and the cluster's redirections are
    /// followed.
    pub async fn connect_cluster<I, U>(
        nodes: I,
        settings: RedisSettings,
    ) -> Result<Self, RedisBackendError>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let nodes: Vec<U> = nodes.into_iter().collect();
        let nodes: Vec<&str> = nodes.iter().map(AsRef::as_ref).collect();
        let connection = Connection::cluster(&nodes, &settings).await?;
        Ok(Self::with_connection(connection, settings))
    }

    fn with_connection(connection: Connection, settings: RedisSettings) -> Self {
        Self {
            connection,
            script: Arc::new(Script::new(GCRA)),
            give_back: Arc::new(Script::new(GIVE_BACK)),
            publish: Arc::new(Script::new(PUBLISH_RATES)),
            settings: Arc::new(settings),
            process: process_name().into(),
            down: Arc::new(Mutex::new(None)),
            outages: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether Redis failed to answer lately, so decisions are made in this process. On a
    /// cluster: whether some node did, lately; each bucket falls back only while the node
    /// that owns it does not answer.
    pub fn is_falling_back(&self) -> bool {
        down_now(&self.down)
    }

    /// Whether `bucket` is decided in this process now: Redis (or, on a cluster, the node
    /// that owns the bucket) failed to answer lately.
    fn bucket_falls_back(&self, bucket: &RedisBucket) -> bool {
        if self.connection.is_cluster() {
            down_now(&bucket.down)
        } else {
            self.is_falling_back()
        }
    }

    fn falls_back(&self) -> bool {
        matches!(self.settings.unreachable, Unreachable::FallBack { .. })
    }

    /// Redis (the bucket's node, on a cluster) did not answer: decide without it for
    /// `retry_after`. On a cluster, the other nodes' buckets stay in Redis: a process that
    /// decided them here, at its share, while the others still decide them in Redis, would
    /// let the two together past the quota.
    fn mark_down(&self, bucket: &RedisBucket, error: &RedisBackendError) {
        let now = Instant::now();
        if self.connection.is_cluster() {
            let mut down = bucket.down.lock().unwrap_or_else(PoisonError::into_inner);
            let since = down.map_or(now, |down| down.since);
            *down = Some(Down {
                since,
                until: now + self.settings.retry_after,
            });
        }
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        let since = match *down {
            Some(down) => down.since,
            None => {
                self.outages.fetch_add(1, Ordering::AcqRel);
                telemetry::unreachable(error, self.settings.retry_after, self.falls_back());
                now
            }
        };
        *down = Some(Down {
            since,
            until: now + self.settings.retry_after,
        });
    }

    /// Decides in this process. The first decision of an outage finds the bucket's request
    /// burst spent: what Redis granted just before is not known here, and a burst from every
    /// process at once is what a strict server answers with 429s.
    fn decide_here(&self, bucket: &RedisBucket, cost: Cost, now: Duration) -> Immediate {
        let outage = self.outages.load(Ordering::Acquire);
        if bucket.outage_seen.swap(outage, Ordering::AcqRel) != outage {
            let one_turn = Cost {
                requests: 1,
                tokens: 0,
            };
            let capacity = bucket.burst();
            for _ in 0..capacity {
                if LocalBackend.try_acquire(&bucket.local, one_turn, now) != Some(Immediate::Allow)
                {
                    break;
                }
            }
        }
        telemetry::decided(Outcome::Here, None);
        let decision = LocalBackend
            .try_acquire(&bucket.local, cost, now)
            .unwrap_or(Immediate::Wait(Duration::from_millis(1)));
        bucket.set_last_turn((decision == Immediate::Allow).then_some(LastTurn::Here));
        decision
    }

    /// Redis answered for `bucket`. On a cluster, the outage is over when a bucket that was
    /// down answers again, not when any node answers.
    fn mark_up(&self, bucket: &RedisBucket) {
        if self.connection.is_cluster()
            && bucket
                .down
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
                .is_none()
        {
            return;
        }
        let mut down = self.down.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(down) = down.take() {
            telemetry::answers_again(down.since.elapsed());
        }
    }

    /// One GCRA decision in Redis: the cost goes now, is reserved for a turn no farther than
    /// `max_wait` (and `reserve_ahead`) away, or must wait.
    async fn decide(
        &self,
        bucket: &RedisBucket,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Decision, RedisBackendError> {
        let rates = bucket.rates();
        // An adapted rate is published again before the others forget it.
        self.publish_rates(bucket, rates);
        let reserve = max_wait.min(self.settings.reserve_ahead);
        let [ri, rt, rc] = pace_args(rates.requests, cost.requests);
        let [ti, tt, tc] = pace_args(rates.tokens, cost.tokens);
        let mut invocation = self.script.key(&bucket.requests_key);
        invocation
            .key(&bucket.tokens_key)
            .key(&bucket.rates_key)
            .arg(ri)
            .arg(rt)
            .arg(rc)
            .arg(ti)
            .arg(tt)
            .arg(tc)
            .arg(micros(reserve));
        let mut connection = self.connection.clone();
        let timeout = self.settings.call_timeout;
        let started = Instant::now();
        let answer: Result<(u8, u64, u64, u64, u64), _> =
            tokio::time::timeout(timeout, invocation.invoke_async(&mut connection))
                .await
                .map_err(|_| RedisBackendError::Timeout(timeout))
                .and_then(|answer| {
                    answer.map_err(|error| RedisBackendError::typed(error, connection.is_cluster()))
                });
        let call = Some(started.elapsed());
        let answer = answer.inspect_err(|_| telemetry::decided(Outcome::Error, call))?;
        let decision = match answer {
            (1, wait, _, requests_tat, tokens_tat) => {
                bucket.set_last_turn(Some(LastTurn::Redis([requests_tat, tokens_tat])));
                if wait == 0 {
                    Decision::Allow
                } else {
                    Decision::Reserved(Duration::from_micros(wait))
                }
            }
            (2, ..) => Decision::TooLarge,
            (_, requests, tokens, ..) => {
                let wait = Duration::from_micros(requests.max(tokens).max(1));
                if wait <= max_wait {
                    // Within reach but beyond `reserve_ahead`: ask again when it is that close.
                    Decision::Wait(wait.saturating_sub(reserve).max(Duration::from_millis(1)))
                } else if tokens > requests {
                    Decision::WaitForTokens {
                        request: Duration::from_micros(requests),
                        tokens: wait,
                    }
                } else {
                    Decision::Wait(wait)
                }
            }
        };
        let outcome = match decision {
            Decision::Allow => Outcome::Allow,
            Decision::Reserved(_) => Outcome::Reserved,
            Decision::TooLarge => Outcome::TooLarge,
            _ => Outcome::Wait,
        };
        telemetry::decided(outcome, call);
        Ok(decision)
    }

    /// Publishes this process's rates for `bucket` when they differ from the table, so every
    /// process uses what one learned, or withdraws them once they are back at the table. In
    /// the background, and only when they moved, or to keep them from expiring.
    fn publish_rates(&self, bucket: &RedisBucket, rates: Rates) {
        let adapted = rates != bucket.table;
        let now = Instant::now();
        let refresh = self.settings.rates_ttl / 3;
        {
            let mut published = bucket
                .published
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let due = match *published {
                None => adapted,
                Some(_) if !adapted => true,
                Some((last, at)) => moved(last, rates) || now.duration_since(at) >= refresh,
            };
            if !due {
                return;
            }
            *published = adapted.then_some((rates, now));
        }
        telemetry::published(
            &bucket.group,
            rates
                .requests
                .filter(|_| adapted)
                .map(|pace| pace.per_second()),
        );
        let mut args = vec![self.process.to_string()];
        if adapted {
            let [ri, rt, _] = pace_args(rates.requests, 0);
            let [ti, tt, _] = pace_args(rates.tokens, 0);
            args.extend([ri, rt, ti, tt, micros(self.settings.rates_ttl)].map(|n| n.to_string()));
        }
        self.in_background(&self.publish, vec![bucket.rates_key.clone()], args);
    }

    /// Runs `script` without waiting for it, within the call timeout; a failure leaves Redis as
    /// it was.
    fn in_background(&self, script: &Arc<Script>, keys: Vec<String>, args: Vec<String>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (script, mut connection) = (Arc::clone(script), self.connection.clone());
        let timeout = self.settings.call_timeout;
        runtime.spawn(async move {
            let mut invocation = script.prepare_invoke();
            for key in &keys {
                invocation.key(key);
            }
            for arg in &args {
                invocation.arg(arg);
            }
            let call = invocation.invoke_async::<i64>(&mut connection);
            let _ = tokio::time::timeout(timeout, call).await;
        });
    }

    /// Gives back `units` of a bucket's state (requests, tokens; negative charges more),
    /// where the arrival times are still `expected` (0: whatever they are), in the
    /// background: the caller does not wait for it, and a failure only leaves the bucket
    /// stricter.
    fn give_back(&self, bucket: &RedisBucket, units: [i64; 2], expected: [u64; 2]) {
        if units == [0, 0] || self.bucket_falls_back(bucket) {
            return;
        }
        let rates = bucket.rates();
        let interval = |pace: Option<Pace>| pace.map_or(0, |pace| micros(pace.interval()));
        let keys = vec![bucket.requests_key.clone(), bucket.tokens_key.clone()];
        let args = units
            .map(|units| units.to_string())
            .into_iter()
            .chain(expected.map(|tat| tat.to_string()))
            .chain([interval(rates.requests), interval(rates.tokens)].map(|i| i.to_string()))
            .collect();
        self.in_background(&self.give_back, keys, args);
    }
}

/// A bucket's keys in Redis, the rates in force, and the in-process bucket decisions fall
/// back to when Redis does not answer.
pub struct RedisBucket {
    /// The quota group, for events.
    group: String,
    requests_key: String,
    tokens_key: String,
    rates_key: String,
    /// The rates the table gives the bucket: a process publishes only rates that differ.
    table: Rates,
    rates: Mutex<Rates>,
    /// What this process last published, and when (`None`: nothing, or withdrawn).
    published: Mutex<Option<(Rates, Instant)>>,
    /// Where the last turn this bucket took came from. Only the head of the bucket's queue
    /// takes turns, so a turn given back is always this one, and goes back there.
    last_turn: Mutex<Option<LastTurn>>,
    /// The outage this bucket last decided in this process during.
    outage_seen: AtomicU64,
    /// On a cluster: set while the node that owns this bucket does not answer.
    down: Mutex<Option<Down>>,
    local: <LocalBackend as Backend>::Bucket,
    replicas: u32,
}

impl fmt::Debug for RedisBucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBucket")
            .field("requests_key", &self.requests_key)
            .finish_non_exhaustive()
    }
}

/// Whether an outage recorded in `down` still holds.
fn down_now(down: &Mutex<Option<Down>>) -> bool {
    let down = down.lock().unwrap_or_else(PoisonError::into_inner);
    down.is_some_and(|down| Instant::now() < down.until)
}

/// An outage: when it began, and until when Redis is not asked again.
#[derive(Debug, Clone, Copy)]
struct Down {
    since: Instant,
    until: Instant,
}

/// Where a bucket's last turn was taken.
#[derive(Debug, Clone, Copy)]
enum LastTurn {
    /// In Redis, leaving these arrival times (requests, tokens).
    Redis([u64; 2]),
    /// In this process, while Redis was unreachable.
    Here,
}

impl RedisBucket {
    fn set_last_turn(&self, turn: Option<LastTurn>) {
        *self
            .last_turn
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = turn;
    }

    fn rates(&self) -> Rates {
        *self.rates.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many requests a full bucket lets go at once (bounded, for a bucket with no rate).
    fn burst(&self) -> u64 {
        self.rates().requests.map_or(0, |pace| {
            let whole = pace.tau().as_nanos() / pace.interval().as_nanos().max(1);
            u64::try_from(whole)
                .unwrap_or(u64::MAX)
                .saturating_add(1)
                .min(1_000)
        })
    }
}

/// The key names of a bucket: the namespace, then a `{hash tag}` of the key's fingerprint,
/// the group and the model, so both keys of a bucket live on one Redis Cluster slot.
fn key_names(namespace: &str, spec: &BucketSpec<'_>) -> [String; 3] {
    let model = spec.model.map(model_tag).unwrap_or_default();
    let tag = format!("{{{}:{}{model}}}", spec.key, spec.group);
    ["requests", "tokens", "rates"].map(|part| format!("{namespace}:{tag}:{part}"))
}

/// A name for this process among those that publish rates: random, so that processes on
/// different hosts never share one.
fn process_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// Whether a rate moved enough since it was published to publish it again (2%).
fn moved(last: Rates, now: Rates) -> bool {
    let apart = |a: Option<Pace>, b: Option<Pace>| match (a, b) {
        (Some(a), Some(b)) => {
            let (a, b) = (a.interval().as_secs_f64(), b.interval().as_secs_f64());
            (a - b).abs() > 0.02 * b
        }
        (a, b) => a.is_some() != b.is_some(),
    };
    apart(last.requests, now.requests) || apart(last.tokens, now.tokens)
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

impl Backend for RedisBackend {
    type Bucket = RedisBucket;

    fn bucket(&self, spec: BucketSpec<'_>) -> RedisBucket {
        let [requests_key, tokens_key, rates_key] = key_names(&self.settings.namespace, &spec);
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
            group: spec.group.to_owned(),
            requests_key,
            tokens_key,
            rates_key,
            table: spec.rates,
            rates: Mutex::new(spec.rates),
            published: Mutex::new(None),
            last_turn: Mutex::new(None),
            outage_seen: AtomicU64::new(0),
            down: Mutex::new(None),
            local: LocalBackend.bucket(local_spec),
            replicas,
        }
    }

    fn try_acquire(&self, bucket: &RedisBucket, cost: Cost, now: Duration) -> Option<Immediate> {
        // Redis decides, on the waiting path; while it is unreachable, this process does.
        if self.falls_back() && self.bucket_falls_back(bucket) {
            return Some(self.decide_here(bucket, cost, now));
        }
        None
    }

    async fn acquire(
        &self,
        bucket: &RedisBucket,
        cost: Cost,
        now: Duration,
        max_wait: Duration,
    ) -> Result<Decision, BoxError> {
        // A new decision: the bucket's last turn was used or given back already.
        bucket.set_last_turn(None);
        let fall_back = self.falls_back();
        if fall_back && self.bucket_falls_back(bucket) {
            return Ok(self.decide_here(bucket, cost, now).into());
        }
        match self.decide(bucket, cost, max_wait).await {
            Ok(decision) => {
                self.mark_up(bucket);
                Ok(decision)
            }
            Err(error) if error.is_misconfigured() => {
                // Not an outage: deciding here would hide it, and split the quota.
                telemetry::misconfigured(&error);
                Err(error.into())
            }
            Err(error) => {
                self.mark_down(bucket, &error);
                if fall_back {
                    Ok(self.decide_here(bucket, cost, now).into())
                } else {
                    Err(error.into())
                }
            }
        }
    }

    fn release(&self, bucket: &RedisBucket, cost: Cost, now: Duration) {
        let taken = bucket
            .last_turn
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match taken {
            Some(LastTurn::Redis(arrival_times)) => {
                let units = [cost.requests, cost.tokens]
                    .map(|units| i64::try_from(units).unwrap_or(i64::MAX));
                self.give_back(bucket, units, arrival_times);
            }
            Some(LastTurn::Here) => LocalBackend.release(&bucket.local, cost, now),
            None => {}
        }
    }

    fn correct_tokens(&self, bucket: &RedisBucket, charged: u64, used: u64, now: Duration) {
        LocalBackend.correct_tokens(&bucket.local, charged, used, now);
        let signed = |units: u64| i64::try_from(units).unwrap_or(i64::MAX);
        let unused = signed(charged).saturating_sub(signed(used));
        self.give_back(bucket, [0, unused], [0, 0]);
    }

    fn set_rates(&self, bucket: &RedisBucket, rates: Rates, now: Duration) {
        *bucket.rates.lock().unwrap_or_else(PoisonError::into_inner) = rates;
        LocalBackend.set_rates(&bucket.local, share(rates, bucket.replicas), now);
        self.publish_rates(bucket, rates);
    }

    fn until_rest(&self, _: &RedisBucket, _: Duration) -> Duration {
        // The state lives in Redis and expires there.
        Duration::ZERO
    }
}
