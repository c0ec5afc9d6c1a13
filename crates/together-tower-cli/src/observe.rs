//! A layer right above the HTTP client that notes every attempt that reaches the server, so a
//! run can count the server's 429s below the retry layer and plot sends over time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Request, Response};
use tower::{Layer, Service};

/// One attempt, as its answer came back.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// When the answer came, since the run began.
    pub at: Duration,
    /// Its status; `None` for an error before any status.
    pub status: Option<u16>,
}

/// Everything the layer saw.
#[derive(Debug)]
pub struct Observations {
    started: Instant,
    /// Attempts sent (answered or not).
    pub attempts: AtomicU64,
    /// 429s from the server.
    pub server_429: AtomicU64,
    /// 503s from the server.
    pub server_503: AtomicU64,
    log: Mutex<Vec<Attempt>>,
}

impl Observations {
    /// A log that starts now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            attempts: AtomicU64::new(0),
            server_429: AtomicU64::new(0),
            server_503: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        })
    }

    /// Every attempt so far.
    pub fn attempts_log(&self) -> Vec<Attempt> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn note(&self, status: Option<u16>) {
        match status {
            Some(429) => self.server_429.fetch_add(1, Ordering::Relaxed),
            Some(503) => self.server_503.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let attempt = Attempt {
            at: self.started.elapsed(),
            status,
        };
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(attempt);
    }
}

/// Applies [`Observe`].
#[derive(Debug, Clone)]
pub struct ObserveLayer(pub Arc<Observations>);

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            observations: Arc::clone(&self.0),
        }
    }
}

/// Notes each attempt and its answer.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    observations: Arc<Observations>,
}

impl<S, B, R> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: 'static,
    S::Error: 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        self.observations.attempts.fetch_add(1, Ordering::Relaxed);
        let observations = Arc::clone(&self.observations);
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            observations.note(
                result
                    .as_ref()
                    .ok()
                    .map(|response| response.status().as_u16()),
            );
            result
        })
    }
}
