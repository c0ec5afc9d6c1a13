use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::backend::{GovernorLimiter, Limiter};
use super::service::{RateLimit, Settings, Shared};
use crate::classify::{Classify, TogetherClassifier};
use crate::key::KeyHasher;
use crate::quota::QuotaTable;

/// Applies [`RateLimit`] to a service: each request waits its turn in its
/// (API key, quota group) bucket, first come first served, before it is sent.
///
/// Every service this layer builds shares one set of buckets, so clone the layer (or the
/// service), not the configuration, to share a quota. The `with_*` methods return a layer
/// with fresh, empty buckets: configure the layer before you use it.
///
/// Defaults:
///
/// | setting | default | meaning |
/// |---|---|---|
/// | [`with_max_queue`](Self::with_max_queue) | 1,024 | requests that may wait per bucket; more get [`QueueFull`](super::error::QueueFull) |
/// | [`with_max_wait`](Self::with_max_wait) | 30 s | the longest a request waits; longer gets [`RateLimited`](super::error::RateLimited). A request's own [`MaxWait`](super::MaxWait) extension overrides it |
/// | [`with_max_buckets`](Self::with_max_buckets) | 65,536 | live buckets kept; idle ones are dropped first |
/// | [`with_idle_timeout`](Self::with_idle_timeout) | 60 s | unused this long (and refilled), a bucket is dropped |
/// | [`with_max_pause`](Self::with_max_pause) | 60 s | the longest the server's word may close a bucket |
/// | [`with_default_pause`](Self::with_default_pause) | 1 s | how long a 429 without a hint closes a bucket |
#[must_use]
pub struct RateLimitLayer<C = TogetherClassifier, L = GovernorLimiter>
where
    L: Limiter,
{
    shared: Arc<Shared<C, L>>,
}

impl RateLimitLayer {
    /// A layer that enforces `table` with the in-process governor backend and Together's
    /// classifier.
    pub fn new(table: QuotaTable) -> Self {
        let shared = Shared::new(
            TogetherClassifier,
            Arc::new(GovernorLimiter::new()),
            table,
            KeyHasher::new(),
            Settings::default(),
        );
        Self {
            shared: Arc::new(shared),
        }
    }
}

impl Default for RateLimitLayer {
    /// Together's published limits ([`QuotaTable::together_defaults`]).
    fn default() -> Self {
        Self::new(QuotaTable::together_defaults())
    }
}

impl<C: Clone, L: Limiter> RateLimitLayer<C, L> {
    fn rebuild<C2, L2: Limiter>(
        &self,
        classifier: C2,
        limiter: Arc<L2>,
        change: impl FnOnce(&mut Settings, &mut KeyHasher),
    ) -> RateLimitLayer<C2, L2> {
        let mut settings = self.shared.settings.clone();
        let mut key_hasher = self.shared.key_hasher.clone();
        change(&mut settings, &mut key_hasher);
        let shared = Shared::new(
            classifier,
            limiter,
            self.shared.table.clone(),
            key_hasher,
            settings,
        );
        RateLimitLayer {
            shared: Arc::new(shared),
        }
    }

    fn with_settings(self, change: impl FnOnce(&mut Settings)) -> Self {
        let classifier = self.shared.classifier.clone();
        self.rebuild(
            classifier,
            Arc::clone(&self.shared.limiter),
            |settings, _| change(settings),
        )
    }

    /// How many requests may wait in one bucket at once.
    pub fn with_max_queue(self, max_queue: usize) -> Self {
        self.with_settings(|settings| settings.max_queue = max_queue)
    }

    /// The longest a request waits for its turn, unless it carries a [`MaxWait`](super::MaxWait).
    pub fn with_max_wait(self, max_wait: Duration) -> Self {
        self.with_settings(|settings| settings.max_wait = max_wait)
    }

    /// How many buckets are kept at most (0 counts as 1).
    pub fn with_max_buckets(self, max_buckets: usize) -> Self {
        self.with_settings(|settings| settings.max_buckets = max_buckets)
    }

    /// How long a bucket stays unused before it may be dropped. A bucket is never dropped
    /// before its rate has refilled, so dropping it does not hand out a fresh burst.
    pub fn with_idle_timeout(self, idle_timeout: Duration) -> Self {
        self.with_settings(|settings| settings.idle_timeout = idle_timeout)
    }

    /// The longest the server's hints may close a bucket; longer hints are cut to this.
    pub fn with_max_pause(self, max_pause: Duration) -> Self {
        self.with_settings(|settings| settings.max_pause = max_pause)
    }

    /// How long a 429 without any hint closes its bucket.
    pub fn with_default_pause(self, default_pause: Duration) -> Self {
        self.with_settings(|settings| settings.default_pause = default_pause)
    }

    /// Fingerprints API keys with this hasher, such as one with a secret shared by every
    /// process of a deployment.
    pub fn with_key_hasher(self, key_hasher: KeyHasher) -> Self {
        let classifier = self.shared.classifier.clone();
        self.rebuild(classifier, Arc::clone(&self.shared.limiter), |_, hasher| {
            *hasher = key_hasher
        })
    }

    /// Classifies requests with `classifier` instead.
    pub fn with_classifier<C2: Classify>(self, classifier: C2) -> RateLimitLayer<C2, L> {
        self.rebuild(classifier, Arc::clone(&self.shared.limiter), |_, _| {})
    }

    /// Makes the rate decisions with another backend.
    pub fn with_limiter<L2: Limiter>(self, limiter: L2) -> RateLimitLayer<C, L2> {
        let classifier = self.shared.classifier.clone();
        self.rebuild(classifier, Arc::new(limiter), |_, _| {})
    }
}

impl<C, L: Limiter> RateLimitLayer<C, L> {
    /// The quota table the layer enforces.
    pub fn table(&self) -> &QuotaTable {
        &self.shared.table
    }

    /// How many buckets are live now.
    pub fn live_buckets(&self) -> usize {
        self.shared.live_buckets()
    }
}

impl<S, C, L: Limiter> Layer<S> for RateLimitLayer<C, L> {
    type Service = RateLimit<S, C, L>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_shared(inner, Arc::clone(&self.shared))
    }
}

impl<C, L: Limiter> Clone for RateLimitLayer<C, L> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<C: fmt::Debug, L: Limiter + fmt::Debug> fmt::Debug for RateLimitLayer<C, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("shared", &self.shared)
            .finish()
    }
}
