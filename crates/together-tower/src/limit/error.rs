//! Errors the rate limit layer returns itself, instead of sending the request.
//!
//! They reach the caller as a [`tower::BoxError`]; downcast to tell them apart. Each says which
//! class of request it turned away, and all but [`TooManyTokens`] say when to try again.
//!
//! | error | when | what waiting does |
//! |---|---|---|
//! | [`RateLimited`] | the turn is further away than the request may wait (`max_wait`, or its [`MaxWait`](super::MaxWait)) | try after `retry_after` |
//! | [`QueueFull`] | `max_queue` requests already wait in the bucket | shed load, or try after `retry_after` |
//! | [`SlotsBusy`] | every concurrent-call slot of a job-creating group stayed busy past `max_wait` | try when a job ends |
//! | [`TooManyTokens`] | the request's token estimate is more than its group's whole token burst | nothing: split the request, or raise the burst |
//! | [`TooManyBuckets`] | `max_buckets` buckets are live and none is at rest (a flood of new keys) | try after `retry_after` |
//!
//! ```
//! # use together_tower::limit::error::{QueueFull, RateLimited};
//! fn describe(error: &tower::BoxError) -> &'static str {
//!     if error.is::<RateLimited>() {
//!         "over quota: try later"
//!     } else if error.is::<QueueFull>() {
//!         "too many waiting: shed load"
//!     } else {
//!         "the request itself failed"
//!     }
//! }
//! # let _ = describe;
//! ```

use std::fmt;
use std::time::Duration;

use crate::classify::EndpointClass;

/// The request would have had to wait longer than it may, so it was not sent.
///
/// Nothing was consumed: the caller may try again after [`RateLimited::retry_after`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
    class: EndpointClass,
}

impl RateLimited {
    pub(crate) fn new(retry_after: Duration, class: EndpointClass) -> Self {
        Self { retry_after, class }
    }

    /// How long until the bucket is expected to have a free turn.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limited: the next {} turn is {:?} away, longer than this request may wait",
            self.class, self.retry_after
        )
    }
}

impl std::error::Error for RateLimited {}

/// Too many requests already wait for the same bucket, so this one was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFull {
    max_queue: usize,
    retry_after: Duration,
    class: EndpointClass,
}

impl QueueFull {
    pub(crate) fn new(max_queue: usize, retry_after: Duration, class: EndpointClass) -> Self {
        Self {
            max_queue,
            retry_after,
            class,
        }
    }

    /// The bound that was reached.
    pub fn max_queue(&self) -> usize {
        self.max_queue
    }

    /// How long until the requests waiting now are expected to have gone.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for QueueFull {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "queue full: {} {} requests already wait for this bucket",
            self.max_queue, self.class
        )
    }
}

impl std::error::Error for QueueFull {}

/// Every concurrent-call slot of the group stayed busy for as long as the request may wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotsBusy {
    waited: Duration,
    class: EndpointClass,
}

impl SlotsBusy {
    pub(crate) fn new(waited: Duration, class: EndpointClass) -> Self {
        Self { waited, class }
    }

    /// How long the request waited for a slot.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for SlotsBusy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "no free {} slot: every concurrent call slot stayed busy for {:?}",
            self.class, self.waited
        )
    }
}

impl std::error::Error for SlotsBusy {}

/// The request's token estimate is more than its group's whole token burst, so no wait would
/// ever let it go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyTokens {
    tokens: u64,
    burst: u64,
    class: EndpointClass,
}

impl TooManyTokens {
    pub(crate) fn new(tokens: u64, burst: u64, class: EndpointClass) -> Self {
        Self {
            tokens,
            burst,
            class,
        }
    }

    /// The request's estimated tokens.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// The most tokens one request of its group may cost.
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for TooManyTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "too many tokens: this {} request is estimated at {} tokens, more than the {} its group's burst holds; split it, lower max_tokens, or raise the token burst",
            self.class, self.tokens, self.burst
        )
    }
}

impl std::error::Error for TooManyTokens {}

/// So many keys are in use at once that every bucket is live and none is at rest: a new key
/// cannot have one until a bucket comes to rest. Keys already live are not affected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooManyBuckets {
    max_buckets: usize,
    retry_after: Duration,
    class: EndpointClass,
}

impl TooManyBuckets {
    pub(crate) fn new(max_buckets: usize, retry_after: Duration, class: EndpointClass) -> Self {
        Self {
            max_buckets,
            retry_after,
            class,
        }
    }

    /// The bound on live buckets.
    pub fn max_buckets(&self) -> usize {
        self.max_buckets
    }

    /// How long until a bucket is expected to come to rest and make room.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// The class of the request that was turned away.
    pub fn class(&self) -> EndpointClass {
        self.class
    }
}

