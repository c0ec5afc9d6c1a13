//! The HTTP client and the stack a run sends through.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clap::ValueEnum;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use together_sim::Class;
use together_tower::TogetherLayer;
use together_tower::body::{BufferBodyLayer, BufferedBody};
use together_tower::classify::EndpointClass;
use together_tower::limit::{Adaptation, Backend, BucketSnapshot, Limits};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::retry::{RetryLayer, RetryPolicy};
use tower::retry::budget::TpsBudget;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder};

use crate::CliError;
use crate::observe::{Observations, ObserveLayer};

/// The request body type the stack takes.
pub type Body = Full<Bytes>;

/// An answer's body, boxed: one type for every mode.
pub type AnswerBody = BoxBody<Bytes, hyper::Error>;

/// The stack, boxed: one type for every mode.
pub type Stack = BoxCloneSyncService<Request<Body>, Response<AnswerBody>, BoxError>;

/// The observed HTTP client below the stack.
type Observed =
    BoxCloneSyncService<Request<BufferedBody<Body>>, Response<hyper::body::Incoming>, BoxError>;

/// Reads the live buckets of a stack's limits, whichever backend keeps them.
pub type Snapshots = Arc<dyn Fn() -> Vec<BucketSnapshot> + Send + Sync>;

/// How a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// The whole stack, with the table's rates only: waits its turn, then sends.
    Static,
    /// The whole stack, with rates that follow the server's stated limits, 429s and 503s.
    #[value(alias = "limited")]
    Adaptive,
    /// Today's SDK behaviour: no limiter, retries on 429 and 5xx by the server's hints.
    RetryOnly,
}

/// The endpoints a run can exercise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
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
}

impl Endpoint {
    /// The path under the base URL.
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Images => "/v1/images/generations",
            Endpoint::Rerank => "/v1/rerank",
        }
    }

    /// A model Together (and the simulator) serves for this endpoint.
    pub fn default_model(self) -> &'static str {
        match self {
            Endpoint::Chat | Endpoint::Completions => "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            Endpoint::Embeddings => "BAAI/bge-large-en-v1.5",
            Endpoint::Images => "black-forest-labs/FLUX.1-schnell",
            Endpoint::Rerank => "Salesforce/Llama-Rank-V1",
        }
    }

    /// The simulator's class for this endpoint.
    pub fn sim_class(self) -> Class {
        match self {
            Endpoint::Chat => Class::Chat,
            Endpoint::Completions => Class::Completions,
            Endpoint::Embeddings => Class::Embeddings,
            Endpoint::Images => Class::Images,
            Endpoint::Rerank => Class::Rerank,
        }
    }

    fn class(self) -> EndpointClass {
        match self {
            Endpoint::Chat => EndpointClass::Chat,
            Endpoint::Completions => EndpointClass::Completions,
            Endpoint::Embeddings => EndpointClass::Embeddings,
            Endpoint::Images => EndpointClass::Images,
            Endpoint::Rerank => EndpointClass::Rerank,
        }
    }

    /// The JSON body of request number `index`, asking for at most `max_tokens` (chat and
    /// completions).
    pub fn body(self, model: &str, index: u64, max_tokens: u32) -> serde_json::Value {
        use serde_json::json;
        let text =
            format!("Request {index} from together-tower bench: say hello in one short sentence.");
        match self {
            Endpoint::Chat => {
                json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens})
            }
            Endpoint::Completions => {
                json!({"model": model, "prompt": text, "max_tokens": max_tokens})
            }
            Endpoint::Embeddings => json!({"model": model, "input": [text]}),
            Endpoint::Images => json!({"model": model, "prompt": text, "n": 1}),
            Endpoint::Rerank => {
                json!({"model": model, "query": text, "documents": ["hello", "goodbye", "say hello"]})
            }
        }
    }
}

/// hyper-util's pooled client, for `http` and `https` base URLs alike.
pub fn http_client<B>() -> Client<HttpsConnector<HttpConnector>, B>
where
    B: http_body::Body + Send,
    B::Data: Send,
{
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new()).build(connector)
}

