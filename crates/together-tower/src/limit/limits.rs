//! [`Limits`]: one shared limit, built once, cloned into every layer that should share it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use super::admission::{Inner, Settings};
use super::backend::{Backend, LocalBackend};
use super::bucket::BucketContext;
use super::bucket::fair::WHOLE_TURN;
use super::bucket::map::BucketMap;
use super::bucket::names::ModelNames;
use super::estimate::{DefaultTokenEstimate, EstimateTokens};
use super::learn::adapt::{Adaptation, RateChanges};
use super::share::{Priority, Tenant, TenantCap};
use crate::classify::{Classify, TogetherClassifier};
use crate::clock::TokioClock;
use crate::key::{ApiKeyId, KeyHasher};
use crate::quota::QuotaTable;

/// One shared limit: the quota table, the live buckets, and what they learned.
///
/// Build it once, from a [`QuotaTable`] and settings, and give a clone to every layer that
/// should share it: two stacks built from one `Limits` share one quota, and two built from two
/// `Limits` have one each. Cloning is cheap (an `Arc`). Nothing about it changes after it is
/// built, but for what the buckets learn from the server.
///
/// Two stacks, each on a client of its own, built from one handle: a request through either
/// waits in the same bucket, so the key gets its 600 chat requests a minute once, not twice.
///
/// ```
/// use together_tower::body::BufferedBody;
/// use together_tower::quota::QuotaTable;
/// use together_tower::{Limits, ServiceBuilderExt, TogetherLayer};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # type Body = BufferedBody<String>;
/// # fn client() -> impl tower::Service<http::Request<Body>, Response = http::Response<String>,
/// #     Error = std::convert::Infallible, Future = impl Send> + Clone + Send + 'static {
/// #     tower::service_fn(|_| async { Ok(http::Response::new(String::new())) })
/// # }
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() -> Result<(), tower::BoxError> {
/// let limits = Limits::new(QuotaTable::together_defaults());
/// let first = ServiceBuilder::new().together(limits.clone()).service(client());
/// let second = TogetherLayer::new(limits.clone()).layer(client());
/// # use tower::Layer;
///
/// let chat = || {
///     http::Request::post("https://api.together.xyz/v1/chat/completions")
///         .header("authorization", "Bearer my-key")
///         .body(r#"{"model":"m","messages":[]}"#.to_owned())
/// };
/// let started = tokio::time::Instant::now();
/// first.oneshot(chat()?).await?;
/// second.oneshot(chat()?).await?;
/// // One bucket, at 10 a second: the second request waited its turn after the first.
/// assert_eq!(limits.snapshot().len(), 1);
/// assert!(started.elapsed() >= std::time::Duration::from_millis(95));
/// # Ok(())
/// # }
/// ```
pub struct Limits<C = TogetherClassifier, L = LocalBackend>
where
    L: Backend,
{
    pub(crate) inner: Arc<Inner<C, L>>,
}

impl Limits {
    /// Limits for `table`, in this process, with every setting at its default.
    pub fn new(table: QuotaTable) -> Self {
        Self::builder(table).build()
    }

    /// A builder for limits of `table`.
    pub fn builder(table: QuotaTable) -> LimitsBuilder {
        LimitsBuilder {
            table,
            classifier: TogetherClassifier,
            backend: LocalBackend,
            key_hasher: KeyHasher::new(),
            settings: Settings::default(),
            max_pause: Duration::from_secs(60),
            default_pause: Duration::from_secs(1),
            adaptation: Adaptation::default(),
            estimate: Box::new(DefaultTokenEstimate),
        }
    }
}

impl Default for Limits {
    /// Together's published limits ([`QuotaTable::together_defaults`]).
    fn default() -> Self {
        Self::new(QuotaTable::together_defaults())
    }
}

impl<C, L: Backend> Limits<C, L> {
    /// The classifier.
    pub fn classifier(&self) -> &C {
        &self.inner.classifier
    }

    /// The quota table.
    pub fn table(&self) -> &QuotaTable {
        &self.inner.context.table
    }

    /// How the rates adapt.
    pub fn adaptation(&self) -> Adaptation {
        self.inner.context.adaptation
    }

    /// How many buckets are live now.
    pub fn live_buckets(&self) -> usize {
        self.inner.buckets.len()
    }

    /// Every live bucket, as it is now: the rates in force, who waits, whether it is closed.
    pub fn snapshot(&self) -> Vec<BucketSnapshot> {
        let now = self.inner.context.clock.elapsed();
        self.inner
            .buckets
            .all()
            .into_iter()
            .map(|bucket| {
                if let Some(slots) = bucket.slots() {
                    slots.expire();
                }
                let rates = bucket.rates_now(now);
                let (by_priority, by_tenant) = bucket.census();
                BucketSnapshot {
                    key: bucket.key,
                    group: bucket.group().to_string(),
                    model: bucket.model.as_deref().map(str::to_owned),
                    requests_per_second: rates.requests.map(|pace| pace.per_second()),
                    tokens_per_second: rates.tokens.map(|pace| pace.per_second()),
                    waiting: bucket.queue_len(),
                    waiting_by_priority: Priority::ALL.into_iter().zip(by_priority).collect(),
                    waiting_by_tenant: by_tenant
                        .into_iter()
                        .map(|(tenant, count)| (tenant.name().to_owned(), count))
                        .collect(),
                    closed_for: bucket.closed_for(now),
                    free_slots: bucket
                        .slots()
                        .map(|slots| slots.semaphore().available_permits()),
                    held_jobs: bucket.slots().map_or(0, |slots| slots.held_jobs()),
                    rate_changes: bucket.controllers().changes(),
                }
            })
            .collect()
    }

    /// The bucket `request` would wait in, as it is now; `None` if the request's class is not
    /// limited or its bucket is not live.
    pub fn snapshot_for<B>(&self, request: &Request<B>) -> Option<BucketSnapshot>
    where
        C: Classify,
    {
        let (_, key) = self.inner.bucket_key(request)?;
        let bucket = self.inner.buckets.get(&key)?;
        self.snapshot().into_iter().find(|snapshot| {
            snapshot.key == bucket.key
                && snapshot.group == **bucket.group()
                && snapshot.model.as_deref() == bucket.model.as_deref()
        })
    }
}

/// A live bucket, as [`Limits::snapshot`] saw it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BucketSnapshot {
    /// The fingerprint of its API key.
    pub key: ApiKeyId,
    /// Its quota group.
    pub group: String,
    /// Its model, for groups limited per model.
    pub model: Option<String>,
    /// The request rate in force, per second.
    pub requests_per_second: Option<f64>,
    /// The token rate in force, per second.
    pub tokens_per_second: Option<f64>,
    /// Requests waiting for it.
    pub waiting: usize,
    /// Those requests by priority, the most urgent first.
    pub waiting_by_priority: Vec<(Priority, usize)>,
    /// Those requests by tenant, for the tenants that wait (requests that name none are not
    /// listed).
    pub waiting_by_tenant: Vec<(String, usize)>,
    /// How long the server's word keeps it closed, if it does.
    pub closed_for: Option<Duration>,
    /// For a group with concurrency slots: how many are free now.
    pub free_slots: Option<usize>,
    /// Jobs (fine-tunes, batches) holding a slot of this bucket until they end.
    pub held_jobs: usize,
    /// How often its rates changed, by the reason (adaptive mode; a bucket dropped while
    /// idle forgets its count).
    pub rate_changes: RateChanges,
}

