//! Serving connections: HTTP/1.1 with a header timeout, and a graceful shutdown that stops
//! accepting and lets the requests in flight finish within a bound.

use std::future::Future;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

/// How connections are served.
#[derive(Debug, Clone, Copy)]
pub struct ServeSettings {
    /// The longest a client may take to send a request's head, counted from when the
    /// connection is ready for one: a new connection, or a kept-alive one after its last
    /// answer. So it is also how long an idle connection stays open.
    pub header_timeout: Duration,
    /// The longest the requests in flight may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
}

/// How a shutdown went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every connection finished its requests and closed.
    All,
    /// Some connections were still busy when the grace period ended, and were cut.
    Cut,
}

/// Serves `app` on `listener` until `shutdown` completes, then stops accepting and waits up
/// to the grace period for the connections to finish what they are doing.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: ServeSettings,
    shutdown: impl Future<Output = ()>,
) -> Drained {
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, most often: wait rather than spin.
                    tracing::warn!(target: "together_tower::proxy", %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Answers are small frames; Nagle's delay would add to every one.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(target: "together_tower::proxy", %error, "connection ended");
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    tracing::info!(target: "together_tower::proxy", connections = open, "shutting down: no new connections; finishing the requests in flight");
    let drained = tokio::time::timeout(settings.shutdown_grace, graceful.shutdown()).await;
    match drained {
        Ok(()) => Drained::All,
        Err(_) => Drained::Cut,
    }
}

/// Completes at the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
