//! The response future of [`RateLimit`](super::RateLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;
use tower_service::Service;

use super::service::Learner;

/// The wait for a slot and a turn: boxed, because only requests that must wait pay for it.
pub(crate) type WaitForTurn =
    Pin<Box<dyn Future<Output = Result<Option<OwnedSemaphorePermit>, BoxError>> + Send>>;

pin_project! {
    /// Waits for the request's turn, then sends it and reads the server's answer for hints.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        // Held until the response arrives: the concurrency slot of a job-creating call.
        permit: Option<OwnedSemaphorePermit>,
        learner: Option<Learner>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        Rejected {
            error: Option<BoxError>,
        },
        Waiting {
            turn: Option<WaitForTurn>,
            service: S,
            request: Option<Request<B>>,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn calling(
        future: S::Future,
        permit: Option<OwnedSemaphorePermit>,
        learner: Option<Learner>,
    ) -> Self {
        Self {
            state: State::Calling { future },
            permit,
            learner,
        }
    }

    pub(crate) fn waiting(
        turn: WaitForTurn,
        service: S,
        request: Request<B>,
        learner: Learner,
    ) -> Self {
        Self {
            state: State::Waiting {
                turn: Some(turn),
                service,
                request: Some(request),
            },
            permit: None,
            learner: Some(learner),
        }
    }

    pub(crate) fn rejected(error: BoxError) -> Self {
        Self {
            state: State::Rejected { error: Some(error) },
            permit: None,
            learner: None,
        }
    }
}

impl<S, B, ResBody> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
                StateProj::Waiting {
                    turn,
                    service,
                    request,
                } => {
                    if let Some(wait) = turn {
                        *this.permit = ready!(wait.as_mut().poll(cx))?;
                        *turn = None;
                    }
                    ready!(service.poll_ready(cx)).map_err(Into::into)?;
                    let request = request.take().expect("polled after completion");
                    let future = service.call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    let response = ready!(future.poll(cx)).map_err(Into::into)?;
                    if let Some(learner) = this.learner.take() {
                        learner.learn(&response);
                    }
                    this.permit.take();
                    return Poll::Ready(Ok(response));
                }
            }
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Rejected { .. } => "rejected",
            State::Waiting { turn: Some(_), .. } => "waiting",
            State::Waiting { turn: None, .. } => "ready",
            State::Calling { .. } => "calling",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}