impl fmt::Display for TooManyBuckets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "too many buckets: all {} are in use; a new key's {} request can have one in {:?}",
            self.max_buckets, self.class, self.retry_after
        )
    }
}

impl std::error::Error for TooManyBuckets {}

/// What kind of refusal of this layer an error is: the one place that tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Its label in events and metrics.
    pub(crate) reason: &'static str,
    /// How long to wait before trying again; `None` when waiting would not help.
    pub(crate) retry_after: Option<Duration>,
}

impl Refusal {
    /// The refusal `error` is, if it is one of this layer's.
    pub(crate) fn of(error: &(dyn std::error::Error + 'static)) -> Option<Self> {
        let refusal = |reason, retry_after| {
            Some(Self {
                reason,
                retry_after,
            })
        };
        if let Some(error) = error.downcast_ref::<RateLimited>() {
            refusal("rate_limited", Some(error.retry_after()))
        } else if let Some(error) = error.downcast_ref::<QueueFull>() {
            refusal("queue_full", Some(error.retry_after()))
        } else if let Some(error) = error.downcast_ref::<TooManyBuckets>() {
            refusal("too_many_buckets", Some(error.retry_after()))
        } else if let Some(error) = error.downcast_ref::<SlotsBusy>() {
            // A job slot frees when a job ends: no telling when. Suggest what it waited.
            refusal("slots_busy", Some(error.waited()))
        } else if error.is::<TooManyTokens>() {
            refusal("too_many_tokens", None)
        } else {
            None
        }
    }

    /// The label of any error the limiter returns: a refusal's, or `backend` for a backend's
    /// own error.
    pub(crate) fn reason(error: &(dyn std::error::Error + 'static)) -> &'static str {
        Self::of(error).map_or("backend", |refusal| refusal.reason)
    }
}

/// A refusal of this layer as the HTTP answer a gateway gives its own callers; `None` for any
/// other error (the request itself failed: answer 502 or as you see fit).
///
/// Waiting would help: 429 with `Retry-After` in whole seconds, rounded up, and `retry-after-ms`.
/// It would not ([`TooManyTokens`]): 400. The body is Together's error shape, so clients of
/// the gateway read it as they would Together's own.
///
/// ```
/// use std::time::Duration;
/// use http::{Request, Response, StatusCode};
/// use tower::{BoxError, Layer, ServiceExt};
/// use together_tower::limit::error::refusal_response;
/// use together_tower::limit::{Limits, MaxWait, RateLimitLayer};
/// use together_tower::quota::QuotaTable;
///
/// fn answer(error: BoxError) -> Response<String> {
///     refusal_response(&*error).unwrap_or_else(|| {
///         let mut bad_gateway = Response::new(error.to_string());
///         *bad_gateway.status_mut() = StatusCode::BAD_GATEWAY;
///         bad_gateway
///     })
/// }
///
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// let client = tower::service_fn(|_: Request<String>| async {
///     Ok::<_, std::convert::Infallible>(Response::new(String::new()))
/// });
/// let together = RateLimitLayer::new(Limits::default()).layer(client);
/// let chat = || Request::post("/v1/chat/completions").header("authorization", "Bearer k");
/// together.clone().oneshot(chat().body(String::new()).unwrap()).await.unwrap();
/// // The next turn is 100 ms away, and this request will not wait at all.
/// let mut impatient = chat().body(String::new()).unwrap();
/// impatient.extensions_mut().insert(MaxWait(Duration::ZERO));
/// let refused = together.oneshot(impatient).await.unwrap_err();
/// let response = answer(refused);
/// assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
/// assert_eq!(response.headers()["retry-after"], "1");
///
/// // Any other error is the gateway's to answer.
/// let broken: BoxError = "connection reset".into();
/// assert_eq!(answer(broken).status(), StatusCode::BAD_GATEWAY);
/// # }
/// ```
pub fn refusal_response(
    error: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<http::Response<String>> {
    let wait = Refusal::of(error)?.retry_after;
    let (status, kind) = match wait {
        Some(_) => (http::StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
        None => (http::StatusCode::BAD_REQUEST, "invalid_request_error"),
    };
    let body = serde_json::json!({
        "error": {"message": error.to_string(), "type": kind, "param": null, "code": null}
    });
    let mut response = http::Response::new(body.to_string());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    if let Some(wait) = wait {
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        headers.insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
        headers.insert(
            crate::headers::RETRY_AFTER_MS,
            http::HeaderValue::from(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    Some(response)
}

/// Turns a refusal of this layer into a boxed `tonic::Status` (`RESOURCE_EXHAUSTED`, or
/// `INVALID_ARGUMENT` for [`TooManyTokens`]) and leaves any other error as it is. tonic finds a
/// `Status` in the errors a channel returns, so a generated client's caller gets the refusal
/// as that code rather than `UNKNOWN`:
///
/// ```
/// use together_tower::client::Tonic;
/// use together_tower::limit::error::into_status;
/// use tower::ServiceBuilder;
/// # use together_tower::{Limits, TogetherLayer};
/// # let channel = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
/// #     Ok::<_, tonic::Status>(http::Response::new(tonic::body::Body::empty()))
/// # });
///
/// let stack = ServiceBuilder::new()
///     .map_err(into_status)
///     .layer(TogetherLayer::new(Limits::default()))
///     .service(Tonic::new(channel));
/// # let _ = stack;
/// ```
///
/// The status keeps the refusal as its source (`Status::source`, downcast it to get the typed
/// error back), and a `RESOURCE_EXHAUSTED` says when to come back in its metadata, the way
/// gRPC clients read it: `grpc-retry-pushback-ms` (milliseconds, gRPC's retry pushback) and
/// `retry-after` (whole seconds, rounded up).
#[cfg(feature = "tonic")]
pub fn into_status(error: tower::BoxError) -> tower::BoxError {
    let Some(refusal) = Refusal::of(&*error) else {
        return error;
    };
    let code = match refusal.retry_after {
        Some(_) => tonic::Code::ResourceExhausted,
        None => tonic::Code::InvalidArgument,
    };
    let mut status = tonic::Status::new(code, error.to_string());
    if let Some(wait) = refusal.retry_after {
        let millis = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let metadata = status.metadata_mut();
        metadata.insert("grpc-retry-pushback-ms", millis.into());
        metadata.insert("retry-after", seconds.into());
    }
    status.set_source(std::sync::Arc::from(error));
    Box::new(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_become_429s_that_say_when_to_come_back() {
        let limited: tower::BoxError = Box::new(RateLimited::new(
            Duration::from_millis(1_500),
            EndpointClass::Chat,
        ));
        let response = refusal_response(&*limited).unwrap();
        assert_eq!(response.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "2");
        assert_eq!(response.headers()["retry-after-ms"], "1500");
        let body: serde_json::Value = serde_json::from_str(response.body()).unwrap();
        assert_eq!(body["error"]["type"], "rate_limit_exceeded");

        let full: tower::BoxError = Box::new(QueueFull::new(
            8,
            Duration::from_secs(3),
            EndpointClass::Chat,
        ));
        assert_eq!(
            refusal_response(&*full).unwrap().headers()["retry-after"],
            "3"
        );
        let too_big: tower::BoxError = Box::new(TooManyTokens::new(9, 8, EndpointClass::Chat));
        let response = refusal_response(&*too_big).unwrap();
        assert_eq!(response.status(), http::StatusCode::BAD_REQUEST);
        assert!(response.headers().get("retry-after").is_none());
        let other: tower::BoxError = "connection reset".into();
        assert!(refusal_response(&*other).is_none());
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn refusals_become_statuses_and_other_errors_stay_as_they_are() {
        let limited: tower::BoxError = Box::new(RateLimited::new(
            Duration::from_secs(1),
            EndpointClass::Chat,
        ));
        let status = into_status(limited);
        let status = status.downcast_ref::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let too_big = into_status(Box::new(TooManyTokens::new(9, 8, EndpointClass::Chat)));
        let too_big = too_big.downcast_ref::<tonic::Status>().expect("a Status");
        assert_eq!(too_big.code(), tonic::Code::InvalidArgument);
        assert!(too_big.metadata().get("grpc-retry-pushback-ms").is_none());
        let other = into_status("connection reset".into());
        assert!(!other.is::<tonic::Status>());
        assert_eq!(other.to_string(), "connection reset");
    }

    #[cfg(feature = "tonic")]
    #[test]
    fn a_status_keeps_the_refusal_and_says_when_to_come_back() {
        use std::error::Error as _;
        let limited: tower::BoxError = Box::new(RateLimited::new(
            Duration::from_millis(1_500),
            EndpointClass::Chat,
        ));
        let status = into_status(limited);
        let status = status.downcast_ref::<tonic::Status>().expect("a Status");
        let source = status.source().expect("the refusal as the source");
        let refusal = source.downcast_ref::<RateLimited>().expect("RateLimited");
        assert_eq!(refusal.retry_after(), Duration::from_millis(1_500));
        let metadata = status.metadata();
        assert_eq!(metadata.get("grpc-retry-pushback-ms").unwrap(), "1500");
        assert_eq!(metadata.get("retry-after").unwrap(), "2");
    }
}
