//! [`ModelCheckLayer`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tower_layer::Layer;

use super::list::{Cached, FAILURE_TTL, FETCH_TIMEOUT, ModelList};
use super::service::{ModelCheck, Shared};

/// Applies [`ModelCheck`].
#[derive(Debug, Clone)]
#[must_use]
pub struct ModelCheckLayer {
    list: Arc<ModelList>,
}

impl ModelCheckLayer {
    /// A check that keeps the models list for 10 minutes.
    pub fn new() -> Self {
        Self::with_ttl(Duration::from_secs(600))
    }

    /// A check that keeps the models list for `ttl`.
    pub fn with_ttl(ttl: Duration) -> Self {
        Self::with_settings(ttl, FETCH_TIMEOUT, FAILURE_TTL)
    }

    /// The longest a fetch of the models list may take (5 s by default). Every 404 that waits
    /// for the fetch waits at most this long before it is handed back as it came.
    pub fn fetch_timeout(self, timeout: Duration) -> Self {
        Self::with_settings(self.list.ttl, timeout, self.list.failure_ttl)
    }

    /// How long a failed fetch is remembered (30 s by default): meanwhile a 404 is handed
    /// back as it came, without asking for the list again.
    pub fn failure_ttl(self, ttl: Duration) -> Self {
        Self::with_settings(self.list.ttl, self.list.fetch_timeout, ttl)
    }

    fn with_settings(ttl: Duration, fetch_timeout: Duration, failure_ttl: Duration) -> Self {
        Self {
            list: Arc::new(ModelList {
                ttl,
                fetch_timeout,
                failure_ttl,
                cached: Mutex::new(Cached::Nothing),
            }),
        }
    }
}

impl Default for ModelCheckLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone> Layer<S> for ModelCheckLayer {
    type Service = ModelCheck<S>;

    fn layer(&self, inner: S) -> Self::Service {
        let shared = Shared {
            spare: Arc::new(std::sync::Mutex::new(inner.clone())),
            list: Arc::clone(&self.list),
            last_ask: std::sync::Mutex::new(None),
        };
        ModelCheck {
            inner,
            shared: Arc::new(shared),
        }
    }
}
