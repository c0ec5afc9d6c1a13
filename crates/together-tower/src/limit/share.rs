//! Who a request is for, and how urgent it is: the extensions that order a bucket's
//! waiters, and the limits' settings for them. What users see is in the [module
//! docs](super); how the queue orders by them, in `bucket/fair.rs`.

use std::fmt;
use std::hash::Hasher;
use std::sync::Arc;
use std::time::Duration;

use siphasher::sip::SipHasher13;

use crate::quota::Rate;

/// How urgent a request is. A request extension; `Normal` when a request carries none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// Someone is waiting for the answer: goes before every other waiter.
    Interactive,
    /// The default.
    #[default]
    Normal,
    /// Batch work that can wait: goes when nothing more urgent waits, or when its minimum
    /// share of the turns is due.
    Background,
}

impl Priority {
    /// Every priority, the most urgent first.
    pub const ALL: [Priority; 3] = [
        Priority::Interactive,
        Priority::Normal,
        Priority::Background,
    ];

    /// The priority's name, as tracing and metrics label it.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Interactive => "interactive",
            Priority::Normal => "normal",
            Priority::Background => "background",
        }
    }

    /// Its place in [`Priority::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Who a request is for: a team, a customer, a user of a gateway. A request extension; the
/// turns of a bucket are shared fairly between the tenants waiting in it.
///
/// Known by a 64-bit hash of its name; a name longer than 128 bytes is kept as its first bytes
/// and a hash, as model names are.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Tenant {
    name: Arc<str>,
    id: u64,
}

impl Tenant {
    /// The tenant called `name`.
    pub fn new(name: &str) -> Self {
        let name: Arc<str> = Arc::from(crate::model_name::bounded_str(name).as_ref());
        Self {
            id: tenant_id(&name),
            name,
        }
    }

    /// Its name (bounded in length).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hash the queues know it by.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }
}

impl fmt::Debug for Tenant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Tenant").field(&self.name).finish()
    }
}

/// The most of a bucket's quota one tenant may take, even when no other tenant waits: for the
/// teams a gateway serves that must not spend more than they were given. See
/// [`LimitsBuilder::tenant_cap`](super::LimitsBuilder::tenant_cap).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TenantCap {
    /// At most this rate, in each bucket the tenant's requests wait in (its burst is one
    /// request: a cap is a pace, not a pool).
    Rate(Rate),
    /// At most this share (0 to 1) of each bucket's request rate in force; 1 or more caps
    /// nothing, and 0 refuses the tenant's requests (after `max_wait`, or at once when its
    /// next turn is further off).
    Share(f64),
}

/// The id of the tenant called `name`, under a fixed key: a weight or a cap set by name must
/// find the tenant's requests. The id never leaves the process.
pub(crate) fn tenant_id(name: &str) -> u64 {
    let mut hasher = SipHasher13::new();
    hasher.write(name.as_bytes());
    hasher.finish()
}

/// The id of the tenant of requests that name none.
pub(crate) const NO_TENANT: u64 = 0;

/// How a request waits, from its extensions and the limits' settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Who {
    pub(crate) priority: Priority,
    /// `None` for the default tenant of requests that name none.
    pub(crate) tenant: Option<Tenant>,
    pub(crate) weight: u32,
}

impl Who {
    /// The id the queue shares turns by.
    pub(crate) fn tenant_id(&self) -> u64 {
        self.tenant.as_ref().map_or(NO_TENANT, Tenant::id)
    }

    /// The tenant's name, if the request named one.
    pub(crate) fn tenant_name(&self) -> Option<&str> {
        self.tenant.as_ref().map(Tenant::name)
    }
}

impl Default for Who {
    fn default() -> Self {
        Self {
            priority: Priority::Normal,
            tenant: None,
            weight: 1,
        }
    }
}

/// Reads a request's tenant from its headers, for requests that carry no [`Tenant`].
pub(crate) type TenantFrom = Arc<dyn Fn(&http::HeaderMap) -> Option<Tenant> + Send + Sync>;

/// Reads a request's priority from its headers, for requests that carry no [`Priority`].
pub(crate) type PriorityFrom = Arc<dyn Fn(&http::HeaderMap) -> Option<Priority> + Send + Sync>;

/// The limits' settings for priorities and tenants.
#[derive(Clone)]
pub(crate) struct ShareSettings {
    /// Each priority's minimum share of a queue's turns while it waits, in millionths.
    pub(crate) min_share: [u32; 3],
    /// Each priority's own `max_wait`, if it has one.
    pub(crate) max_wait: [Option<Duration>; 3],
    /// Tenants' weights by id; 1 for any other.
    pub(crate) weights: std::collections::HashMap<u64, u32>,
    /// The most places one tenant may hold in a bucket's queue, if bounded.
    pub(crate) max_queue_per_tenant: Option<usize>,
    /// Tenants' caps by id.
    pub(crate) caps: std::collections::HashMap<u64, TenantCap>,
    pub(crate) tenant_from: Option<TenantFrom>,
    pub(crate) priority_from: Option<PriorityFrom>,
}

impl fmt::Debug for ShareSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareSettings")
            .field("min_share", &self.min_share)
            .field("max_wait", &self.max_wait)
            .field("weighted_tenants", &self.weights.len())
            .field("max_queue_per_tenant", &self.max_queue_per_tenant)
            .field("capped_tenants", &self.caps.len())
            .field("tenant_from", &self.tenant_from.is_some())
            .field("priority_from", &self.priority_from.is_some())
            .finish()
    }
}

impl Default for ShareSettings {
    fn default() -> Self {
        Self {
            min_share: [0, 200_000, 100_000],
            max_wait: [None; 3],
            weights: std::collections::HashMap::new(),
            max_queue_per_tenant: None,
            caps: std::collections::HashMap::new(),
            tenant_from: None,
            priority_from: None,
        }
    }
}

impl ShareSettings {
    /// How a request waits: by its extensions, else by what the functions read from its
    /// headers, else as [`Who::default`].
    pub(crate) fn who<B>(&self, request: &http::Request<B>) -> Who {
        let priority = self.priority(request);
        let tenant = match request.extensions().get::<Tenant>() {
            Some(tenant) => Some(tenant.clone()),
            None => (self.tenant_from.as_ref()).and_then(|from| from(request.headers())),
        };
        let weight = tenant
            .as_ref()
            .and_then(|tenant| self.weights.get(&tenant.id()).copied())
            .unwrap_or(1);
        Who {
            priority,
            tenant,
            weight,
        }
    }

    /// The request's priority: its extension, else what the function reads, else `Normal`.
    fn priority<B>(&self, request: &http::Request<B>) -> Priority {
        match request.extensions().get::<Priority>() {
            Some(priority) => *priority,
            None => (self.priority_from.as_ref())
                .and_then(|from| from(request.headers()))
                .unwrap_or_default(),
        }
    }

    /// The priority's own `max_wait`, if the request's priority has one.
    pub(crate) fn max_wait<B>(&self, request: &http::Request<B>) -> Option<Duration> {
        if self.max_wait.iter().all(Option::is_none) {
            // The common case: nothing to look up.
            return None;
        }
        self.max_wait[self.priority(request).index()]
    }
}
