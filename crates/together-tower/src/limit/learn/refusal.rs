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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use http::response::Parts;
use http_body::Body;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Sleep;

use super::peeked::Peeked;
use super::watch::ResponseBody;
use super::{Dimension, Feedback, Ticket};

/// The most of a refusal's body read for its error type.
pub(crate) const MAX_REFUSAL_BODY: usize = 4 * 1024;
/// The longest a refusal is held for its body after its head came.
pub(crate) const REFUSAL_READ_TIME: Duration = Duration::from_millis(50);

/// A 429 held while its body is read.
pub(crate) struct Reading<B: Body, F> {
    head: Parts,
    body: Peeked<B>,
    deadline: Pin<Box<Sleep>>,
    ticket: Ticket<F>,
    permit: Option<OwnedSemaphorePermit>,
}

impl<B: Body, F: Feedback + 'static> Reading<B, F> {
    pub(crate) fn new(
        response: Response<B>,
        ticket: Ticket<F>,
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
        if self.body.poll_read_ahead(cx, MAX_REFUSAL_BODY).is_ready() {
            return Poll::Ready(());
        }
        self.deadline.as_mut().poll(cx)
    }

    /// The bucket learns from the refusal; the answer goes on, whole.
    pub(crate) fn finish(self) -> Response<ResponseBody<B>> {
        let ran_out = error_type(&self.body.read_ahead(MAX_REFUSAL_BODY))
            .and_then(|kind| Dimension::of_error_type(&kind));
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
