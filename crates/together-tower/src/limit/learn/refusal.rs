//! A refusal's body, read before the answer is handed on, for the limit it says ran out.
//!
//! Together names the limit a 429 is about in its body, not in its headers: `error.type` is
//! `dynamic_request_limited` or `dynamic_token_limited`. The retry layer drops a refusal's body
//! unread, so the rate limit reads it first, and cuts the rate of the limit that ran out (a
//! token-limited 429 leaves the request rate alone). It reads at most [`MAX_REFUSAL_BODY`]
//! bytes, for at most [`REFUSAL_READ_TIME`] after the head, and hands every byte it read on
//! first, so the caller sees the whole body. It does so only for buckets that adapt and have
//! both a request rate and a token budget: elsewhere there is one limit to cut, and the
//! answer goes on at once.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::Response;
use http::response::Parts;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use super::watch::ResponseBody;
use super::{Dimension, Ticket};

/// The most of a refusal's body read for its error type.
pub(crate) const MAX_REFUSAL_BODY: usize = 4 * 1024;
/// The longest a refusal is held for its body after its head came.
pub(crate) const REFUSAL_READ_TIME: Duration = Duration::from_millis(50);

/// What reading a body gives: a frame, an error, or its end.
type Polled<B> = Option<Result<Frame<<B as Body>::Data>, <B as Body>::Error>>;

/// A body whose first frames were read ahead, handed on before the rest.
pub(crate) struct Peeked<B: Body> {
    /// Boxed, so that it can be read in place and still handed on: a body may not be
    /// `Unpin`.
    body: Pin<Box<B>>,
    ahead: VecDeque<Result<Frame<B::Data>, B::Error>>,
    /// The body returned its end (or an error) while it was read ahead.
    ended: bool,
    bytes: usize,
}

impl<B: Body> Peeked<B> {
    fn new(body: B) -> Self {
        Self {
            body: Box::pin(body),
            ahead: VecDeque::new(),
            ended: false,
            bytes: 0,
        }
    }

    /// Reads on; ready once the body ended, failed, or [`MAX_REFUSAL_BODY`] bytes came.
    fn poll_read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        while !self.ended && self.bytes < MAX_REFUSAL_BODY {
            match self.body.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(error))) => {
                    self.ended = true;
                    self.ahead.push_back(Err(error));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    self.bytes += frame.data_ref().map_or(0, Buf::remaining);
                    self.ahead.push_back(Ok(frame));
                }
            }
        }
        Poll::Ready(())
    }

    /// The limit the bytes read say ran out.
    fn ran_out(&self) -> Option<Dimension> {
        let mut bytes = Vec::with_capacity(self.bytes.min(MAX_REFUSAL_BODY));
        for frame in self.ahead.iter().flatten() {
            if let Some(data) = frame.data_ref() {
                // Only the first chunk of a segmented buffer is seen; `Bytes` has just one.
                bytes.extend_from_slice(data.chunk());
            }
        }
        error_type(&bytes).and_then(|kind| Dimension::of_error_type(&kind))
    }

    /// The next frame for the caller: those read ahead first.
    pub(crate) fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Polled<B>> {
        if let Some(frame) = self.ahead.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if self.ended {
            return Poll::Ready(None);
        }
        self.body.as_mut().poll_frame(cx)
    }

    /// The body, without the frames read ahead.
    pub(crate) fn into_body(self) -> B
    where
        B: Unpin,
    {
        *Pin::into_inner(self.body)
    }

    /// The body, to print.
    pub(crate) fn inner(&self) -> &B {
        &self.body
    }

    pub(crate) fn is_end_stream(&self) -> bool {
        self.ahead.is_empty() && (self.ended || self.body.is_end_stream())
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        if self.ended {
            let left = self
                .ahead
                .iter()
                .flatten()
                .filter_map(|frame| frame.data_ref())
                .map(|data| data.remaining() as u64)
                .sum();
            return SizeHint::with_exact(left);
        }
        // Some of it was read ahead: what is left is less sure than the body says.
        let hint = self.body.size_hint();
        let mut loose = SizeHint::new();
        loose.set_lower(hint.lower().saturating_sub(self.bytes as u64));
        if let Some(upper) = hint.upper() {
            loose.set_upper(upper.saturating_add(self.bytes as u64));
        }
        loose
    }
}

/// A 429 held while its body is read.
pub(crate) struct Reading<B: Body> {
    head: Parts,
    body: Peeked<B>,
    deadline: Pin<Box<Sleep>>,
    ticket: Ticket,
    permit: Option<OwnedSemaphorePermit>,
}

impl<B: Body> Reading<B> {
    pub(crate) fn new(
        response: Response<B>,
        ticket: Ticket,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        let (head, body) = response.into_parts();
        Self {
            head,
            body: Peeked::new(body),
            deadline: Box::pin(tokio::time::sleep(REFUSAL_READ_TIME)),
            ticket,
            permit,
        }
    }

    /// Ready once enough of the body was read, or the time for it is up.
    pub(crate) fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.body.poll_read_ahead(cx).is_ready() {
            return Poll::Ready(());
        }
        self.deadline.as_mut().poll(cx)
    }

    /// The bucket learns from the refusal; the answer goes on, whole.
    pub(crate) fn finish(self) -> Response<ResponseBody<B>> {
        let ran_out = self.body.ran_out();
        let watch = self
            .ticket
            .learn(self.head.status, &self.head.headers, self.permit, ran_out);
        Response::from_parts(self.head, ResponseBody::peeked(self.body, watch))
    }
}

/// `{"error": {"type": ...}}`, as Together and OpenAI send it.
#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: Option<String>,
}

/// The error type a refusal's body names, if it is whole JSON of that shape.
fn error_type(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<ErrorBody>(bytes).ok()?.error.kind
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_type_names_the_limit_that_ran_out() {
        let body = |kind: &str| {
            format!(r#"{{"error":{{"message":"slow down","type":"{kind}","param":null}}}}"#)
        };
        let ran_out = |text: &str| {
            error_type(text.as_bytes()).and_then(|kind| Dimension::of_error_type(&kind))
        };
        assert_eq!(
            ran_out(&body("dynamic_token_limited")),
            Some(Dimension::Tokens)
        );
        assert_eq!(
            ran_out(&body("dynamic_request_limited")),
            Some(Dimension::Requests)
        );
        assert_eq!(ran_out(&body("credit_limit")), None);
        assert_eq!(ran_out(r#"{"error":{"type":"dynamic_tok"#), None);
        assert_eq!(ran_out("<html>429</html>"), None);
    }
}
