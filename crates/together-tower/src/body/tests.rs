//! The buffer layer: bodies read once, metadata read, large bodies streamed untouched.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};

use super::{BodyNotBuffered, BufferBodyLayer, BufferedBody, RequestMeta};

/// A body that arrives in chunks, with optional trailers and an optional size it admits to.
struct Chunks {
    chunks: VecDeque<Bytes>,
    trailers: Option<HeaderMap>,
    announced: Option<u64>,
}

impl Chunks {
    fn new(chunks: &[&'static str]) -> Self {
        Self {
            chunks: chunks
                .iter()
                .map(|chunk| Bytes::from_static(chunk.as_bytes()))
                .collect(),
            trailers: None,
            announced: None,
        }
    }
}

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(chunk) = self.chunks.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Poll::Ready(
            self.trailers
                .take()
                .map(|trailers| Ok(Frame::trailers(trailers))),
        )
    }

    fn size_hint(&self) -> SizeHint {
        self.announced
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// What the inner service saw: its body's bytes and trailers, its metadata, and whether it
/// was marked as not buffered.
#[derive(Debug, Default, Clone)]
struct Seen {
    bytes: Bytes,
    trailers: Option<HeaderMap>,
    meta: Option<RequestMeta>,
    not_buffered: bool,
    could_clone: bool,
}

async fn through_buffer<B>(limit: usize, body: B) -> Seen
where
    B: Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<tower::BoxError>,
{
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = Arc::clone(&seen);
    let inner = tower::service_fn(move |request: Request<BufferedBody<B>>| {
        let record = Arc::clone(&record);
        async move {
            let could_clone = request.body().try_clone().is_some();
            let meta = request.extensions().get::<RequestMeta>().cloned();
            let not_buffered = request.extensions().get::<BodyNotBuffered>().is_some();
            let collected = request.into_body().collect().await?;
            let trailers = collected.trailers().cloned();
            *record.lock().unwrap() = Seen {
                bytes: collected.to_bytes(),
                trailers,
                meta,
                not_buffered,
                could_clone,
            };
            Ok::<_, tower::BoxError>(Response::new(()))
        }
    });
    let service = BufferBodyLayer::new().with_limit(limit).layer(inner);
    let request = Request::post("/v1/embeddings").body(body).unwrap();
    service.oneshot(request).await.unwrap();
    seen.lock().unwrap().clone()
}

#[tokio::test]
async fn a_small_json_body_is_buffered_and_its_fields_read() {
    let body = Chunks::new(&[
        r#"{"model":"m-1","#,
        r#""input":["a","b","c"],"#,
        r#""max_tokens":7}"#,
    ]);
    let seen = through_buffer(1_024, body).await;
    assert_eq!(
        seen.bytes,
        r#"{"model":"m-1","input":["a","b","c"],"max_tokens":7}"#
    );
    let meta = seen.meta.unwrap();
    assert_eq!(
        (meta.model.as_deref(), meta.input_count, meta.max_tokens),
        (Some("m-1"), Some(3), Some(7))
    );
    assert!(seen.could_clone && !seen.not_buffered);
}

#[tokio::test]
async fn a_body_over_the_limit_streams_through_whole_and_is_marked() {
    let body = Chunks::new(&["0123456789", "abcdefghij", "KLMNOPQRST", "end"]);
    let seen = through_buffer(15, body).await;
    assert_eq!(seen.bytes, "0123456789abcdefghijKLMNOPQRSTend");
    assert!(seen.not_buffered && !seen.could_clone);
    assert_eq!(seen.meta, None);
}

#[tokio::test]
async fn a_body_that_announces_its_size_over_the_limit_is_not_read_at_all() {
    let mut body = Chunks::new(&["0123456789", "abcdefghij"]);
    body.announced = Some(20);
    let seen = through_buffer(10, body).await;
    assert_eq!(seen.bytes, "0123456789abcdefghij");
    assert!(seen.not_buffered);
}

#[tokio::test]
async fn invalid_json_passes_untouched_without_metadata() {
    for text in ["not json {", r#"{"model": "unterminated"#, "[1,2,3]", ""] {
        let seen = through_buffer(1_024, Full::new(Bytes::from(text))).await;
        assert_eq!(seen.bytes, text);
        assert_eq!(seen.meta, None, "{text:?}");
        assert!(seen.could_clone);
    }
}

#[tokio::test]
async fn trailers_are_kept() {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-checksum", "abc".parse().unwrap());
    let mut body = Chunks::new(&["{}"]);
    body.trailers = Some(trailers.clone());
    let seen = through_buffer(1_024, body).await;
    assert_eq!(seen.trailers, Some(trailers));
    assert_eq!(
        seen.meta,
        Some(RequestMeta {
            body_bytes: 2,
            ..RequestMeta::default()
        })
    );
}

/// A body whose chunks come down a channel: nothing is there until the sender sends.
struct Channel(tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>);

impl Body for Channel {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| chunk.map(Frame::data)))
    }
}

