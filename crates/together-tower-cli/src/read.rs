//! Reading an answer's body to its end, and for a streamed one, when its first token came
//! and how many tokens it carried.

use std::time::{Duration, Instant};

use http_body_util::BodyExt;

use crate::client::AnswerBody;

/// How much of a stream's end is kept to find its `usage`.
const TAIL: usize = 8 * 1024;

/// What reading a body showed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Read {
    /// For a stream: from the send to the first event with content.
    pub first_token: Option<Duration>,
    /// For a stream: the completion tokens its `usage` reported.
    pub completion_tokens: u64,
}

/// Reads `body` to its end (so the connection goes back to the pool). For a `stream`, notes
/// when the first event came, counted from `sent`, and the completion tokens of its last
/// `usage`, and stops at `data: [DONE]` as SSE clients do (async-openai, the `openai`
/// package): the stack must settle the charge there. A body that fails part-way is read as
/// far as it went.
pub async fn read_answer(mut body: AnswerBody, sent: Instant, stream: bool) -> Read {
    if !stream {
        let _ = body.collect().await;
        return Read::default();
    }
    let mut read = Read::default();
    let mut tail = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        let Some(data) = frame.data_ref() else {
            continue;
        };
        if read.first_token.is_none() && !data.is_empty() {
            read.first_token = Some(sent.elapsed());
        }
        tail.extend_from_slice(data);
        if tail.len() > TAIL {
            tail.drain(..tail.len() - TAIL);
        }
        if tail.trim_ascii_end().ends_with(b"data: [DONE]") {
            break;
        }
    }
    read.completion_tokens = completion_tokens(&tail);
    read
}

/// The completion tokens of the last event in `events` that carries `usage`.
fn completion_tokens(events: &[u8]) -> u64 {
    String::from_utf8_lossy(events)
        .lines()
        .rev()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str::<serde_json::Value>(data).ok())
        .find_map(|event| event["usage"]["completion_tokens"].as_u64())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_usage_of_a_stream_counts() {
        let events = b"data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n\
            data: {\"choices\":[],\"usage\":{\"completion_tokens\":7}}\n\n\
            data: {\"usage\":{\"completion_tokens\":9}}\n\ndata: [DONE]\n\n";
        assert_eq!(completion_tokens(events), 9);
        assert_eq!(completion_tokens(b"data: [DONE]\n\n"), 0);
        assert_eq!(completion_tokens(b"data: {\"usage\": nonsense"), 0);
    }
}
