//! A tonic client whose `Channel` sits under the stack.
//!
//! A small gRPC service, `together.v1.Inference/Chat`, runs in this process on a loopback port
//! and records when each call arrives. The client's channel sits under `TogetherLayer` in
//! `client::Tonic`, which hands it tonic's own body type, and refusals become a `Status` above
//! the stack. A classifier of its own maps the gRPC path to the chat class, so
//! the calls wait their turn at 5 a second; one that will not wait gets `RESOURCE_EXHAUSTED`.
//!
//! ```text
//! cargo run -p together-tower-examples --example tonic_client
//! ```

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::uri::PathAndQuery;
use together_tower::classify::{Classify, EndpointClass};
use together_tower::client::Tonic;
use together_tower::limit::MaxWait;
use together_tower::limit::error::into_status;
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, TogetherLayer};
use tonic::server::NamedService;
use tonic_prost::ProstCodec;
use tower::{BoxError, ServiceBuilder};

/// The request of `Inference/Chat`.
#[derive(Clone, PartialEq, prost::Message)]
struct ChatRequest {
    #[prost(string, tag = "1")]
    prompt: String,
}

/// Its reply.
#[derive(Clone, PartialEq, prost::Message)]
struct ChatReply {
    #[prost(string, tag = "1")]
    text: String,
}

const CHAT: &str = "/together.v1.Inference/Chat";

/// Maps the service's gRPC paths to Together's classes; the key is the `authorization`
/// metadata, as for HTTP.
#[derive(Debug, Clone, Copy)]
struct GrpcPaths;

impl Classify for GrpcPaths {
    fn classify<B>(&self, request: &http::Request<B>) -> EndpointClass {
        match request.uri().path() {
            CHAT => EndpointClass::Chat,
            _ => EndpointClass::Other,
        }
    }
}

/// The gRPC service: answers every chat, and notes when each arrived.
#[derive(Clone, Default)]
struct Inference {
    arrivals: Arc<Mutex<Vec<Instant>>>,
}

impl NamedService for Inference {
    const NAME: &'static str = "together.v1.Inference";
}

impl tonic::server::UnaryService<ChatRequest> for Inference {
    type Response = ChatReply;
    type Future = Ready<Result<tonic::Response<ChatReply>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<ChatRequest>) -> Self::Future {
        self.arrivals.lock().unwrap().push(Instant::now());
        let text = format!("Hello from gRPC, to {:?}", request.into_inner().prompt);
        ready(Ok(tonic::Response::new(ChatReply { text })))
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Inference {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let service = self.clone();
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<ChatReply, ChatRequest>::default());
            Ok(grpc.unary(service, request).await)
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let inference = Inference::default();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let server = tonic::transport::Server::builder()
        .add_service(inference.clone())
        .serve_with_incoming(tokio_stream_of(listener));
    tokio::spawn(server);
    println!("gRPC service at http://{addr}\n");

    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(5)))
        .class(EndpointClass::Chat, "chat")
        .build()?;
    let limits = Limits::builder(table).classifier(GrpcPaths).build();
    let stack = ServiceBuilder::new()
        // Refusals reach the caller as a Status, not as UNKNOWN.
        .map_err(into_status)
        .layer(TogetherLayer::new(limits))
        // The channel takes tonic's own body type; `Tonic` hands it one.
        .service(Tonic::new(channel));

    let started = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            let stack = stack.clone();
            tokio::spawn(async move { chat(stack, &format!("call {i}"), None).await })
        })
        .collect();
    for call in calls {
        call.await??;
    }
    let arrivals = inference.arrivals.lock().unwrap().clone();
    let spacing: Vec<u128> = arrivals
        .windows(2)
        .map(|pair| (pair[1] - pair[0]).as_millis())
        .collect();
    println!(
        "10 calls sent at once reached the service in {:.2} s, spaced (ms) {spacing:?}",
        started.elapsed().as_secs_f64()
    );
    let refused = chat(stack.clone(), "impatient", Some(Duration::ZERO)).await;
    let code = refused.as_ref().err().map(tonic::Status::code);
    println!("a call that will not wait: {code:?}");
    // Paced 200 ms apart; the check leaves room for a busy machine's scheduling.
    if code != Some(tonic::Code::ResourceExhausted) || spacing.iter().any(|&gap| gap < 150) {
        return Err("the calls were not paced, or the refusal was not RESOURCE_EXHAUSTED".into());
    }
    Ok(())
}

/// One unary call through `stack`, optionally unwilling to wait longer than `max_wait`.
async fn chat<S>(
    stack: S,
    prompt: &str,
    max_wait: Option<Duration>,
) -> Result<ChatReply, tonic::Status>
where
    S: tonic::client::GrpcService<tonic::body::Body>,
    S::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <S::ResponseBody as http_body::Body>::Error: Into<BoxError> + Send,
    S::Error: Into<BoxError>,
{
    let mut grpc = tonic::client::Grpc::new(stack);
    grpc.ready()
        .await
        .map_err(|error| tonic::Status::unavailable(error.into().to_string()))?;
    let mut request = tonic::Request::new(ChatRequest {
        prompt: prompt.to_owned(),
    });
    request.metadata_mut().insert(
        "authorization",
        "Bearer grpc-example-key".parse().expect("valid metadata"),
    );
    if let Some(max_wait) = max_wait {
        request.extensions_mut().insert(MaxWait(max_wait));
    }
    let codec = ProstCodec::<ChatRequest, ChatReply>::default();
    let reply = grpc
        .unary(request, PathAndQuery::from_static(CHAT), codec)
        .await?;
    Ok(reply.into_inner())
}

/// The listener's connections as the stream tonic's server takes.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    tokio_stream::wrappers::TcpListenerStream::new(listener)
}
