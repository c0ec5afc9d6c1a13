//! The rate limit layer's behaviour, on paused tokio time.

mod adaptive;
mod backends;
mod bounds;
mod closures;
mod hostile;
mod jobs;
mod map;
mod pacing;
mod servers;
mod shares;
mod streams;
mod tokens;

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::{Request, Response};
use tokio::time::Instant;
use tower::Service;

use super::error::SlotsBusy;
use super::{Adaptation, Limits, LimitsBuilder, RateLimit, RateLimitLayer};
use crate::classify::EndpointClass;
use crate::quota::{GroupQuota, QuotaTable, Rate};

/// Limits that keep the table's rates, for tests of the pacing and the server's closures.
fn static_limits(table: QuotaTable) -> LimitsBuilder {
    Limits::builder(table).adaptation(Adaptation::fixed())
}

const CHAT: &str = "/v1/chat/completions";
const COMPLETIONS: &str = "/v1/completions";
const EMBEDDINGS: &str = "/v1/embeddings";
const FINE_TUNES: &str = "/v1/fine-tunes";

fn request(path: &str, key: &str, label: impl Into<String>) -> Request<String> {
    let mut builder = Request::post(path).header("x-label", label.into());
    if !key.is_empty() {
        builder = builder.header(AUTHORIZATION, format!("Bearer {key}"));
    }
    builder.body(String::new()).unwrap()
}

/// A table with one rate for chat and completions, another for embeddings. Pacing is exact
/// (no tolerance), so the tests can name the millisecond of every turn.
fn table(chat: Rate) -> QuotaTable {
    let chat = chat.with_tolerance(Duration::ZERO);
    QuotaTable::builder()
        .group("chat", GroupQuota::rate(chat))
        .group("embeddings", GroupQuota::rate(chat))
        .group("fine-tune-create", GroupQuota::concurrency(2))
        .class(EndpointClass::Chat, "chat")
        .class(EndpointClass::Completions, "chat")
        .class(EndpointClass::Embeddings, "embeddings")
        .class(EndpointClass::FineTuneCreate, "fine-tune-create")
        .build()
        .unwrap()
}

/// When each request reached the inner service (virtual time since the test began), by label.
#[derive(Clone)]
struct Arrivals {
    start: Instant,
    seen: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Arrivals {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            seen: Arc::default(),
        }
    }

    fn record(&self, request: &Request<String>) -> usize {
        let label = request.headers()["x-label"].to_str().unwrap().to_owned();
        let mut seen = self.seen.lock().unwrap();
        seen.push((self.start.elapsed(), label));
        seen.len() - 1
    }

    fn labels(&self) -> Vec<String> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, label)| label.clone())
            .collect()
    }

    fn times_ms(&self) -> Vec<u128> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| at.as_millis())
            .collect()
    }
}

/// An inner service that records arrivals and answers with `respond(arrival index)`.
fn recorder(
    arrivals: Arrivals,
    respond: impl Fn(usize) -> Response<String> + Clone + Send + Sync + 'static,
) -> impl Service<Request<String>, Response = Response<String>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ Sync {
    let arrivals = arrivals.clone();
    tower::service_fn(move |request: Request<String>| {
        let index = arrivals.record(&request);
        let response = respond(index);
        async move { Ok::<_, Infallible>(response) }
    })
}

fn ok(_: usize) -> Response<String> {
    Response::new(String::new())
}

fn chat_requests(count: usize, key: &str) -> Vec<Request<String>> {
    (0..count)
        .map(|i| request(CHAT, key, i.to_string()))
        .collect()
}
