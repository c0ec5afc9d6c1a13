//! Helpers shared by the unit tests of several layers.

use http::{Request, Response};
use tower::{BoxError, Service, ServiceExt};

/// Sends every request at once, each from its own task, in order; returns their results.
pub(crate) async fn send_all<S, B>(
    service: &S,
    requests: Vec<Request<String>>,
) -> Vec<Result<Response<B>, BoxError>>
where
    S: Service<Request<String>, Response = Response<B>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|request| tokio::spawn(service.clone().oneshot(request)))
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// One request through `service`, once it is ready.
pub(crate) async fn send_one<S, B>(
    service: &mut S,
    request: Request<String>,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<String>, Response = Response<B>, Error = BoxError>,
{
    service.ready().await?.call(request).await
}