impl<C, L: Backend> Clone for Limits<C, L> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<C: fmt::Debug, L: Backend + fmt::Debug> fmt::Debug for Limits<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("classifier", &self.inner.classifier)
            .field("backend", &self.inner.context.backend)
            .field("table", &self.inner.context.table)
            .field("settings", &self.inner.settings)
            .field("adaptation", &self.inner.context.adaptation)
            .field("live_buckets", &self.inner.buckets.len())
            .finish_non_exhaustive()
    }
}

/// Builds [`Limits`]. Every setting has a default:
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`max_queue`](Self::max_queue) | 1,024 | requests that may wait per bucket; more get [`QueueFull`](super::error::QueueFull) |
/// | [`max_wait`](Self::max_wait) | 30 s | the longest a request waits; longer gets [`RateLimited`](super::error::RateLimited). A request's own [`MaxWait`](super::MaxWait) overrides it |
/// | [`priority_max_wait`](Self::priority_max_wait) | none | a priority's own `max_wait` |
/// | [`min_share`](Self::min_share) | normal 20%, background 10% | the least share of the turns a less urgent priority gets while it waits |
/// | [`tenant_weight`](Self::tenant_weight) | 1 | a tenant's weight in its priority's share of the turns |
/// | [`max_queue_per_tenant`](Self::max_queue_per_tenant) | none | requests one tenant may have waiting in a bucket |
/// | [`tenant_cap`](Self::tenant_cap) | none | the most of a bucket's quota a tenant may take, as a rate or a share |
/// | [`tenant_from`](Self::tenant_from), [`priority_from`](Self::priority_from) | none | read a request's tenant and priority from its headers when it carries no extension |
/// | [`max_buckets`](Self::max_buckets) | 65,536 | live buckets kept; idle ones go first, and a bucket in use never goes (new keys get [`TooManyBuckets`](super::error::TooManyBuckets) instead) |
/// | [`idle_timeout`](Self::idle_timeout) | 60 s | unused this long (and refilled), a bucket may go |
/// | [`max_pause`](Self::max_pause) | 60 s | the longest the server's word may close a bucket |
/// | [`default_pause`](Self::default_pause) | 1 s | how long a 429 without a hint closes a bucket, in [`Mode::Static`](super::Mode::Static) |
/// | [`job_ttl`](Self::job_ttl) | 24 h | how long a created job holds its slot when no answer shows it ending |
/// | [`job_recheck`](Self::job_recheck) | 30 s | how long the slots taken after a 409 on create stay taken, unless a list of jobs corrects them |
/// | [`adaptation`](Self::adaptation) | [`Adaptation::default`] | whether and how rates follow the server |
/// | [`token_estimate`](Self::token_estimate) | [`DefaultTokenEstimate`] | what a request is charged against a token budget before it is sent |
/// | [`key_hasher`](Self::key_hasher) | [`KeyHasher::new`] | how API keys become fingerprints |
/// | [`classifier`](Self::classifier) | [`TogetherClassifier`] | which class a request is, and where its key is |
/// | [`backend`](Self::backend) | [`LocalBackend`] | where the buckets' state lives |
#[must_use]
pub struct LimitsBuilder<C = TogetherClassifier, L = LocalBackend> {
    table: QuotaTable,
    classifier: C,
    backend: L,
    key_hasher: KeyHasher,
    settings: Settings,
    max_pause: Duration,
    default_pause: Duration,
    adaptation: Adaptation,
    estimate: Box<dyn EstimateTokens>,
}

