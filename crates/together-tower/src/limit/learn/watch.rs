//! The response body of [`RateLimit`](crate::limit::RateLimit): the watcher of answers.
//!
//! Some bodies are watched as they stream past; every other body passes through untouched.
//!
//! - For a request charged against a token budget, the last few kilobytes are kept, and the
//!   answer's `usage` (the last one, so a stream's final event counts) corrects the charge
//!   once: unused `max_tokens` come back to the bucket, and a longer answer than estimated is
//!   charged, up to the token burst (a larger number is logged and not believed). It is read
//!   when the body ends, when a stream's `data: [DONE]` passes (clients stop there and drop
//!   the body, before its end), or when the body is dropped or fails after its `usage` was
//!   seen. A body without `usage`, or dropped before it, keeps the estimate: the chunks seen
//!   so far prove only a lower bound of what the server will charge for the answer.
//! - For a request that holds a concurrency slot, the slot is held until the body ends, is
//!   dropped or fails: a stream is one call for as long as it streams.
//! - For a job create that succeeded, and a read of jobs (one job, a cancel, the list), the
//!   body is kept (up to [`MAX_JOB_BODY`]) and read for job ids and states when it ends (see
//!   [`jobs`](crate::limit::jobs)). A body dropped before its end, or larger, teaches nothing.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use super::Feedback;
use super::peeked::Peeked;
use crate::limit::jobs::{self, Slots};

/// How much of a body's end is kept to find its `usage`.
const TAIL: usize = 8 * 1024;

/// The largest job answer read; a larger list teaches nothing.
const MAX_JOB_BODY: usize = 1024 * 1024;

pin_project! {
    /// The inner body, read once on its way to the caller.
    pub struct ResponseBody<B>
    where
        B: Body,
    {
        #[pin]
        inner: Inner<B>,
        watch: Option<Box<Watch>>,
    }
}

pin_project! {
    #[project = InnerProj]
    #[project_ref = InnerRef]
    enum Inner<B>
    where
        B: Body,
    {
        // Most bodies: read in place.
        Plain {
            #[pin]
            body: B,
        },
        // A refusal whose first frames were read for its error type. Boxed: refusals are
        // rare, and every answer's body is as large as the largest variant.
        Peeked {
            body: Box<Peeked<B>>,
        },
    }
}

/// What a body is watched for.
pub(crate) enum Watch {
    Tokens(TokenCount),
    /// Nothing to read: the body only holds the request's concurrency slot until it ends.
    Slot {
        _slot: OwnedSemaphorePermit,
    },
    Jobs {
        slots: Arc<Slots>,
        answer: JobAnswer,
        body: Vec<u8>,
        /// The body grew past [`MAX_JOB_BODY`].
        too_large: bool,
    },
}

/// Which answer about jobs a body is.
#[derive(Debug, Clone, Copy)]
pub(crate) enum JobAnswer {
    /// A create that succeeded; the number of the slot it holds.
    Created(u64),
    /// A read of one job, a cancel, or the list.
    Read,
}

impl Watch {
    /// A token charge to settle from the answer's `usage`, and the request's concurrency
    /// slot, if it holds one, until the body ends.
    pub(crate) fn tokens(
        bucket: Arc<dyn Feedback>,
        charged: u64,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Box<Self> {
        Box::new(Watch::Tokens(TokenCount {
            bucket,
            charged: Some(charged),
            tail: Vec::new(),
            _slot: slot,
        }))
    }

    /// A concurrency slot held until the body ends.
    pub(crate) fn slot(slot: OwnedSemaphorePermit) -> Box<Self> {
        Box::new(Watch::Slot { _slot: slot })
    }

    pub(crate) fn jobs(slots: Arc<Slots>, answer: JobAnswer) -> Box<Self> {
        Box::new(Watch::Jobs {
            slots,
            answer,
            body: Vec::new(),
            too_large: false,
        })
    }

    fn observe(&mut self, bytes: &[u8]) {
        match self {
            Watch::Tokens(count) => count.observe(bytes),
            Watch::Slot { .. } => {}
            Watch::Jobs {
                body, too_large, ..
            } => {
                if *too_large || body.len() + bytes.len() > MAX_JOB_BODY {
                    *too_large = true;
                    *body = Vec::new();
                } else {
                    body.extend_from_slice(bytes);
                }
            }
        }
    }

    fn finish(self) {
        match self {
            Watch::Tokens(mut count) => count.settle(),
            Watch::Slot { .. }
            | Watch::Jobs {
                too_large: true, ..
            } => {}
            Watch::Jobs {
                slots,
                answer: JobAnswer::Created(serial),
                body,
                ..
            } => {
                if let Some(id) = jobs::created_id(&body) {
                    slots.name(serial, id);
                }
            }
            Watch::Jobs {
                slots,
                answer: JobAnswer::Read,
                body,
                ..
            } => {
                if let Some((seen, whole_list)) = jobs::read_jobs(&body) {
                    slots.seen(&seen, whole_list);
                }
            }
        }
    }
}

/// A token charge waiting for the answer's `usage`.
pub(crate) struct TokenCount {
    bucket: Arc<dyn Feedback>,
    /// The estimate charged, until the charge is settled.
    charged: Option<u64>,
    tail: Vec<u8>,
    /// The request's concurrency slot, if it holds one: freed with the count.
    _slot: Option<OwnedSemaphorePermit>,
}

/// Whether `tail` ends with the event that ends an OpenAI-style stream: a line `data: [DONE]`
/// (the space is optional in server-sent events), then line ends of either kind.
fn ends_the_stream(tail: &[u8]) -> bool {
    let Some(field) = tail.trim_ascii_end().strip_suffix(b"[DONE]") else {
        return false;
    };
    let Some(line) = field.trim_ascii_end().strip_suffix(b"data:") else {
        return false;
    };
    // `data:` starts its line (or the bytes kept).
    line.last()
        .is_none_or(|&byte| byte == b'\n' || byte == b'\r')
}

impl<B: Body> ResponseBody<B> {
    /// `body`, watched for what `watch` says.
    pub(crate) fn new(body: B, watch: Option<Box<Watch>>) -> Self {
        Self {
            inner: Inner::Plain { body },
            watch,
        }
    }

