//! Support for the integration tests: a small HTTP/1 server on a loopback port whose answers
//! a test scripts, and which keeps a log of what it saw, so tests judge the client from the
//! server's side.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// When it arrived, on the server's clock.
    pub at: Instant,
    /// Its path.
    pub path: String,
    /// Its `Authorization` header, if any.
    pub authorization: Option<String>,
    /// The status the server answered with.
    pub status: u16,
    /// The request body.
    pub body: Bytes,
}

/// Decides the answer to each request (its body read whole), given everything the server saw
/// before it.
pub trait Script:
    Fn(&Request<Bytes>, &[Seen]) -> Response<Full<Bytes>> + Send + Sync + 'static
{
}

impl<F> Script for F where
    F: Fn(&Request<Bytes>, &[Seen]) -> Response<Full<Bytes>> + Send + Sync + 'static
{
}

/// A server on `127.0.0.1` with a free port; it stops when dropped.
#[derive(Debug)]
pub struct LoopbackServer {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LoopbackServer {
    /// Starts serving; each request is answered by `script`.
    pub async fn start(script: impl Script) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let task = {
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let (log, script) = (Arc::clone(&log), Arc::clone(&script));
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (log, script) = (Arc::clone(&log), Arc::clone(&script));
                        async move {
                            let at = Instant::now();
                            let (parts, body) = request.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|body| body.to_bytes())
                                .unwrap_or_default();
                            let request = Request::from_parts(parts, body);
                            Ok::<_, Infallible>(answer(at, &request, &log, &*script))
                        }
                    });
                    tokio::spawn(
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service),
                    );
                }
            })
        };
        Ok(Self { addr, log, task })
    }

    /// The base URL, such as `http://127.0.0.1:40123`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Everything the server saw so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .clone()
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(
    at: Instant,
    request: &Request<Bytes>,
    log: &Mutex<Vec<Seen>>,
    script: &dyn Script,
) -> Response<Full<Bytes>> {
    let mut log = log.lock().unwrap_or_else(|poison| poison.into_inner());
    let response = script(request, &log);
    log.push(Seen {
        at,
        path: request.uri().path().to_owned(),
        authorization: request
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned),
        status: response.status().as_u16(),
        body: request.body().clone(),
    });
    response
}

/// A response with a status, headers and a JSON body.
pub fn json(status: u16, headers: &[(&str, &str)], body: &str) -> Response<Full<Bytes>> {
    let mut builder = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
        .expect("the test's own status and headers are valid")
}

/// hyper-util's pooled HTTP client, as users put it under the layers.
pub fn http_client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

/// What a running simulator saw (`GET /sim/stats`).
pub async fn sim_stats(base_url: &str) -> together_sim::Stats {
    let response = http_client::<http_body_util::Empty<Bytes>>()
        .get(
            format!("{base_url}/sim/stats")
                .parse()
                .expect("a simulator's URL is valid"),
        )
        .await
        .expect("the simulator answers its stats");
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the stats arrive whole")
        .to_bytes();
    together_sim::parse_stats(&body).expect("the stats are the simulator's JSON")
}
