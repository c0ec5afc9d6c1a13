//! Serving: a hyper HTTP/1 server with keep-alive and graceful shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api::{Shared, handle};
use crate::config::{Class, ClassLimits, SimConfig};
use crate::state::Stats;

/// How long shutdown waits for requests in flight before it drops them.
const DRAIN: Duration = Duration::from_secs(5);

/// The simulator.
#[derive(Debug)]
pub struct Sim;

impl Sim {
    /// Binds `config.listen` and serves in the background of the current tokio runtime.
    pub async fn start(config: SimConfig) -> std::io::Result<SimHandle> {
        let config = config
            .validate()
            .map_err(|error| std::io::Error::new(std::io::ErrorKind::InvalidInput, error))?;
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, Arc::clone(&shared), stopped));
        Ok(SimHandle {
            addr,
            shared,
            stop,
            task: Some(task),
        })
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<bool>) {
    let graceful = GracefulShutdown::new();
    let mut prune = tokio::time::interval(Duration::from_secs(10));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(shared.config().read_timeout())
        .max_header_size(shared.config().max_header_bytes);
    let mut backoff = AcceptBackoff::default();
    // While accepting fails, the loop waits here instead of trying again at once.
    let mut paused_until: Option<Instant> = None;
    loop {
        tokio::select! {
            accepted = listener.accept(), if paused_until.is_none() => match accepted {
                Ok((stream, _)) => {
                    backoff.reset();
                    let _ = stream.set_nodelay(true);
                    let shared = Arc::clone(&shared);
                    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
                    let connection = http.serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(graceful.watch(connection));
                }
                Err(_) => paused_until = Some(Instant::now() + backoff.next_pause()),
            },
            () = sleep_until(paused_until), if paused_until.is_some() => paused_until = None,
            _ = prune.tick() => shared.prune(),
            _ = stopped.changed() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(DRAIN, graceful.shutdown()).await;
}

async fn sleep_until(until: Option<Instant>) {
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}

/// How long to wait after a failed accept: 1 ms, doubling to 1 s, back to 1 ms after a
/// success. Accepting fails mostly when the process is out of file descriptors (EMFILE);
/// trying again at once would spin a core and serve no one until a descriptor is free.
#[derive(Debug, Clone, Copy)]
struct AcceptBackoff {
    next: Duration,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(1);
    const MAX: Duration = Duration::from_secs(1);

    fn next_pause(&mut self) -> Duration {
        let pause = self.next;
        self.next = (self.next * 2).min(Self::MAX);
        pause
    }

    fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self { next: Self::FIRST }
    }
}

/// A running simulator. Dropping it stops the server; [`SimHandle::shutdown`] also waits until
/// it has stopped.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, such as `http://127.0.0.1:40123` (Together's paths start with `/v1`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What it has answered so far (as `GET /sim/stats` reports it).
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// The limits it enforces now, scheduled changes that are due included.
    pub fn limits(&self) -> BTreeMap<Class, ClassLimits> {
        self.shared.limits()
    }

    /// Stops accepting, lets requests in flight finish (up to 5 s), and returns when done.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Fetches `GET /sim/stats` from a running simulator's JSON.
pub fn parse_stats(json: &[u8]) -> Result<Stats, serde_json::Error> {
    serde_json::from_slice(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_back_off_to_a_second_and_a_success_resets() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u128> = (0..13).map(|_| backoff.next_pause().as_millis()).collect();
        assert_eq!(
            pauses,
            [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_000, 1_000, 1_000]
        );
        backoff.reset();
        assert_eq!(backoff.next_pause(), Duration::from_millis(1));
    }
}