    /// A body whose first frames were read ahead, watched for what `watch` says.
    pub(crate) fn peeked(body: Peeked<B>, watch: Option<Box<Watch>>) -> Self {
        Self {
            inner: Inner::Peeked {
                body: Box::new(body),
            },
            watch,
        }
    }

    /// The inner body.
    ///
    /// For an adaptive bucket with a token budget, a 429's first bytes (up to 4 KiB) were read
    /// for its error type, and they are not in the inner body: read such a body through this
    /// one to see them.
    pub fn into_inner(self) -> B
    where
        B: Unpin,
    {
        match self.inner {
            Inner::Plain { body } => body,
            Inner::Peeked { body } => body.into_body(),
        }
    }
}

impl TokenCount {
    fn observe(&mut self, bytes: &[u8]) {
        if self.charged.is_none() {
            return;
        }
        if bytes.len() >= TAIL {
            self.tail.clear();
            self.tail.extend_from_slice(&bytes[bytes.len() - TAIL..]);
        } else {
            self.tail.extend_from_slice(bytes);
            if self.tail.len() > TAIL {
                let excess = self.tail.len() - TAIL;
                self.tail.drain(..excess);
            }
        }
        if ends_the_stream(&self.tail) {
            self.settle();
        }
    }

    /// Corrects the charge from the last `usage` seen, once; without one, the estimate stays.
    fn settle(&mut self) {
        if let Some(charged) = self.charged.take() {
            match usage(&self.tail) {
                Some(used) => self.bucket.correct_tokens(charged, used),
                None => self.bucket.estimate_kept(charged),
            }
            self.tail = Vec::new();
        }
    }
}

impl Drop for TokenCount {
    /// A body dropped or failed after its `usage` passed still settles: a client that stops
    /// reading at a stream's last event has read the whole answer.
    fn drop(&mut self) {
        self.settle();
    }
}

/// `usage` as OpenAI-shaped answers carry it.
#[derive(Deserialize)]
struct Usage {
    total_tokens: Option<u64>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
}

/// The tokens the last `"usage"` object in `tail` reports.
fn usage(tail: &[u8]) -> Option<u64> {
    const NEEDLE: &[u8] = b"\"usage\"";
    let at = tail
        .windows(NEEDLE.len())
        .rposition(|window| window == NEEDLE)?;
    let rest = &tail[at + NEEDLE.len()..];
    let colon = rest.iter().position(|&byte| byte == b':')?;
    let mut values = serde_json::Deserializer::from_slice(&rest[colon + 1..]).into_iter::<Usage>();
    let usage = values.next()?.ok()?;
    usage.total_tokens.or_else(|| {
        Some(
            usage
                .prompt_tokens?
                .saturating_add(usage.completion_tokens.unwrap_or(0)),
        )
    })
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = ready!(match this.inner.project() {
            InnerProj::Plain { body } => body.poll_frame(cx),
            InnerProj::Peeked { body } => body.poll_frame(cx),
        });
        if let Some(watch) = this.watch {
            match &frame {
                // Only the first chunk of a segmented buffer is seen; `Bytes` has just one.
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        watch.observe(data.chunk());
                    }
                }
                None => {
                    if let Some(watch) = this.watch.take() {
                        watch.finish();
                    }
                }
                // A body that failed: its slot is freed, and a token charge settles only if
                // the answer's `usage` had passed.
                Some(Err(_)) => *this.watch = None,
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Plain { body } => body.is_end_stream(),
            Inner::Peeked { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Plain { body } => body.size_hint(),
            Inner::Peeked { body } => body.size_hint(),
        }
    }
}

