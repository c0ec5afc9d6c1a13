//! The response future of [`RateLimit`](super::RateLimit).

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use std::sync::Arc;

use tokio::sync::OwnedSemaphorePermit;
use tower::BoxError;
use tower_service::Service;
use tracing::Span;

use super::admission::wait::Turn;
use super::backend::{Backend, LocalBackend};
use super::bucket::Bucket;
use super::jobs::Slots;
pub use super::learn::ResponseBody;
use super::learn::{JobAnswer, Reading, Ticket, Watch};

pin_project! {
    /// Waits for the request's turn, sends it, and reads the server's answer for its bucket.
    ///
    /// `L` is the backend of the buckets it waits in, as in [`RateLimit`](super::RateLimit).
    pub struct ResponseFuture<S, B, L = LocalBackend>
    where
        S: Service<Request<B>>,
        L: Backend,
    {
        #[pin]
        state: State<S, B, L>,
        // Held until the answer arrives: the concurrency slot of a job-creating call.
        permit: Option<OwnedSemaphorePermit>,
        ticket: Option<Ticket<Bucket<L>>>,
        // A read of jobs (one, a cancel, the list): the key's job slots learn from the answer.
        reads_jobs: Option<Arc<Slots>>,
        span: Span,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B, L>
    where
        S: Service<Request<B>>,
        L: Backend,
    {
        Refused {
            error: Option<BoxError>,
        },
        // Boxed: only requests that wait pay for carrying the request and a service clone,
        // and every future stays small.
        Waiting {
            waiting: Box<Waiting<S, B, L>>,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
        // A 429 whose body is read for the limit it says ran out: a `Reading` of the inner
        // service's body type, which this enum cannot name.
        Refusal {
            reading: Option<Box<dyn Any + Send>>,
        },
    }
}

/// A request waiting for its turn.
struct Waiting<S, B, L: Backend> {
    turn: Box<Turn<L>>,
    service: S,
    request: Option<Request<B>>,
    step: Step,
}

/// Where a waiting request is.
#[derive(Debug, Clone, Copy)]
enum Step {
    /// Waiting for its turn.
    Turn,
    /// Its turn is taken: the service must be ready now, or the turn goes back.
    Ready,
    /// It gave its turn back and waits, still at the head, for the service to be ready.
    Service,
}

impl<S, B, L> ResponseFuture<S, B, L>
where
    S: Service<Request<B>>,
    L: Backend,
{
    // Built in place by each constructor, never by a builder taking `self`: the future holds
    // the inner one, and every move of it is a copy of a few hundred bytes.
    #[inline]
    pub(crate) fn calling(
        future: S::Future,
        permit: Option<OwnedSemaphorePermit>,
        ticket: Option<Ticket<Bucket<L>>>,
        reads_jobs: Option<Arc<Slots>>,
        span: Span,
    ) -> Self {
        Self {
            state: State::Calling { future },
            permit,
            ticket,
            reads_jobs,
            span,
        }
    }

    pub(crate) fn waiting(
        turn: Box<Turn<L>>,
        service: S,
        request: Request<B>,
        ticket: Ticket<Bucket<L>>,
        reads_jobs: Option<Arc<Slots>>,
        span: Span,
    ) -> Self {
        let waiting = Box::new(Waiting {
            turn,
            service,
            request: Some(request),
            step: Step::Turn,
        });
        Self {
            state: State::Waiting { waiting },
            permit: None,
            ticket: Some(ticket),
            reads_jobs,
            span,
        }
    }

    pub(crate) fn refused(error: BoxError, span: Span) -> Self {
        Self {
            state: State::Refused { error: Some(error) },
            permit: None,
            ticket: None,
            reads_jobs: None,
            span,
        }
    }
}

impl<S, B, L, ResBody> Future for ResponseFuture<S, B, L>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    L: Backend,
    S::Error: Into<BoxError>,
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    type Output = Result<Response<ResponseBody<ResBody>>, BoxError>;

    // Small enough to inline into the caller's poll, so that the answer is built in place:
    // the waiting steps, which only queued requests take, are a function of their own.
    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Calling { future } => {
                    let result = ready!(future.poll(cx));
                    let (permit, ticket) = (this.permit.take(), this.ticket.take());
                    match (result, ticket) {
                        (Ok(response), Some(ticket))
                            if response.status() == StatusCode::TOO_MANY_REQUESTS
                                && ticket.reads_refusals() =>
                        {
                            let reading = read_refusal(response, permit, ticket);
                            this.state.set(State::Refusal { reading });
                        }
                        (result, ticket) => {
                            let reads_jobs = this.reads_jobs.take();
                            return Poll::Ready(answer(result, permit, ticket, reads_jobs));
                        }
                    }
                }
                StateProj::Refusal { reading } => {
                    let Some(read) = reading
                        .as_mut()
                        .and_then(|any| any.downcast_mut::<Reading<ResBody, Bucket<L>>>())
                    else {
                        panic!("polled after completion");
                    };
                    ready!(read.poll_read(cx));
                    let reading = reading
                        .take()
                        .and_then(|any| any.downcast::<Reading<ResBody, Bucket<L>>>().ok());
                    let response = reading.expect("just seen").finish();
                    return Poll::Ready(Ok(response));
                }
                StateProj::Waiting { waiting } => {
                    let future = ready!(waiting.poll_call(cx, this.permit, this.ticket))?;
                    this.state.set(State::Calling { future });
                }
                StateProj::Refused { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
            }
        }
    }
}

