//! Embedding a long list of inputs: split into requests of at most 20 inputs (Together's
//! guidance), sent through the stack a few at a time, the vectors put back in input order.
//!
//! [`EmbedInputs::embed`] does it all and reports every chunk that failed with the indices of
//! its inputs, so nothing is dropped silently. The pieces it is made of are public too, for a
//! caller that writes results as they come (as the CLI's `embed` does): [`chunks`],
//! [`embed_chunk`] and [`InOrder`].
//!
//! # Example
//!
//! ```
//! use bytes::Bytes;
//! use http::{Request, Response};
//! use http_body_util::Full;
//! use together_tower::embeddings::EmbedInputs;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // A stand-in for the stack: each input's vector is its length.
//! let together = tower::service_fn(|request: Request<Full<Bytes>>| async move {
//!     use http_body_util::BodyExt;
//!     let body = request.into_body().collect().await?.to_bytes();
//!     let asked: serde_json::Value = serde_json::from_slice(&body)?;
//!     let data: Vec<_> = asked["input"].as_array().unwrap().iter().enumerate()
//!         .map(|(index, text)| serde_json::json!({"index": index, "embedding": [text.as_str().unwrap().len()]}))
//!         .collect();
//!     let answer = serde_json::json!({"object": "list", "data": data}).to_string();
//!     Ok::<_, tower::BoxError>(Response::new(Full::new(Bytes::from(answer))))
//! });
//! let texts: Vec<String> = (0..45).map(|i| "x".repeat(i)).collect();
//! let request = |body: Bytes| {
//!     Request::post("https://api.together.xyz/v1/embeddings")
//!         .header("authorization", "Bearer my-key")
//!         .header("content-type", "application/json")
//!         .body(Full::new(body))
//!         .unwrap()
//! };
//! let embedded = EmbedInputs::new("BAAI/bge-large-en-v1.5")
//!     .embed(together, request, &texts)
//!     .await;
//! assert!(embedded.failures().is_empty());
//! assert_eq!(embedded.vectors()[44], Some(vec![44.0]));
//! # }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http::{Request, Response, StatusCode};
use http_body::Body;
use http_body_util::BodyExt;
use serde::Deserialize;
use tower::{BoxError, ServiceExt};
use tower_service::Service;

/// Together's guidance: at most 20 inputs per embeddings request.
pub const DEFAULT_CHUNK: usize = 20;

/// The ranges of input indices each request carries: `0..chunk`, `chunk..2*chunk`, ...
/// (a `chunk` of 0 counts as 1).
pub fn chunks(inputs: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    let chunk = chunk.max(1);
    (0..inputs)
        .step_by(chunk)
        .map(move |start| start..(start + chunk).min(inputs))
}

/// Why a chunk of inputs was not embedded.
#[derive(Debug)]
#[non_exhaustive]
pub enum ChunkError {
    /// The request failed without an answer, or was refused before sending (the rate
    /// limiter's errors).
    Failed(BoxError),
    /// The server answered with an error status; the start of its body.
    Status(StatusCode, String),
    /// The answer was not a list of as many embeddings as inputs, all of one non-zero length.
    Malformed(String),
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChunkError::Failed(error) => write!(f, "the request failed: {error}"),
            ChunkError::Status(status, body) => write!(f, "answered {status}: {body}"),
            ChunkError::Malformed(why) => write!(f, "the answer is not usable: {why}"),
        }
    }
}

impl std::error::Error for ChunkError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ChunkError::Failed(error) => Some(&**error),
            _ => None,
        }
    }
}

/// A chunk that failed: the indices of its inputs, and why.
#[derive(Debug)]
pub struct ChunkFailure {
    /// The indices of the inputs it carried.
    pub inputs: Range<usize>,
    /// Why it failed.
    pub error: ChunkError,
}

