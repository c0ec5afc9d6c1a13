//! The stack as async-openai's HTTP service.
//!
//! async-openai (with its `middleware` feature) sends every call through a tower service of
//! its own request type. [`http_service`] makes one of the stack, so async-openai's calls to
//! Together wait their turn, retry by this crate's policy, and share one quota:
//!
//! ```
//! use async_openai::config::OpenAIConfig;
//! use together_tower::client::{Reqwest, async_openai::http_service};
//! use together_tower::{Limits, TogetherLayer};
//! use tower::ServiceBuilder;
//!
//! let config = OpenAIConfig::new()
//!     .with_api_base("https://api.together.xyz/v1")
//!     .with_api_key("my-key");
//! let stack = ServiceBuilder::new()
//!     .layer(TogetherLayer::new(Limits::default()))
//!     .service(Reqwest::new(reqwest::Client::new()));
//! let together = async_openai::Client::with_config(config).with_http_service(http_service(stack));
//! # let _ = together;
//! ```
//!
//! async-openai's own retry layer is not used: this crate's stack retries, by the server's
//! hints and within its budget, and never repeats a job create.
//!
//! Streams go through as they come (`client.chat().create_stream(request)`): each chunk
//! reaches the caller as the server sends it. async-openai stops reading at `data: [DONE]`
//! and drops the body; the stack settles the stream's token charge there, from the `usage`
//! of its last chunk, and a group's concurrency slot is held until then. A retry happens
//! only before the answer's head; a stream cut after it is an error for the caller, never
//! sent again. The `streaming_chat` example runs six streams this way.

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use http_body::Body;
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceExt};
use tower_service::Service;

/// async-openai's HTTP service, made of `stack` (the stack on [`Reqwest`](super::Reqwest), or
/// any service of `http` requests with reqwest bodies).
pub fn http_service<S, B>(
    stack: S,
) -> BoxCloneSyncService<HttpRequestFactory, reqwest::Response, OpenAIError>
where
    S: Service<http::Request<reqwest::Body>, Response = http::Response<B>>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: Body + Send + Sync + 'static,
    B::Data: Into<bytes::Bytes>,
    B::Error: Into<BoxError>,
{
    BoxCloneSyncService::new(tower::service_fn(move |factory: HttpRequestFactory| {
        let stack = stack.clone();
        async move {
            let request = factory.build().await?;
            let request = http::Request::<reqwest::Body>::try_from(request)?;
            let response = stack
                .oneshot(request)
                .await
                .map_err(|error| OpenAIError::Boxed(error.into()))?;
            Ok(reqwest::Response::from(response.map(reqwest::Body::wrap)))
        }
    }))
}
