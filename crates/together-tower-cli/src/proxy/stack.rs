//! The stack the proxy forwards through: the library's whole stack around hyper-util's
//! client, built through its public API as any user builds it.

use std::time::Duration;

use axum::body::Body;
use http::{Request, Response};
use http_body_util::Limited;
use together_tower::TogetherLayer;
use together_tower::body::BufferBodyLayer;
use together_tower::classify::EndpointClass;
use together_tower::limit::{Adaptation, Backend, LimitsBuilder};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, classify::TogetherClassifier};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder};

use super::config::TenantConfig;
use crate::CliError;

/// A client's request body as it enters the stack: cut past the size limit, and failed when
/// it stops coming for the idle timeout (the boxed `Body` holds a `TimeoutBody`).
pub type RequestBody = Limited<Body>;

/// The stack, boxed: one type for both backends.
pub type ProxyStack = BoxCloneSyncService<Request<RequestBody>, Response<Body>, BoxError>;

/// What the stack enforces.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// The quota table.
    pub table: QuotaTable,
    /// Whether rates follow the server's answers.
    pub adaptation: Adaptation,
    /// The longest a request waits for its turn before it is refused with a 429.
    pub max_wait: Duration,
    /// The largest request body buffered (and so retried).
    pub body_limit: usize,
    /// The tenants of a managed proxy.
    pub tenants: Vec<TenantConfig>,
}

/// `table` with chat and completions at `rpm` requests a minute, `burst` back to back; their
/// group keeps its token budget and its other settings.
pub fn with_chat_rate(table: &QuotaTable, rpm: u32, burst: u32) -> Result<QuotaTable, CliError> {
    let group = table.group_of(EndpointClass::Chat);
    let name = group.map_or("chat", |group| group.name()).to_owned();
    let rate = Rate::per_minute(rpm).with_burst(burst);
    let quota = group.map_or(GroupQuota::rate(rate), |group| {
        group.quota().with_rate(rate)
    });
    table
        .to_builder()
        .group(name.clone(), quota)
        .class(EndpointClass::Chat, name.clone())
        .class(EndpointClass::Completions, name)
        .build()
        .map_err(|error| CliError::Usage(format!("--rpm {rpm} --burst {burst}: {error}")))
}

impl StackSettings {
    fn limits(&self) -> LimitsBuilder {
        let mut builder = Limits::builder(self.table.clone())
            .adaptation(self.adaptation)
            .max_wait(self.max_wait);
        for tenant in &self.tenants {
            builder = builder.tenant_weight(&tenant.name, tenant.weight);
            if let Some(cap) = tenant.cap {
                builder = builder.tenant_cap(&tenant.name, cap);
            }
        }
        builder
    }
}

/// The stack `settings` describe, its quota kept in this process or, given `redis`, in
/// Redis, shared with every proxy given the same Redis.
pub fn build(
    settings: &StackSettings,
    redis: Option<together_tower_redis::RedisBackend>,
) -> ProxyStack {
    match redis {
        Some(redis) => around_client(settings, settings.limits().backend(redis).build()),
        None => around_client(settings, settings.limits().build()),
    }
}

fn around_client<L: Backend>(
    settings: &StackSettings,
    limits: Limits<TogetherClassifier, L>,
) -> ProxyStack {
    let layer = TogetherLayer::new(limits)
        .with_buffer(BufferBodyLayer::new().with_limit(settings.body_limit));
    let stack = ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(Body::new))
        .layer(layer)
        .service(crate::client::http_client());
    BoxCloneSyncService::new(stack)
}