/// An inner service that counts its clones and the requests it was sent.
#[derive(Default)]
struct Counted {
    clones: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        Self {
            clones: Arc::clone(&self.clones),
            sent: Arc::clone(&self.sent),
        }
    }
}

impl<B> Service<Request<BufferedBody<B>>> for Counted {
    type Response = Response<()>;
    type Error = tower::BoxError;
    type Future = std::future::Ready<Result<Response<()>, tower::BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), tower::BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Request<BufferedBody<B>>) -> Self::Future {
        self.sent.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Response::new(())))
    }
}

#[tokio::test]
async fn a_whole_body_is_sent_at_once_without_a_clone_of_the_service() {
    let inner = Counted::default();
    let (clones, sent) = (Arc::clone(&inner.clones), Arc::clone(&inner.sent));
    let mut service = BufferBodyLayer::new().layer(inner);
    let body = Full::new(Bytes::from_static(br#"{"model":"m"}"#));
    let request = Request::post("/v1/chat/completions").body(body).unwrap();
    let ready = ServiceExt::<Request<Full<Bytes>>>::ready(&mut service);
    let future = ready.await.unwrap().call(request);
    // Sent as it was called, before its future was polled.
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    future.await.unwrap();
    assert_eq!(clones.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_body_that_must_be_waited_for_is_read_as_it_comes() {
    let inner = Counted::default();
    let (clones, sent) = (Arc::clone(&inner.clones), Arc::clone(&inner.sent));
    let mut service = BufferBodyLayer::new().layer(inner);
    let (sender, receiver) = tokio::sync::mpsc::channel(4);
    let request = Request::post("/v1/chat/completions")
        .body(Channel(receiver))
        .unwrap();
    let ready = ServiceExt::<Request<Channel>>::ready(&mut service);
    let future = ready.await.unwrap().call(request);
    assert_eq!(sent.load(Ordering::SeqCst), 0, "sent before its body came");
    // The ready service went with the request; the layer kept a clone.
    assert_eq!(clones.load(Ordering::SeqCst), 1);
    tokio::spawn(async move {
        for chunk in [&br#"{"model":"#[..], &br#""m"}"#[..]] {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            sender.send(Ok(Bytes::from_static(chunk))).await.unwrap();
        }
    });
    // Only a waker registered by the future's own poll can finish this.
    future.await.unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_body_that_fails_as_it_is_read_is_never_sent() {
    let inner = Counted::default();
    let sent = Arc::clone(&inner.sent);
    let mut service = BufferBodyLayer::new().layer(inner);
    let (sender, receiver) = tokio::sync::mpsc::channel(1);
    sender
        .send(Err(std::io::Error::other("reset")))
        .await
        .unwrap();
    let request = Request::post("/v1/chat/completions")
        .body(Channel(receiver))
        .unwrap();
    let ready = ServiceExt::<Request<Channel>>::ready(&mut service);
    let error = ready.await.unwrap().call(request).await.unwrap_err();
    assert_eq!(error.to_string(), "reset");
    assert_eq!(sent.load(Ordering::SeqCst), 0);
}