/// What a run's stack enforces: its mode, and the client's quota for one endpoint.
#[derive(Debug, Clone)]
pub struct StackSettings {
    /// How the stack waits and learns (or does not: retry-only).
    pub mode: Mode,
    /// The endpoint whose class the quota is for.
    pub endpoint: Endpoint,
    /// Requests a minute.
    pub rpm: u32,
    /// Requests that may go back to back.
    pub burst: u32,
    /// Tokens a minute (prompt and completion), if the quota has a token budget. Its burst is
    /// one second of it, as Together enforces its per-minute limits per second.
    pub tpm: Option<u32>,
    /// Retries per request at most.
    pub max_retries: u32,
    /// Tenants' weights by name.
    pub tenant_weights: Vec<(String, u32)>,
}

impl StackSettings {
    /// The quota table: the settings' rates for the endpoint's class, per model.
    fn table(&self) -> Result<QuotaTable, CliError> {
        let mut quota = GroupQuota::rate(Rate::per_minute(self.rpm).with_burst(self.burst));
        if let Some(tpm) = self.tpm {
            quota = quota.with_tokens(Rate::per_minute(tpm).with_burst((tpm / 60).max(1)));
        }
        QuotaTable::builder()
            .group("bench", quota.per_model(true))
            .class(self.endpoint.class(), "bench")
            .build()
            .map_err(|error| {
                let tpm = self
                    .tpm
                    .map(|tpm| format!(" --tpm {tpm}"))
                    .unwrap_or_default();
                CliError::Usage(format!(
                    "--rpm {} --burst {}{tpm}: {error}",
                    self.rpm, self.burst
                ))
            })
    }
}

/// The stack `settings` describe, and a reader of the limits it waits in (none in retry-only
/// mode): kept in this process, or in Redis when `redis` is given (so processes share it).
/// Built through the library's public API, as a user would build it.
pub fn stack(
    settings: &StackSettings,
    observations: &Arc<Observations>,
    redis: Option<together_tower_redis::RedisBackend>,
) -> Result<(Stack, Option<Snapshots>), CliError> {
    let client: Observed = BoxCloneSyncService::new(
        ServiceBuilder::new()
            .map_err(BoxError::from)
            .layer(ObserveLayer(Arc::clone(observations)))
            .service(http_client()),
    );
    let retry = RetryPolicy::new().with_max_retries(settings.max_retries);
    let adaptation = match settings.mode {
        Mode::Static => Adaptation::fixed(),
        Mode::Adaptive => Adaptation::adaptive(),
        Mode::RetryOnly => {
            // The SDKs have no retry budget: only their attempt count bounds a retry storm.
            // Their backoff without a hint starts at 0.5 s and doubles up to 8 s.
            let unbounded = TpsBudget::new(Duration::from_secs(1), 1_000_000, 1_000.0);
            let retry = retry.with_backoff(Duration::from_millis(500), Duration::from_secs(8));
            let stack = ServiceBuilder::new()
                .map_response(|response: Response<hyper::body::Incoming>| {
                    response.map(BodyExt::boxed)
                })
                .layer(BufferBodyLayer::new())
                .layer(RetryLayer::new(retry.with_budget(unbounded)))
                .service(client);
            return Ok((BoxCloneSyncService::new(stack), None));
        }
    };
    let table = settings.table()?;
    let mut builder = Limits::builder(table)
        .adaptation(adaptation)
        .max_wait(Duration::from_secs(600))
        .max_queue(1 << 20);
    for (name, weight) in &settings.tenant_weights {
        builder = builder.tenant_weight(name, *weight);
    }
    Ok(match redis {
        Some(redis) => limited(builder.backend(redis).build(), retry, client),
        None => limited(builder.build(), retry, client),
    })
}

/// The whole stack around `client`, waiting in `limits`.
fn limited<L: Backend>(
    limits: Limits<together_tower::classify::TogetherClassifier, L>,
    retry: RetryPolicy,
    client: Observed,
) -> (Stack, Option<Snapshots>) {
    let stack = ServiceBuilder::new()
        .map_response(|response: Response<_>| response.map(BodyExt::boxed))
        .layer(TogetherLayer::new(limits.clone()).with_retry(retry))
        .service(client);
    let snapshots: Snapshots = Arc::new(move || limits.snapshot());
    (BoxCloneSyncService::new(stack), Some(snapshots))
}