/// The body of an embeddings request for `inputs`.
pub fn request_body<T: AsRef<str>>(model: &str, inputs: &[T]) -> Bytes {
    let inputs: Vec<&str> = inputs.iter().map(AsRef::as_ref).collect();
    serde_json::json!({"model": model, "input": inputs})
        .to_string()
        .into()
}

/// Sends one chunk through `service` and returns its vectors in input order.
pub async fn embed_chunk<S, B, ResBody>(
    service: S,
    request: Request<B>,
    count: usize,
) -> Result<Vec<Vec<f32>>, ChunkError>
where
    S: Service<Request<B>, Response = Response<ResBody>>,
    S::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    let response = service
        .oneshot(request)
        .await
        .map_err(|error| ChunkError::Failed(error.into()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|error| ChunkError::Failed(error.into()))?
        .to_bytes();
    if !status.is_success() {
        let excerpt: String = String::from_utf8_lossy(&body).chars().take(200).collect();
        return Err(ChunkError::Status(status, excerpt));
    }
    vectors(&body, count)
}

/// The vectors of an embeddings answer for `count` inputs, in input order (by each item's
/// `index`, as the answer may list them in any order).
fn vectors(body: &[u8], count: usize) -> Result<Vec<Vec<f32>>, ChunkError> {
    #[derive(Deserialize)]
    struct Item {
        index: usize,
        embedding: Vec<f32>,
    }
    #[derive(Deserialize)]
    struct Answer {
        data: Vec<Item>,
    }
    let answer: Answer = serde_json::from_slice(body)
        .map_err(|error| ChunkError::Malformed(format!("not an embeddings list: {error}")))?;
    let mut slots: Vec<Option<Vec<f32>>> = vec![None; count];
    let got = answer.data.len();
    for item in answer.data {
        match slots.get_mut(item.index) {
            Some(slot @ None) => *slot = Some(item.embedding),
            _ => {
                return Err(ChunkError::Malformed(format!(
                    "index {} is repeated or beyond the {count} inputs",
                    item.index
                )));
            }
        }
    }
    let vectors = slots
        .into_iter()
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| ChunkError::Malformed(format!("{got} embeddings for {count} inputs")))?;
    same_nonzero_length(&vectors)?;
    Ok(vectors)
}

/// A vector that is empty, or shorter or longer than the others, is no embedding: the chunk
/// failed, rather than handing the caller a vector that breaks a search index later.
fn same_nonzero_length(vectors: &[Vec<f32>]) -> Result<(), ChunkError> {
    let Some(first) = vectors.first() else {
        return Ok(());
    };
    let dimension = first.len();
    if dimension == 0 {
        return Err(ChunkError::Malformed("an empty embedding".to_owned()));
    }
    match vectors.iter().position(|vector| vector.len() != dimension) {
        Some(at) => Err(ChunkError::Malformed(format!(
            "embedding {at} has {} dimensions, the first has {dimension}",
            vectors[at].len()
        ))),
        None => Ok(()),
    }
}

/// Puts chunks that finish in any order back in input order: each chunk is handed over once
/// every chunk before it has been.
#[derive(Debug)]
pub struct InOrder<T> {
    next: usize,
    waiting: BTreeMap<usize, Vec<T>>,
}

impl<T> InOrder<T> {
    /// Expects the chunk that starts at input `next` first.
    pub fn starting_at(next: usize) -> Self {
        Self {
            next,
            waiting: BTreeMap::new(),
        }
    }

    /// The index of the first input not handed over yet.
    pub fn next(&self) -> usize {
        self.next
    }

    /// Takes the chunk whose first input is `start`; returns every item now in order, with
    /// its input index.
    pub fn push(&mut self, start: usize, items: Vec<T>) -> Vec<(usize, T)> {
        self.waiting.insert(start, items);
        let mut ready = Vec::new();
        while let Some(items) = self.waiting.remove(&self.next) {
            let start = self.next;
            self.next += items.len().max(1);
            ready.extend(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| (start + i, item)),
            );
        }
        ready
    }
}