impl<C, L> LimitsBuilder<C, L> {
    /// How many requests may wait in one bucket at once.
    pub fn max_queue(mut self, max_queue: usize) -> Self {
        self.settings.max_queue = max_queue;
        self
    }

    /// The longest a request waits for its turn, unless it carries a [`MaxWait`](super::MaxWait).
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.settings.max_wait = max_wait;
        self
    }

    /// The least share of a bucket's turns `priority` gets while it has waiters and more
    /// urgent requests wait too, between 0 and 1 (a value outside is taken as the nearest
    /// end). By default 20% for [`Priority::Normal`] and 10% for [`Priority::Background`]; an
    /// [`Priority::Interactive`] request goes first anyway. See the [module docs](super).
    pub fn min_share(mut self, priority: Priority, share: f64) -> Self {
        let share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        self.settings.shares.min_share[priority.index()] =
            (share * f64::from(WHOLE_TURN)).round() as u32;
        self
    }

    /// The longest a request of `priority` waits for its turn, instead of
    /// [`max_wait`](Self::max_wait), unless it carries a [`MaxWait`](super::MaxWait): an
    /// interactive request may rather fail fast than wait a minute.
    pub fn priority_max_wait(mut self, priority: Priority, max_wait: Duration) -> Self {
        self.settings.shares.max_wait[priority.index()] = Some(max_wait);
        self
    }

    /// The weight of the tenant called `name` (see [`Tenant`]): within a priority, tenants
    /// with waiters share a bucket's turns in proportion to their weights. 1 for a tenant
    /// not named here; 0 counts as 1.
    pub fn tenant_weight(mut self, name: &str, weight: u32) -> Self {
        let id = Tenant::new(name).id();
        self.settings.shares.weights.insert(id, weight.max(1));
        self
    }

    /// Caps the tenant called `name`: in each bucket, it never takes more than `cap` (a rate,
    /// or a share of the bucket's request rate in force), even when no other tenant waits. A
    /// request over its cap waits for its tenant's next turn before it joins the bucket's
    /// queue, so it never holds up the others; past `max_wait`, it gets
    /// [`RateLimited`](super::error::RateLimited). Caps hold within this process.
    pub fn tenant_cap(mut self, name: &str, cap: TenantCap) -> Self {
        let id = Tenant::new(name).id();
        self.settings.shares.caps.insert(id, cap);
        self
    }

    /// The most requests one [`Tenant`] may have waiting in a bucket, so that one tenant
    /// cannot fill the queue for all (the default tenant of requests that name none counts
    /// as one). Past it, its requests get [`QueueFull`](super::error::QueueFull), naming
    /// this bound. Unbounded by default: [`max_queue`](Self::max_queue) bounds them all.
    pub fn max_queue_per_tenant(mut self, max_queue: usize) -> Self {
        self.settings.shares.max_queue_per_tenant = Some(max_queue.max(1));
        self
    }

    /// Reads the [`Tenant`] of a request that carries none as an extension from its headers:
    /// a header a gateway sets after it authenticates the caller, say. Read only for requests
    /// that wait. Requests it gives no tenant for share the default tenant.
    pub fn tenant_from<F>(mut self, read: F) -> Self
    where
        F: Fn(&http::HeaderMap) -> Option<Tenant> + Send + Sync + 'static,
    {
        self.settings.shares.tenant_from = Some(Arc::new(read));
        self
    }

    /// Reads the [`Priority`] of a request that carries none as an extension from its
    /// headers. Requests it gives no priority for are [`Priority::Normal`].
    pub fn priority_from<F>(mut self, read: F) -> Self
    where
        F: Fn(&http::HeaderMap) -> Option<Priority> + Send + Sync + 'static,
    {
        self.settings.shares.priority_from = Some(Arc::new(read));
        self
    }

    /// How many buckets are kept at most (0 counts as 1).
    pub fn max_buckets(mut self, max_buckets: usize) -> Self {
        self.settings.max_buckets = max_buckets;
        self
    }

    /// How long a bucket stays unused before it may be dropped. A bucket is never dropped
    /// before its rate has refilled, so dropping it does not hand out a fresh burst.
    pub fn idle_timeout(mut self, idle_timeout: Duration) -> Self {
        self.settings.idle_timeout = idle_timeout;
        self
    }

    /// The longest the server's hints may close a bucket; longer hints are cut to this.
    pub fn max_pause(mut self, max_pause: Duration) -> Self {
        self.max_pause = max_pause;
        self
    }

    /// How long a 429 without any hint closes its bucket in [`Mode::Static`](super::Mode::Static).
    /// Adaptive limits cut the rate instead.
    pub fn default_pause(mut self, default_pause: Duration) -> Self {
        self.default_pause = default_pause;
        self
    }

    /// How long a created fine-tune or batch holds its group's slot when no answer about it
    /// (a read of the job, a cancel, the list) shows it ending. See [the module docs](super)
    /// on job slots. A program that never reads its jobs' states should set this near its
    /// jobs' usual length: until it passes, a slot whose job ended unseen stays taken, and
    /// creates beyond the limit wait (and after `max_wait`, fail with `SlotsBusy`).
    pub fn job_ttl(mut self, ttl: Duration) -> Self {
        self.settings.job_times.ttl = ttl;
        self
    }

    /// How long the free slots taken after a 409 on create (jobs this process does not know
    /// of) stay taken, unless a list of jobs corrects them sooner.
    pub fn job_recheck(mut self, recheck: Duration) -> Self {
        self.settings.job_times.recheck = recheck;
        self
    }

    /// How rates follow the server: [`Adaptation::fixed`] for the table only.
    pub fn adaptation(mut self, adaptation: Adaptation) -> Self {
        self.adaptation = adaptation;
        self
    }

    /// Estimates the tokens of each request with `estimate` instead of the default.
    pub fn token_estimate(mut self, estimate: impl EstimateTokens) -> Self {
        self.estimate = Box::new(estimate);
        self
    }

    /// Fingerprints API keys with this hasher, such as one with a secret shared by every
    /// process of a deployment.
    pub fn key_hasher(mut self, key_hasher: KeyHasher) -> Self {
        self.key_hasher = key_hasher;
        self
    }

    /// Classifies requests with `classifier` instead.
    pub fn classifier<C2>(self, classifier: C2) -> LimitsBuilder<C2, L> {
        LimitsBuilder {
            table: self.table,
            classifier,
            backend: self.backend,
            key_hasher: self.key_hasher,
            settings: self.settings,
            max_pause: self.max_pause,
            default_pause: self.default_pause,
            adaptation: self.adaptation,
            estimate: self.estimate,
        }
    }

    /// Keeps the buckets' state in another backend, such as Redis.
    #[deprecated(note = "renamed `backend`")]
    pub fn limiter<L2: Backend>(self, backend: L2) -> LimitsBuilder<C, L2> {
        self.backend(backend)
    }

    /// Keeps the buckets' state in another backend, such as Redis.
    pub fn backend<L2: Backend>(self, backend: L2) -> LimitsBuilder<C, L2> {
        LimitsBuilder {
            table: self.table,
            classifier: self.classifier,
            backend,
            key_hasher: self.key_hasher,
            settings: self.settings,
            max_pause: self.max_pause,
            default_pause: self.default_pause,
            adaptation: self.adaptation,
            estimate: self.estimate,
        }
    }

    /// The limits, with empty buckets.
    pub fn build(self) -> Limits<C, L>
    where
        L: Backend,
    {
        let sweep_every = sweep_every(&self.table, self.settings.idle_timeout);
        let context = Arc::new(BucketContext {
            backend: self.backend,
            clock: TokioClock::new(),
            max_pause: self.max_pause,
            default_pause: self.default_pause,
            adaptation: self.adaptation,
            job_times: self.settings.job_times,
            group_names: self
                .table
                .groups()
                .map(|group| Arc::from(group.name()))
                .collect(),
            model_names: ModelNames::default(),
            min_share: self.settings.shares.min_share,
            table: self.table,
        });
        Limits {
            inner: Arc::new(Inner {
                classifier: self.classifier,
                buckets: BucketMap::new(self.settings.max_buckets, sweep_every),
                key_hasher: self.key_hasher,
                settings: self.settings,
                context,
                estimate: self.estimate,
                model_hasher: std::hash::RandomState::new(),
                caps: Arc::default(),
            }),
        }
    }
}

impl<C: fmt::Debug, L: fmt::Debug> fmt::Debug for LimitsBuilder<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitsBuilder")
            .field("table", &self.table)
            .field("classifier", &self.classifier)
            .field("backend", &self.backend)
            .field("settings", &self.settings)
            .field("adaptation", &self.adaptation)
            .finish_non_exhaustive()
    }
}

/// How often a shard of buckets may be swept: never sooner than any quota of `table` refills,
/// so that a bucket unused for a whole interval is back at rest and dropping it loses nothing.
fn sweep_every(table: &QuotaTable, idle_timeout: Duration) -> Duration {
    table
        .groups()
        .flat_map(|group| [group.rate(), group.tokens()])
        .flatten()
        .map(|rate| rate.refill_time())
        .fold(idle_timeout, Duration::max)
}
