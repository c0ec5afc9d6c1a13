//! The response future of [`BufferBody`](super::BufferBody).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::request::Parts;
use http::{HeaderMap, Request};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::BoxError;
use tower_service::Service;

use super::{BodyNotBuffered, BufferedBody, RequestMeta};

pin_project! {
    /// Reads the request body (up to the limit), then sends the request.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<BufferedBody<B>>>,
    {
        Reading {
            collected: Collected<B>,
            service: S,
        },
        Calling {
            #[pin]
            future: S::Future,
        },
        // The body failed as it was read, before the request could be sent.
        Failed {
            error: Option<BoxError>,
        },
    }
}

/// A body being read: the chunks so far, and the rest.
pub(super) struct Collected<B> {
    parts: Option<Parts>,
    body: Option<B>,
    /// The first chunk: most bodies are one (a `Full` body, say), and it is passed on
    /// without a copy or a list to hold it.
    first: Option<Bytes>,
    /// The chunks after the first.
    rest: Vec<Bytes>,
    size: usize,
    limit: usize,
    trailers: Option<HeaderMap>,
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
{
    /// Reads the rest of the body, then sends the request through `service`, which is ready.
    pub(super) fn reading(service: S, collected: Collected<B>) -> Self {
        Self {
            state: State::Reading { collected, service },
        }
    }

    /// The request was read whole and sent: waits for the answer.
    pub(super) fn calling(future: S::Future) -> Self {
        Self {
            state: State::Calling { future },
        }
    }

    /// Reading the body failed: the request was not sent.
    pub(super) fn failed(error: BoxError) -> Self {
        Self {
            state: State::Failed { error: Some(error) },
        }
    }
}

impl<B> Collected<B> {
    /// Nothing of `request`'s body read yet; up to `limit` bytes will be.
    pub(super) fn new(request: Request<B>, limit: usize) -> Self {
        let (parts, body) = request.into_parts();
        Self {
            parts: Some(parts),
            body: Some(body),
            first: None,
            rest: Vec::new(),
            size: 0,
            limit,
            trailers: None,
        }
    }
}

impl<B> Collected<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Reads frames until the body ends or passes the limit; returns the request to send.
    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Request<BufferedBody<B>>, BoxError>> {
        let body = self.body.as_mut().expect("polled after completion");
        if body.size_hint().lower() > self.limit as u64 {
            return Poll::Ready(Ok(self.finish_streaming()));
        }
        loop {
            let body = self.body.as_mut().expect("polled after completion");
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => return Poll::Ready(Ok(self.finish_buffered())),
                Some(Err(error)) => return Poll::Ready(Err(error.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(mut data) => {
                        self.size = self.size.saturating_add(data.remaining());
                        let chunk = data.copy_to_bytes(data.remaining());
                        match self.first {
                            None => self.first = Some(chunk),
                            Some(_) => self.rest.push(chunk),
                        }
                        if self.size > self.limit {
                            return Poll::Ready(Ok(self.finish_streaming()));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.trailers = Some(trailers);
                        }
                    }
                },
            }
        }
    }

    fn joined(&mut self) -> Bytes {
        let first = self.first.take().unwrap_or_default();
        if self.rest.is_empty() {
            return first;
        }
        let mut joined = BytesMut::with_capacity(self.size);
        joined.extend_from_slice(&first);
        for chunk in self.rest.drain(..) {
            joined.extend_from_slice(&chunk);
        }
        joined.freeze()
    }

    fn finish_buffered(&mut self) -> Request<BufferedBody<B>> {
        let data = self.joined();
        let mut parts = self.parts.take().expect("polled after completion");
        if let Some(meta) = RequestMeta::from_json(&data) {
            parts.extensions.insert(meta);
        }
        self.body = None;
        Request::from_parts(
            parts,
            BufferedBody::with_trailers(data, self.trailers.take()),
        )
    }

    fn finish_streaming(&mut self) -> Request<BufferedBody<B>> {
        let head = self.joined();
        let mut parts = self.parts.take().expect("polled after completion");
        parts.extensions.insert(BodyNotBuffered);
        let rest = self.body.take().expect("polled after completion");
        Request::from_parts(parts, BufferedBody::streaming(head, rest))
    }
}

impl<S, B> Future for ResponseFuture<S, B>
where
    S: Service<Request<BufferedBody<B>>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Reading { collected, service } => {
                    let request = ready!(collected.poll_read(cx))?;
                    // The service was made ready by our `poll_ready` before the body was read.
                    let future = service.call(request);
                    this.state.set(State::Calling { future });
                }
                StateProj::Calling { future } => {
                    return future.poll(cx).map_err(Into::into);
                }
                StateProj::Failed { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion")));
                }
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
            State::Reading { .. } => "reading",
            State::Calling { .. } => "calling",
            State::Failed { .. } => "failed",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}
