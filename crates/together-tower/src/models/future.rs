//! The response future of [`ModelCheck`](super::ModelCheck).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_service::Service;

use crate::body::BufferedBody;

use super::error::ModelNotFound;
use super::list::{ModelList, Probe};
use super::suggest::closest;

/// The check after a 404: the list, then the answer or the error.
type Checking<R> = Pin<Box<dyn Future<Output = Result<R, BoxError>> + Send>>;

/// What a request that named a model keeps, to ask for the list if it is answered 404.
/// Shared by the requests of one service that name the same model with the same URI and
/// credentials (see [`ModelCheck`](super::ModelCheck)).
pub(super) struct Ask<S> {
    pub(super) probe: Probe,
    pub(super) spare: Arc<std::sync::Mutex<S>>,
    pub(super) list: Arc<ModelList>,
}

pin_project! {
    /// The response future of [`ModelCheck`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        #[pin]
        pub(super) state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    pub(super) enum State<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        Calling {
            #[pin]
            future: S::Future,
            ask: Option<Arc<Ask<S>>>,
        },
        Checking {
            checking: Checking<S::Response>,
        },
    }
}

impl<S> fmt::Debug for Ask<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the probe's credentials.
        f.debug_struct("Ask")
            .field("model", &self.probe.model)
            .finish_non_exhaustive()
    }
}

impl<S> Ask<S> {
    fn check<B, ResBody>(
        self: Arc<Self>,
        response: Response<ResBody>,
    ) -> Checking<Response<ResBody>>
    where
        S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
        B: Send + 'static,
        ResBody: Body + Send + 'static,
        ResBody::Data: Send,
        ResBody::Error: Into<BoxError>,
    {
        let service = lock(&self.spare).clone();
        Box::pin(async move {
            let Ask { probe, list, .. } = &*self;
            let Some(known) = list.get(service, probe).await else {
                return Ok(response);
            };
            if known.iter().any(|id| **id == *probe.model) {
                return Ok(response);
            }
            Err(ModelNotFound {
                closest: closest(&probe.model, &known),
                model: probe.model.to_string(),
            }
            .into())
        })
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>, Response = Response<ResBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future, ask } => {
                    let response = ready!(future.poll(cx))?;
                    match ask.take() {
                        Some(ask) if may_be_about_the_model(&response) => {
                            let checking = ask.check(response);
                            this.state.set(State::Checking { checking });
                        }
                        _ => return Poll::Ready(Ok(response)),
                    }
                }
                StateProj::Checking { checking } => return checking.as_mut().poll(cx),
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Calling { .. } => "calling",
            State::Checking { .. } => "checking the model",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

/// Whether an answer may be Together's `model_not_found`: a 404 in JSON.
fn may_be_about_the_model<B>(response: &Response<B>) -> bool {
    response.status() == StatusCode::NOT_FOUND
        && response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
            .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// The spare service, even if a thread panicked while it held it: a clone of it is all that
/// is taken.
fn lock<S>(spare: &std::sync::Mutex<S>) -> std::sync::MutexGuard<'_, S> {
    spare
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