/// Splits inputs into embeddings requests and sends them, a few at a time.
#[derive(Debug, Clone)]
#[must_use]
pub struct EmbedInputs {
    model: String,
    chunk: usize,
    concurrency: usize,
}

impl EmbedInputs {
    /// Embeds with `model`, 20 inputs a request, 4 requests at a time.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            chunk: DEFAULT_CHUNK,
            concurrency: 4,
        }
    }

    /// At most `chunk` inputs per request (0 counts as 1).
    pub fn chunk(mut self, chunk: usize) -> Self {
        self.chunk = chunk.max(1);
        self
    }

    /// At most `concurrency` requests at once (0 counts as 1). The rate limit layer paces
    /// them; this bounds how many wait.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Embeds every input through `service`. `request` makes a request from a JSON body (the
    /// URL, the key and the body type are the caller's). Every chunk is sent, whatever
    /// happened to the others: the result holds a vector for each input of a chunk that
    /// succeeded, and a [`ChunkFailure`] for each that did not.
    pub async fn embed<S, B, ResBody, T>(
        &self,
        service: S,
        request: impl Fn(Bytes) -> Request<B>,
        inputs: &[T],
    ) -> Embedded
    where
        S: Service<Request<B>, Response = Response<ResBody>> + Clone,
        S::Error: Into<BoxError>,
        ResBody: Body,
        ResBody::Error: Into<BoxError>,
        T: AsRef<str>,
    {
        let mut vectors: Vec<Option<Vec<f32>>> = vec![None; inputs.len()];
        let mut failures = Vec::new();
        let mut running = FuturesUnordered::new();
        let mut pending = chunks(inputs.len(), self.chunk);
        loop {
            while running.len() < self.concurrency {
                let Some(range) = pending.next() else { break };
                let request = request(request_body(&self.model, &inputs[range.clone()]));
                let service = service.clone();
                running.push(async move {
                    let count = range.len();
                    (range, embed_chunk(service, request, count).await)
                });
            }
            let Some((range, result)) = running.next().await else {
                break;
            };
            match result {
                Ok(chunk) => {
                    for (slot, vector) in vectors[range].iter_mut().zip(chunk) {
                        *slot = Some(vector);
                    }
                }
                Err(error) => failures.push(ChunkFailure {
                    inputs: range,
                    error,
                }),
            }
        }
        failures.sort_by_key(|failure| failure.inputs.start);
        Embedded { vectors, failures }
    }
}

/// What [`EmbedInputs::embed`] did: a vector per input, in input order (`None` for inputs of
/// a failed chunk), and the failed chunks.
#[derive(Debug)]
pub struct Embedded {
    vectors: Vec<Option<Vec<f32>>>,
    failures: Vec<ChunkFailure>,
}

impl Embedded {
    /// A vector per input, in input order; `None` where the input's chunk failed.
    pub fn vectors(&self) -> &[Option<Vec<f32>>] {
        &self.vectors
    }

    /// The chunks that failed, in input order.
    pub fn failures(&self) -> &[ChunkFailure] {
        &self.failures
    }

