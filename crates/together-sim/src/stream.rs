//! Streamed answers: a chat or text completion sent as server-sent events, as Together sends
//! them with `"stream": true`.
//!
//! Each word of the reply is one `chat.completion.chunk` (or `text_completion`) event; the
//! chunk that carries `finish_reason` also carries `usage` (Together does, with or without
//! `stream_options`); `stream_options.include_usage: true` adds OpenAI's usage-only chunk
//! (`choices: []`) after it, and `include_usage: false` leaves `usage` out. Then
//! `data: [DONE]`. Events go out at [`StreamSettings::chunks_per_second`]; the
//! `stream_cut_rate` fault ends a stream with an error halfway, as a dropped connection does.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use serde_json::{Value, json};
use tokio::time::{Instant, Sleep};

/// How streams are paced.
pub(crate) struct StreamPace {
    /// The time between two events.
    pub(crate) gap: Duration,
    /// Events sent before the stream is cut, if it is.
    pub(crate) cut_after: Option<usize>,
}

/// The events of a streamed answer, from the whole answer `body` (a `chat.completion` or a
/// `text_completion`) and the request `json` that asked for it.
pub(crate) fn events(body: &Value, json: &Value) -> VecDeque<Bytes> {
    let chat = body["object"] == "chat.completion";
    let (object, text) = if chat {
        (
            "chat.completion.chunk",
            body["choices"][0]["message"]["content"].as_str(),
        )
    } else {
        ("text_completion", body["choices"][0]["text"].as_str())
    };
    let head = |choices: Value| json!({"id": body["id"], "object": object, "created": body["created"], "model": body["model"], "choices": choices});
    let piece = |text: String, first: bool| {
        if chat {
            let delta = if first {
                json!({"role": "assistant", "content": text})
            } else {
                json!({"content": text})
            };
            json!([{"index": 0, "delta": delta, "finish_reason": null}])
        } else {
            json!([{"index": 0, "text": text, "finish_reason": null}])
        }
    };
    let mut events: Vec<Value> = text
        .unwrap_or("")
        .split_inclusive(' ')
        .enumerate()
        .map(|(at, word)| head(piece(word.to_owned(), at == 0)))
        .collect();
    let finish = if chat {
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    } else {
        json!([{"index": 0, "text": "", "finish_reason": "stop"}])
    };
    let mut last = head(finish);
    let include_usage = json["stream_options"]["include_usage"].as_bool();
    if include_usage != Some(false) {
        last["usage"] = body["usage"].clone();
    }
    events.push(last);
    if include_usage == Some(true) {
        let mut usage_only = head(json!([]));
        usage_only["usage"] = body["usage"].clone();
        events.push(usage_only);
    }
    let mut events: VecDeque<Bytes> = events
        .iter()
        .map(|event| Bytes::from(format!("data: {event}\n\n")))
        .collect();
    events.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    events
}

/// A body that sends `events` one at a time, `pace.gap` apart.
pub(crate) struct EventStream {
    events: VecDeque<Bytes>,
    gap: Duration,
    next: Pin<Box<Sleep>>,
    cut_after: Option<usize>,
    sent: usize,
}

impl EventStream {
    pub(crate) fn new(events: VecDeque<Bytes>, pace: StreamPace) -> Self {
        Self {
            events,
            gap: pace.gap,
            // The first event goes at once: the head and first token are not held back.
            next: Box::pin(tokio::time::sleep(Duration::ZERO)),
            cut_after: pace.cut_after,
            sent: 0,
        }
    }
}

impl Body for EventStream {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.events.is_empty() {
            return Poll::Ready(None);
        }
        if self.next.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if self.cut_after.is_some_and(|cut| self.sent >= cut) {
            self.events.clear();
            return Poll::Ready(Some(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "stream cut (injected fault)",
            ))));
        }
        let gap = self.gap;
        self.next.as_mut().reset(Instant::now() + gap);
        self.sent += 1;
        Poll::Ready(self.events.pop_front().map(|event| Ok(Frame::data(event))))
    }

    fn is_end_stream(&self) -> bool {
        self.events.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer() -> Value {
        json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "one two three"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}})
    }

    fn parsed(events: &VecDeque<Bytes>) -> Vec<Value> {
        events
            .iter()
            .map(|event| std::str::from_utf8(event).unwrap())
            .filter_map(|event| event.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str(data.trim()).ok())
            .collect()
    }

    #[test]
    fn a_chat_streams_a_word_a_chunk_with_usage_on_the_finish_chunk_then_done() {
        let events = events(&answer(), &json!({"stream": true}));
        assert_eq!(events.back().unwrap().as_ref(), b"data: [DONE]\n\n");
        let chunks = parsed(&events);
        assert_eq!(chunks.len(), 4);
        let text: String = chunks
            .iter()
            .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "one two three");
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
        assert_eq!(chunks[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(chunks[3]["usage"]["total_tokens"], 8);
        assert!(chunks[..3].iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn stream_options_add_openais_usage_chunk_or_leave_usage_out() {
        let with = parsed(&events(
            &answer(),
            &json!({"stream_options": {"include_usage": true}}),
        ));
        let last = with.last().unwrap();
        assert_eq!(last["choices"], json!([]));
        assert_eq!(last["usage"]["total_tokens"], 8);
        let without = parsed(&events(
            &answer(),
            &json!({"stream_options": {"include_usage": false}}),
        ));
        assert!(without.iter().all(|c| c.get("usage").is_none()));
    }
}
