//! The admission path: a request arrives ([`admit`]), finds its bucket, and goes at once,
//! waits its turn ([`wait`]) or is refused.
//!
//! [`Inner`] is what every clone of a [`Limits`](super::Limits) shares: the table, the
//! classifier, the live buckets and the settings; its methods here are the arrival.

use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use http::Request;

use self::cap::TenantCaps;
use super::backend::Backend;
use super::bucket::map::BucketMap;
use super::bucket::{BucketContext, BucketKey};
use super::estimate::EstimateTokens;
use super::jobs::JobTimes;
use super::share::ShareSettings;
use crate::body::RequestMeta;
use crate::classify::{Classify, EndpointClass};
use crate::key::KeyHasher;

pub(crate) mod admit;
pub(crate) mod cap;
pub(crate) mod wait;

/// A request extension that sets how long this request may wait for its turn, overriding the
/// limits' `max_wait`. `MaxWait(Duration::ZERO)` means "send now or fail".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxWait(pub Duration);

/// Tunables, with the defaults documented on [`LimitsBuilder`].
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub(crate) max_queue: usize,
    pub(crate) max_wait: Duration,
    pub(crate) max_buckets: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) job_times: JobTimes,
    pub(crate) shares: ShareSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_queue: 1_024,
            max_wait: Duration::from_secs(30),
            max_buckets: 65_536,
            idle_timeout: Duration::from_secs(60),
            job_times: JobTimes::default(),
            shares: ShareSettings::default(),
        }
    }
}

/// What the clones of one [`Limits`] share.
pub(crate) struct Inner<C, L: Backend> {
    pub(crate) classifier: C,
    pub(crate) key_hasher: KeyHasher,
    pub(crate) settings: Settings,
    pub(crate) context: Arc<BucketContext<L>>,
    pub(crate) buckets: BucketMap<L>,
    pub(crate) estimate: Box<dyn EstimateTokens>,
    /// Hashes model names into bucket keys; seeded per process.
    pub(crate) model_hasher: std::hash::RandomState,
    /// Capped tenants' own turns.
    pub(crate) caps: Arc<TenantCaps>,
}

impl<C, L: Backend> Inner<C, L> {
    /// The class of a request, and the key of its bucket; `None` if the class is not limited.
    pub(crate) fn bucket_key<B>(&self, request: &Request<B>) -> Option<(EndpointClass, BucketKey)>
    where
        C: Classify,
    {
        let class = self.classifier.classify(request);
        Some((class, self.bucket_key_for(class, request)?))
    }

    /// The key of the bucket of a request of `class`; `None` if the class is not limited.
    pub(crate) fn bucket_key_for<B>(
        &self,
        class: EndpointClass,
        request: &Request<B>,
    ) -> Option<BucketKey>
    where
        C: Classify,
    {
        let group = self.context.table.group_id(class)?;
        let model = if self.context.table.group(group).per_model() {
            request
                .extensions()
                .get::<RequestMeta>()
                .and_then(|meta| meta.model.as_deref())
                .map_or(0, |model| self.model_hasher.hash_one(model).max(1))
        } else {
            0
        };
        let key = BucketKey {
            key: self
                .key_hasher
                .fingerprint_request(&self.classifier, request),
            group,
            model,
        };
        Some(key)
    }
}