    /// The vectors and the failures.
    pub fn into_parts(self) -> (Vec<Option<Vec<f32>>>, Vec<ChunkFailure>) {
        (self.vectors, self.failures)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body_util::Full;

    use super::*;

    /// A fake embeddings server: each input's vector is `[its length, its first number]`; the
    /// data come back in reverse order, after a delay that varies by chunk so chunks finish
    /// out of order; a chunk with an input that says `fail` is answered 500.
    fn fake() -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Full<Bytes>>,
        Error = BoxError,
        Future: Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(|request: Request<Full<Bytes>>| async move {
            let body = request.into_body().collect().await?.to_bytes();
            let asked: serde_json::Value = serde_json::from_slice(&body)?;
            let inputs: Vec<String> = serde_json::from_value(asked["input"].clone())?;
            let first: u64 = inputs[0].split(' ').next().unwrap().parse()?;
            tokio::time::sleep(Duration::from_millis(97 * first % 1_000)).await;
            if inputs.iter().any(|input| input.contains("fail")) {
                let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(response);
            }
            let data: Vec<_> = inputs
                .iter()
                .enumerate()
                .rev()
                .map(|(index, input)| {
                    let number: f32 = input.split(' ').next().unwrap().parse().unwrap();
                    serde_json::json!({"index": index, "embedding": [input.len(), number]})
                })
                .collect();
            let answer = serde_json::json!({"object": "list", "data": data});
            Ok(Response::new(Full::new(Bytes::from(answer.to_string()))))
        })
    }

    fn request(body: Bytes) -> Request<Full<Bytes>> {
        Request::post("/v1/embeddings")
            .body(Full::new(body))
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_thousand_inputs_of_mixed_sizes_come_back_in_order_and_a_failed_chunk_says_which() {
        // Input i is "i" followed by i % 37 words: sizes from 1 to 200-odd bytes.
        let mut inputs: Vec<String> = (0..1_000)
            .map(|i| format!("{i}{}", " word".repeat(i % 37)))
            .collect();
        inputs[433] = "433 fail".into();
        let embedded = EmbedInputs::new("m")
            .concurrency(7)
            .embed(fake(), request, &inputs)
            .await;

        let failures = embedded.failures();
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].inputs, 420..440);
        assert!(matches!(failures[0].error, ChunkError::Status(status, _) if status == 500));
        for (i, vector) in embedded.vectors().iter().enumerate() {
            if (420..440).contains(&i) {
                assert_eq!(vector, &None, "input {i}");
            } else {
                let expected = vec![inputs[i].len() as f32, i as f32];
                assert_eq!(vector.as_ref(), Some(&expected), "input {i}");
            }
        }
    }

    #[test]
    fn chunks_cover_every_input_once() {
        let all: Vec<_> = chunks(45, 20).collect();
        assert_eq!(all, [0..20, 20..40, 40..45]);
        assert_eq!(chunks(0, 20).count(), 0);
        assert_eq!(chunks(3, 0).count(), 3);
    }

    #[test]
    fn answers_that_do_not_match_the_inputs_are_malformed() {
        let two = br#"{"data":[{"index":1,"embedding":[1]},{"index":0,"embedding":[0]}]}"#;
        assert_eq!(vectors(two, 2).unwrap(), [vec![0.0], vec![1.0]]);
        for (body, count) in [
            (&two[..], 3),
            (
                br#"{"data":[{"index":0,"embedding":[0]},{"index":0,"embedding":[0]}]}"#,
                2,
            ),
            (br#"{"data":[{"index":5,"embedding":[0]}]}"#, 1),
            (b"not json", 1),
            // A vector missing, empty, or of another length than the others.
            (br#"{"data":[{"index":0}]}"#, 1),
            (br#"{"data":[{"index":0,"embedding":[]}]}"#, 1),
            (
                br#"{"data":[{"index":0,"embedding":[]},{"index":1,"embedding":[]}]}"#,
                2,
            ),
            (
                br#"{"data":[{"index":0,"embedding":[0,1]},{"index":1,"embedding":[1]}]}"#,
                2,
            ),
        ] {
            assert!(matches!(
                vectors(body, count),
                Err(ChunkError::Malformed(_))
            ));
        }
    }

    #[test]
    fn in_order_hands_chunks_over_once_all_before_them_are() {
        let mut order = InOrder::starting_at(0);
        assert!(order.push(2, vec!["c"]).is_empty());
        assert_eq!(
            order.push(0, vec!["a", "b"]),
            [(0, "a"), (1, "b"), (2, "c")]
        );
        assert_eq!(order.next(), 3);
    }
}
