use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;
use tower::BoxError;
use tower_service::Service;

/// A `reqwest::Client` as a tower service of `http` types, so the stack can sit on it.
///
/// It takes any request body (the stack's [`BufferedBody`](crate::body::BufferedBody) among
/// them) and answers with reqwest's body, which streams.
///
/// ```
/// use together_tower::client::Reqwest;
/// use together_tower::{Limits, TogetherLayer};
/// use tower::ServiceBuilder;
///
/// let stack = ServiceBuilder::new()
///     .layer(TogetherLayer::new(Limits::default()))
///     .service(Reqwest::new(reqwest::Client::new()));
/// # let _ = stack;
/// ```
#[derive(Debug, Clone, Default)]
pub struct Reqwest {
    client: reqwest::Client,
}

impl Reqwest {
    /// Sends with `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }

    /// The client.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

impl<B> Service<http::Request<B>> for Reqwest
where
    B: Body + Send + Sync + 'static,
    B::Data: Into<Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<reqwest::Body>;
    type Error = reqwest::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<reqwest::Body>, reqwest::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // reqwest's client queues inside itself; it is always ready to take a request.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request = reqwest::Request::try_from(request.map(reqwest::Body::wrap));
        let client = self.client.clone();
        Box::pin(async move {
            let response = client.execute(request?).await?;
            Ok(http::Response::from(response))
        })
    }
}
