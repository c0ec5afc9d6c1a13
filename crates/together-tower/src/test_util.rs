//! For testing your own code that calls Together through this crate: ready-made answers, and a
//! fake Together that answers a tower-test mock the way the simulator would (feature
//! `test-util`).
//!
//! ```
//! use std::time::Duration;
//! use together_tower::test_util::{FakeTogether, chat_request};
//! use together_tower::{Limits, TogetherLayer};
//! use tower::{Layer, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let (mock, handle) = tower_test::mock::pair();
//! let together = FakeTogether::new().per_second(2).serve(handle);
//! let stack = TogetherLayer::new(Limits::default()).layer(mock);
//! let answer = stack.oneshot(chat_request("my-test-key")).await.unwrap();
//! assert_eq!((answer.status().as_u16(), together.seen().ok), (200, 1));
//! # }
//! ```
//!
//! The fake answers in virtual time: in a test with paused tokio time (`start_paused`), a whole
//! run of waits and retries takes no real time.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use tokio::time::Instant;
use tower_test::mock::Handle;

use crate::classify::{EndpointClass, classify_path};
use crate::key::bearer_token;

/// A chat completion answer naming `model`, that used `tokens` tokens.
pub fn chat_completion(model: &str, text: &str, tokens: u64) -> Response<String> {
    json(
        StatusCode::OK,
        serde_json::json!({
            "id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens / 2, "completion_tokens": tokens - tokens / 2, "total_tokens": tokens},
        }),
    )
}

/// An embeddings answer: `inputs` vectors of four numbers, in order.
pub fn embeddings(model: &str, inputs: usize) -> Response<String> {
    let data: Vec<_> = (0..inputs)
        .map(|index| serde_json::json!({"object": "embedding", "index": index, "embedding": [0.5, -0.5, 0.5, -0.5]}))
        .collect();
    json(
        StatusCode::OK,
        serde_json::json!({"object": "list", "model": model, "data": data, "usage": {"prompt_tokens": inputs, "total_tokens": inputs}}),
    )
}

/// Together's 429: its error body, `Retry-After` in whole seconds, and the precise wait in
/// `x-ratelimit-reset`.
pub fn rate_limited(retry_after: Duration) -> Response<String> {
    let mut response = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({"error": {"message": "You have exceeded your request rate limit.", "type": "dynamic_request_limited", "param": null, "code": null}}),
    );
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let headers = response.headers_mut();
    headers.insert(http::header::RETRY_AFTER, seconds.into());
    headers.insert(
        "x-ratelimit-reset",
        http::HeaderValue::from_str(&format!("{:.3}", retry_after.as_secs_f64()))
            .unwrap_or(http::HeaderValue::from_static("1")),
    );
    headers.insert("x-ratelimit-remaining", 0.into());
    response
}

/// Together's 503: overloaded, or "slow down" below the limit.
pub fn unavailable() -> Response<String> {
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error": {"message": "The server is overloaded or not ready yet.", "type": "server_error", "param": null, "code": null}}),
    )
}