impl<B: Body + std::fmt::Debug> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (inner, read_ahead): (&dyn std::fmt::Debug, bool) = match &self.inner {
            Inner::Plain { body } => (body, false),
            Inner::Peeked { body } => (body.inner(), true),
        };
        f.debug_struct("ResponseBody")
            .field("inner", inner)
            .field("read_ahead", &read_ahead)
            .field(
                "watching",
                &match self.watch.as_deref() {
                    None => "nothing",
                    Some(Watch::Tokens(_)) => "tokens",
                    Some(Watch::Jobs { .. }) => "jobs",
                    Some(Watch::Slot { .. }) => "the end, for its slot",
                },
            )
            .finish()
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn usage_is_found_at_the_end_of_json_and_of_a_stream() {
        let chat = br#"{"id":"x","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":12,"completion_tokens":3,"total_tokens":15}}"#;
        assert_eq!(usage(chat), Some(15));
        let no_total = br#"{"usage": {"prompt_tokens": 12, "completion_tokens": 3}}"#;
        assert_eq!(usage(no_total), Some(15));
        let stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":7,\"total_tokens\":12}}\n\n\
            data: [DONE]\n\n";
        assert_eq!(usage(stream), Some(12));
        // The last usage counts.
        let two = br#"{"usage":{"total_tokens":1}} {"usage":{"total_tokens":2}}"#;
        assert_eq!(usage(two), Some(2));
        for garbage in [
            &b""[..],
            b"\"usage\"",
            b"\"usage\":",
            b"\"usage\": [1]",
            b"{\"usage\":{\"x\":1}}",
        ] {
            assert_eq!(usage(garbage), None, "{}", String::from_utf8_lossy(garbage));
        }
    }

    /// Feedback that counts the tokens given back.
    #[derive(Default)]
    struct Settled(std::sync::Mutex<Vec<(u64, u64)>>);

    impl Feedback for Settled {
        fn sent_now(&self) -> crate::limit::learn::Sent {
            self.sent_at(std::time::Duration::ZERO)
        }
        fn sent_at(&self, at: std::time::Duration) -> crate::limit::learn::Sent {
            crate::limit::learn::Sent { epoch: 0, at }
        }
        fn model(&self) -> Option<&str> {
            None
        }
        fn reads_refusals(&self) -> bool {
            false
        }
        fn learn(&self, _: crate::limit::learn::Answer<'_>) {}
        fn correct_tokens(&self, charged: u64, used: u64) {
            self.0.lock().unwrap().push((charged, used));
        }
        fn slots(&self) -> Option<&Arc<crate::limit::jobs::Slots>> {
            None
        }
    }

    fn counting(bucket: &Arc<Settled>, charged: u64) -> TokenCount {
        TokenCount {
            bucket: Arc::clone(bucket) as Arc<dyn Feedback>,
            charged: Some(charged),
            tail: Vec::new(),
            _slot: None,
        }
    }

    #[test]
    fn the_tail_keeps_the_last_bytes_however_they_arrive() {
        let mut count = counting(&Arc::default(), 0);
        count.observe(&vec![b'x'; TAIL * 2]);
        count.observe(b"abc");
        assert_eq!(count.tail.len(), TAIL);
        assert!(count.tail.ends_with(b"xabc"));
    }

    #[test]
    fn a_stream_settles_at_its_done_however_the_server_writes_and_splits_it() {
        let usage = "data: {\"choices\":[],\"usage\":{\"total_tokens\":30}}";
        let streams: [&[&str]; 4] = [
            &[usage, "\n\ndata: [DONE]\n\n"],
            &[usage, "\r\n\r\ndata: [DONE]\r\n\r\n"],
            &[usage, "\n\ndata:[DONE]\n\n"],
            &[
                &usage[..9],
                &usage[9..],
                "\n\nda",
                "ta: [DO",
                "NE]",
                "\n",
                "\n",
            ],
        ];
        for frames in streams {
            let bucket = Arc::new(Settled::default());
            let mut count = counting(&bucket, 500);
            for frame in frames {
                count.observe(frame.as_bytes());
            }
            assert_eq!(*bucket.0.lock().unwrap(), [(500, 30)], "{frames:?}");
            drop(count);
            assert_eq!(
                bucket.0.lock().unwrap().len(),
                1,
                "settled twice: {frames:?}"
            );
        }
    }

    #[test]
    fn done_inside_an_event_does_not_end_the_stream() {
        for text in [
            "data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]\"}}]}\n\n",
            "data: {\"content\":\"x\"} data: [DONE]\n\n",
            "[DONE]\n\n",
        ] {
            assert!(!ends_the_stream(text.as_bytes()), "{text}");
        }
        assert!(ends_the_stream(b"data: [DONE]"));
    }
}
