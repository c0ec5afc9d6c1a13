//! A body whose first frames were read ahead (a refusal's, for its error type), handed on
//! whole: the frames read ahead first, then the rest.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};

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
    pub(crate) fn new(body: B) -> Self {
        Self {
            body: Box::pin(body),
            ahead: VecDeque::new(),
            ended: false,
            bytes: 0,
        }
    }

    /// Reads on; ready once the body ended, failed, or `most` bytes came.
    pub(crate) fn poll_read_ahead(&mut self, cx: &mut Context<'_>, most: usize) -> Poll<()> {
        while !self.ended && self.bytes < most {
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

    /// The bytes read ahead, up to `most`.
    pub(crate) fn read_ahead(&self, most: usize) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.bytes.min(most));
        for frame in self.ahead.iter().flatten() {
            if let Some(data) = frame.data_ref() {
                // Only the first chunk of a segmented buffer is seen; `Bytes` has just one.
                bytes.extend_from_slice(data.chunk());
            }
        }
        bytes.truncate(most);
        bytes
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