/// A chat completion request to Together with `key`, naming a model Together serves.
pub fn chat_request(key: &str) -> Request<Full<Bytes>> {
    Request::post("https://api.together.xyz/v1/chat/completions")
        .header(http::header::AUTHORIZATION, format!("Bearer {key}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}"#,
        )))
        .expect("a fixed request is valid")
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<String> {
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What a [`FakeTogether`] answered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Seen {
    /// Requests it received.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answered 429.
    pub rate_limited: u64,
    /// Answered 503.
    pub unavailable: u64,
    /// Answered 401 (no key) or 404 (unknown endpoint).
    pub errors: u64,
}

/// A fake Together for unit tests: it answers chat, completions and embeddings requests, limits
/// each key to `per_second` requests (a GCRA, burst 1, in tokio's time) and answers beyond that
/// with [`rate_limited`], and fails every `fail_every`-th request it accepts with
/// [`unavailable`]. Clones share what it saw.
///
/// Like the servers the [guide](crate::guide) describes, it allows a request up to 2 ms before
/// its exact turn (the stack's pacing tolerance, see
/// [`Rate::tolerance`](crate::quota::Rate::tolerance)), or half an interval if that is less;
/// [`FakeTogether::tolerance`] sets another.
#[derive(Debug, Clone)]
pub struct FakeTogether {
    per_second: Option<u32>,
    tolerance: Option<Duration>,
    fail_every: Option<u64>,
    state: Arc<Mutex<FakeState>>,
}

#[derive(Debug, Default)]
struct FakeState {
    seen: Seen,
    /// When each key (by fingerprint) may next send.
    next: std::collections::HashMap<u64, Instant>,
}

impl Default for FakeTogether {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeTogether {
    /// A fake that limits nothing and never fails.
    pub fn new() -> Self {
        Self {
            per_second: None,
            tolerance: None,
            fail_every: None,
            state: Arc::default(),
        }
    }

    /// Limits each key to `per_second` requests a second.
    pub fn per_second(mut self, per_second: u32) -> Self {
        self.per_second = Some(per_second.max(1));
        self
    }

    /// Allows a request up to `tolerance` before its exact turn (by default the smaller of
    /// 2 ms and half an interval, as the stack's own pacing). Zero makes it exact.
    pub fn tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = Some(tolerance);
        self
    }

    /// Fails every `every`-th request it would otherwise accept with a 503.
    pub fn fail_every(mut self, every: u64) -> Self {
        self.fail_every = Some(every.max(1));
        self
    }

    /// What it answered so far.
    pub fn seen(&self) -> Seen {
        self.lock().seen
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The answer to one request.
    pub fn answer<B>(&self, request: &Request<B>) -> Response<String> {
        let mut state = self.lock();
        state.seen.requests += 1;
        let Some(key) = bearer_token(request.headers()) else {
            state.seen.errors += 1;
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": {"message": "Invalid API key provided.", "type": "invalid_api_key"}}),
            );
        };
        let key = crate::key::KeyHasher::new().fingerprint(key).as_u64();
        if let Some(per_second) = self.per_second {
            let now = Instant::now();
            let interval = Duration::from_secs(1) / per_second;
            // By default, the stack's own pacing tolerance for this rate.
            let tolerance = self
                .tolerance
                .unwrap_or_else(|| crate::quota::Rate::per_second(per_second).tolerance());
            let next = *state.next.get(&key).unwrap_or(&now);
            if next > now + tolerance {
                state.seen.rate_limited += 1;
                return rate_limited(next - now);
            }
            state.next.insert(key, now.max(next) + interval);
        }
        let accepted = state.seen.ok + state.seen.unavailable + 1;
        if self.fail_every.is_some_and(|every| accepted % every == 0) {
            state.seen.unavailable += 1;
            return unavailable();
        }
        let model = "meta-llama/Llama-3.3-70B-Instruct-Turbo";
        match classify_path(request.method(), request.uri().path()) {
            EndpointClass::Chat | EndpointClass::Completions => {
                state.seen.ok += 1;
                chat_completion(model, "Hello.", 20)
            }
            EndpointClass::Embeddings => {
                state.seen.ok += 1;
                embeddings("BAAI/bge-large-en-v1.5", 1)
            }
            _ => {
                state.seen.errors += 1;
                json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": {"message": "Unknown endpoint.", "type": "not_found"}}),
                )
            }
        }
    }

    /// Answers every request the mock `handle` receives until the mock is dropped, from a task
    /// of its own. Returns a clone to read what it saw.
    pub fn serve<B: Send + 'static>(
        self,
        mut handle: Handle<Request<B>, Response<String>>,
    ) -> Self {
        let together = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                send.send_response(together.answer(&request));
            }
        });
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_fake_limits_each_key_and_says_when_to_come_back() {
        let fake = FakeTogether::new().per_second(2).tolerance(Duration::ZERO);
        let chat = |key: &str| chat_request(key).map(|_| ());
        assert_eq!(fake.answer(&chat("a")).status(), 200);
        let refused = fake.answer(&chat("a"));
        assert_eq!(refused.status(), 429);
        assert_eq!(refused.headers()["x-ratelimit-reset"], "0.500");
        assert_eq!(fake.answer(&chat("b")).status(), 200);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(fake.answer(&chat("a")).status(), 200);
        assert_eq!(
            fake.seen(),
            Seen {
                requests: 4,
                ok: 3,
                rate_limited: 1,
                ..Seen::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_stack_at_its_own_rate_meets_no_429_from_the_fake() {
        use tower::{Layer, ServiceExt};

        use crate::limit::{Adaptation, Limits, RateLimitLayer};
        use crate::quota::{GroupQuota, QuotaTable, Rate};

        let table = QuotaTable::builder()
            .group("chat", GroupQuota::rate(Rate::per_second(10)))
            .class(EndpointClass::Chat, "chat")
            .build()
            .unwrap();
        let limits = Limits::builder(table)
            .adaptation(Adaptation::fixed())
            .build();
        let (mock, handle) = tower_test::mock::pair();
        let fake = FakeTogether::new().per_second(10).serve(handle);
        let stack = RateLimitLayer::new(limits).layer(mock);
        for _ in 0..20 {
            let answer = stack.clone().oneshot(chat_request("k")).await.unwrap();
            assert_eq!(answer.status(), 200);
        }
        assert_eq!(fake.seen().rate_limited, 0);
    }
}
