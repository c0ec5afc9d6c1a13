//! The layers composed in the one order that works.

use tower_layer::Layer;

use crate::body::{BufferBody, BufferBodyLayer};
use crate::classify::TogetherClassifier;
use crate::limit::{Backend, Limits, LocalBackend, RateLimit, RateLimitLayer};
use crate::models::{ModelCheck, ModelCheckLayer};
use crate::retry::{Retry, RetryLayer, RetryPolicy};

/// The service [`TogetherLayer`] builds around a client `S`.
pub type TogetherService<S, C = TogetherClassifier, L = LocalBackend> =
    BufferBody<ModelCheck<Retry<RateLimit<S, C, L>, C>>>;

/// BufferBody, then the model check, then retry, then rate limit, around any HTTP client:
///
/// ```text
/// caller ─► BufferBody ─► ModelCheck ─► Retry ─► RateLimit ─► client ─► Together
/// ```
///
/// The body is read once (so it can be sent again, and its `model` read); each attempt,
/// retries included, waits its turn in the rate limiter; the retry layer sees every answer and
/// the limiter learns from each 429; a 404 for an unknown model becomes
/// [`ModelNotFound`](crate::models::ModelNotFound), the models list fetched through the rest
/// of the stack.
///
/// # The client's body type
///
/// The client below the stack receives `http::Request<BufferedBody<B>>`, where `B` is the
/// caller's body type. If the compiler says the client does not implement `Service` for that
/// request, the client wants a body type of its own:
///
/// | client | put below the stack |
/// |---|---|
/// | hyper-util `Client` | the client itself, built with `.build_http::<BufferedBody<B>>()` |
/// | reqwest | [`client::Reqwest::new(client)`](crate::client) (feature `reqwest`) |
/// | tonic `Channel` | [`client::Tonic::new(channel)`](crate::client) (feature `tonic`) |
/// | async-openai | the reqwest stack, through [`client::async_openai::http_service`](crate::client) |
/// | anything else | `.map_request(\|request: http::Request<_>\| request.map(YourBody::new))` |
///
/// Give [`Limits`] a classifier of your own ([`LimitsBuilder::classifier`](crate::limit::LimitsBuilder::classifier))
/// when the client does not call Together's HTTP paths: a gRPC service, or a gateway of your own.
///
/// # Example
///
/// ```
/// use http::{Request, Response};
/// use http_body_util::Full;
/// use bytes::Bytes;
/// use tower::{Service, ServiceBuilder, ServiceExt};
/// use together_tower::TogetherLayer;
/// use together_tower::body::BufferedBody;
/// use together_tower::limit::Limits;
/// use together_tower::quota::QuotaTable;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower::BoxError> {
/// # let client = tower::service_fn(|_: Request<BufferedBody<Full<Bytes>>>| async {
/// #     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
/// # });
/// let limits = Limits::new(QuotaTable::together_defaults());
/// let mut together = ServiceBuilder::new()
///     .layer(TogetherLayer::new(limits))
///     .service(client);
/// let request = Request::post("https://api.together.xyz/v1/embeddings")
///     .header("authorization", "Bearer my-key")
///     .body(Full::new(Bytes::from_static(br#"{"model":"m","input":["a","b"]}"#)))?;
/// let response = together.ready().await?.call(request).await?;
/// # assert_eq!(response.status(), 200);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct TogetherLayer<C = TogetherClassifier, L = LocalBackend>
where
    L: Backend,
{
    buffer: BufferBodyLayer,
    models: ModelCheckLayer,
    retry: RetryLayer<C>,
    limit: RateLimitLayer<C, L>,
}

impl<C: Clone, L: Backend> TogetherLayer<C, L> {
    /// The stack around `limits`, with the default retry policy (using the limits'
    /// classifier) and the default buffer. Stacks built from clones of one `Limits` share
    /// its quota.
    pub fn new(limits: Limits<C, L>) -> Self {
        let policy = RetryPolicy::new().with_classifier(limits.classifier().clone());
        Self {
            buffer: BufferBodyLayer::new(),
            models: ModelCheckLayer::new(),
            retry: RetryLayer::new(policy),
            limit: RateLimitLayer::new(limits),
        }
    }
}

impl<C, L: Backend> TogetherLayer<C, L> {
    /// Buffers bodies with this layer (to change the size limit).
    pub fn with_buffer(mut self, buffer: BufferBodyLayer) -> Self {
        self.buffer = buffer;
        self
    }