impl<S, B, L> Waiting<S, B, L>
where
    S: Service<Request<B>>,
    S::Error: Into<BoxError>,
    L: Backend,
{
    /// Waits for the turn and then for the service, and calls it: ready with the inner
    /// future once the request is sent.
    #[inline(never)]
    fn poll_call(
        &mut self,
        cx: &mut Context<'_>,
        permit: &mut Option<OwnedSemaphorePermit>,
        ticket: &mut Option<Ticket<Bucket<L>>>,
    ) -> Poll<Result<S::Future, BoxError>> {
        loop {
            match self.step {
                Step::Turn => {
                    ready!(self.turn.poll_turn(cx))?;
                    self.step = Step::Ready;
                }
                Step::Ready => match self.service.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        *permit = self.turn.leave();
                        if let Some(ticket) = ticket.as_mut() {
                            ticket.sending();
                        }
                        let request = self.request.take().expect("polled after completion");
                        return Poll::Ready(Ok(self.service.call(request)));
                    }
                    Poll::Ready(Err(error)) => {
                        self.turn.give_back();
                        return Poll::Ready(Err(error.into()));
                    }
                    Poll::Pending => {
                        // Busy below us: the turn goes back, the place in the queue stays.
                        self.turn.give_back();
                        self.step = Step::Service;
                        return Poll::Pending;
                    }
                },
                Step::Service => {
                    ready!(self.service.poll_ready(cx)).map_err(Into::into)?;
                    // Ready now, and it stays ready until called: take the turn again.
                    self.step = Step::Turn;
                }
            }
        }
    }
}

/// A 429 to a bucket that reads refusals: held until its body says which limit ran out.
#[cold]
fn read_refusal<ResBody, L: Backend>(
    response: Response<ResBody>,
    permit: Option<OwnedSemaphorePermit>,
    ticket: Ticket<Bucket<L>>,
) -> Option<Box<dyn Any + Send>>
where
    ResBody: Body + Send + 'static,
    ResBody::Data: Send,
    ResBody::Error: Send,
{
    Some(Box::new(Reading::new(response, ticket, permit)))
}

/// Hands the answer on, after its bucket learned from its head. The response is read in place
/// and its body wrapped by `map`: responses can be large, and each move is a copy.
#[inline]
fn answer<ResBody: Body, E: Into<BoxError>, L: Backend>(
    result: Result<Response<ResBody>, E>,
    permit: Option<OwnedSemaphorePermit>,
    ticket: Option<Ticket<Bucket<L>>>,
    reads_jobs: Option<Arc<Slots>>,
) -> Result<Response<ResponseBody<ResBody>>, BoxError> {
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            if let Some(ticket) = ticket {
                ticket.failed();
            }
            return Err(error.into());
        }
    };
    let mut watch =
        ticket.and_then(|ticket| ticket.learn(response.status(), response.headers(), permit, None));
    if let Some(slots) = reads_jobs {
        if response.status().is_success() {
            watch = Some(Watch::jobs(slots, JobAnswer::Read));
        }
    }
    Ok(response.map(|body| ResponseBody::new(body, watch)))
}

impl<S, B, L> fmt::Debug for ResponseFuture<S, B, L>
where
    S: Service<Request<B>>,
    L: Backend,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Refused { .. } => "refused",
            State::Waiting { waiting } => match waiting.step {
                Step::Turn => "waiting for its turn",
                Step::Ready | Step::Service => "waiting for the service",
            },
            State::Calling { .. } => "calling",
            State::Refusal { .. } => "reading a refusal",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("holds_slot", &self.permit.is_some())
            .finish()
    }
}