    /// Checks models with this layer (to change how long the models list is kept).
    pub fn with_model_check(mut self, models: ModelCheckLayer) -> Self {
        self.models = models;
        self
    }

    /// Retries by this policy.
    pub fn with_retry(mut self, policy: RetryPolicy<C>) -> Self {
        self.retry = RetryLayer::new(policy);
        self
    }

    /// The limits it waits in.
    pub fn limits(&self) -> &Limits<C, L> {
        self.limit.limits()
    }
}

impl<S: Clone, C: Clone, L: Backend> Layer<S> for TogetherLayer<C, L> {
    type Service = TogetherService<S, C, L>;

    fn layer(&self, client: S) -> Self::Service {
        let retried = self.retry.layer(self.limit.layer(client));
        self.buffer.layer(self.models.layer(retried))
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{Request, Response, StatusCode};
    use http_body_util::{BodyExt, Full};
    use tokio::time::Instant;
    use tower::{Layer, ServiceExt};

    use super::TogetherLayer;
    use crate::body::{BufferBodyLayer, BufferedBody};
    use crate::classify::EndpointClass;
    use crate::limit::{Adaptation, Limits};
    use crate::quota::{GroupQuota, QuotaTable, Rate};

    type Log = Arc<Mutex<Vec<(Duration, Bytes)>>>;

    /// A client that logs each call's virtual time and body, and answers `status(call)`.
    fn client(
        status: impl Fn(usize) -> StatusCode + Clone + Send + Sync + 'static,
    ) -> (
        impl tower::Service<
            Request<BufferedBody<Full<Bytes>>>,
            Response = Response<String>,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + Sync,
        Log,
    ) {
        let log: Log = Arc::default();
        let start = Instant::now();
        let record = Arc::clone(&log);
        let service = tower::service_fn(move |request: Request<BufferedBody<Full<Bytes>>>| {
            let (record, status) = (Arc::clone(&record), status.clone());
            async move {
                let at = start.elapsed();
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let call = {
                    let mut log = record.lock().unwrap();
                    log.push((at, body));
                    log.len() - 1
                };
                let response = Response::builder()
                    .status(status(call))
                    .body(String::new())
                    .unwrap();
                Ok::<_, Infallible>(response)
            }
        });
        (service, log)
    }

    /// Exact pacing (no tolerance) at the table's rate, so the tests can name the millisecond
    /// of every turn.
    fn chat_limits(rate: Rate) -> Limits {
        let table = QuotaTable::builder()
            .group(
                "chat",
                GroupQuota::rate(rate.with_tolerance(Duration::ZERO)),
            )
            .class(EndpointClass::Chat, "chat")
            .build()
            .unwrap();
        Limits::builder(table)
            .adaptation(Adaptation::fixed())
            .build()
    }

    fn chat(body: &'static str) -> Request<Full<Bytes>> {
        Request::post("/v1/chat/completions")
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_waits_its_turn_in_the_limiter_again() {
        let (inner, log) = client(|call| match call {
            0 => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::OK,
        });
        let service = TogetherLayer::new(chat_limits(Rate::per_second(1))).layer(inner);
        let response = service.oneshot(chat(r#"{"model":"m"}"#)).await.unwrap();
        assert_eq!(response.status(), 200);
        let log = log.lock().unwrap();
        // The backoff (at most 0.5 s) ends before the bucket's next turn at 1 s: the retry
        // goes through the limiter, so it waits for that turn. The same bytes went twice.
        let times: Vec<_> = log.iter().map(|(at, _)| at.as_millis()).collect();
        assert_eq!(times, [0, 1_000]);
        assert!(log.iter().all(|(_, body)| body == r#"{"model":"m"}"#));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_over_the_buffer_limit_is_sent_once() {
        let (inner, log) = client(|_| StatusCode::SERVICE_UNAVAILABLE);
        let layer = TogetherLayer::new(chat_limits(Rate::per_second(100)))
            .with_buffer(BufferBodyLayer::new().with_limit(8));
        let response = layer
            .layer(inner)
            .oneshot(chat(r#"{"model":"a-long-model-name"}"#))
            .await
            .unwrap();
        assert_eq!(response.status(), 503);
        let log = log.lock().unwrap();
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].1, r#"{"model":"a-long-model-name"}"#);
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_with_retry_after_2_to_100_concurrent_callers_of_one_bucket() {
        let (inner, log) = client(|call| match call {
            0 => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::OK,
        });
        // The 429 says `Retry-After: 2`.
        let inner = tower::ServiceBuilder::new()
            .map_response(|mut response: Response<String>| {
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    response
                        .headers_mut()
                        .insert("retry-after", "2".parse().unwrap());
                }
                response
            })
            .service(inner);
        let service = TogetherLayer::new(chat_limits(Rate::per_second(10))).layer(inner);
        let calls: Vec<_> = (0..100)
            .map(|_| tokio::spawn(service.clone().oneshot(chat("{}"))))
            .collect();
        let mut finished_ms = Vec::new();
        let start = Instant::now();
        for call in calls {
            assert_eq!(call.await.unwrap().unwrap().status(), 200);
            finished_ms.push(start.elapsed().as_millis());
        }

        let times: Vec<u128> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| at.as_millis())
            .collect();
        // One request reaches the server in the first two seconds: the one refused.
        assert_eq!(times.iter().filter(|&&at| at < 2_000).count(), 1);
        // Then the 99 waiters go in arrival order at the quota, and the refused request, whose
        // retry slept 2 to 2.2 s, waits its turn behind them.
        assert_eq!(times.len(), 101);
        let expected: Vec<u128> = std::iter::once(0)
            .chain((0..100).map(|i| 2_000 + 100 * i))
            .collect();
        assert_eq!(times, expected);
        assert_eq!(*finished_ms.iter().max().unwrap(), 11_900);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retried_request_goes_before_those_that_came_after_it() {
        // The first answer is a 429 asking for 150 ms; every other is a 200.
        let (inner, log) = client(|call| match call {
            0 => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::OK,
        });
        let inner = tower::ServiceBuilder::new()
            .map_response(|mut response: Response<String>| {
                if response.status() == StatusCode::TOO_MANY_REQUESTS {
                    response
                        .headers_mut()
                        .insert("retry-after-ms", "150".parse().unwrap());
                }
                response
            })
            .service(inner);
        let service = TogetherLayer::new(chat_limits(Rate::per_second(10))).layer(inner);
        let first = tokio::spawn(service.clone().oneshot(chat("a")));
        tokio::task::yield_now().await;
        let later: Vec<_> = ["b", "c", "d"]
            .into_iter()
            .map(|body| tokio::spawn(service.clone().oneshot(chat(body))))
            .collect();
        assert_eq!(first.await.unwrap().unwrap().status(), 200);
        for call in later {
            call.await.unwrap().unwrap();
        }
        let sent: Vec<(u128, Bytes)> = log
            .lock()
            .unwrap()
            .iter()
            .map(|(at, body)| (at.as_millis(), body.clone()))
            .collect();
        // The 429 closed the bucket until 150 ms, when b went. The retry of a came back
        // between 150 and 165 ms, and took the next turn, ahead of c and d.
        let expected = [(0, "a"), (150, "b"), (250, "a"), (350, "c"), (450, "d")];
        assert_eq!(
            sent,
            expected.map(|(at, body)| (at, Bytes::from_static(body.as_bytes())))
        );
    }

    #[test]
    fn the_stack_fits_boxed_sync_services_and_its_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let (inner, _) = client(|_| StatusCode::OK);
        let mut service = TogetherLayer::new(Limits::default()).layer(inner);
        let future = tower::Service::call(&mut service, chat("{}"));
        assert_send(&future);
        let boxed = tower::util::BoxCloneSyncService::new(service);
        let _clone = boxed.clone();
    }

    /// A classifier that counts its calls.
    #[derive(Clone, Default)]
    struct Counting(Arc<std::sync::atomic::AtomicUsize>);

    impl crate::classify::Classify for Counting {
        fn classify<B>(&self, request: &Request<B>) -> EndpointClass {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            crate::classify::classify_path(request.method(), request.uri().path())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_stack_classifies_a_request_once_whatever_its_attempts() {
        let counting = Counting::default();
        let limits = Limits::builder(QuotaTable::together_defaults())
            .classifier(counting.clone())
            .build();
        // A 503 first, then a 200: one retry.
        let (inner, log) = client(|call| {
            if call == 0 {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            }
        });
        let stack = TogetherLayer::new(limits).layer(inner);
        let request = Request::post("http://together.test/v1/chat/completions")
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        let answer = stack.oneshot(request).await.unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
        assert_eq!(log.lock().unwrap().len(), 2);
        // Once as it entered the retry layer; the rate limit and the policy read that.
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
