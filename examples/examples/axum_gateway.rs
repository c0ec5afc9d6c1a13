//! An axum gateway in front of Together: teams call it with their team name, it calls Together
//! with the organisation's key, and each team gets a quota of its own.
//!
//! Two limits stack up. First a `RateLimitLayer` whose classifier takes the `x-team` header as
//! the caller's credential, so each team has its own bucket (5 chat requests a second here).
//! Then tower-http sets the organisation's key, and the whole stack keeps that key within what
//! Together allows it (600 chat requests a minute, which the simulated Together enforces): the
//! two teams' shares add up to the organisation's quota. A team that will not wait
//! (`x-max-wait-ms: 0`) is answered 429 with `Retry-After` by the gateway itself, before
//! anything reaches Together.
//!
//! ```text
//! cargo run -p together-tower-examples --example axum_gateway
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::Response;
use axum::routing::any;
use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderValue, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use together_sim::{Class, SimConfig};
use together_tower::body::BufferedBody;
use together_tower::classify::{Classify, EndpointClass, TogetherClassifier};
use together_tower::limit::{MaxWait, RateLimitLayer};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::{chat_body, empty, gateway_error, point_at_together, simulator};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};
use tower_http::set_header::SetRequestHeaderLayer;

/// Together's classes, with the team named in `x-team` as the caller.
#[derive(Debug, Clone, Copy)]
struct ByTeam;

impl Classify for ByTeam {
    fn classify<B>(&self, request: &http::Request<B>) -> EndpointClass {
        TogetherClassifier.classify(request)
    }

    fn credential<'r, B>(&self, request: &'r http::Request<B>) -> Option<&'r [u8]> {
        request.headers().get("x-team").map(HeaderValue::as_bytes)
    }
}

type Stack = BoxCloneSyncService<http::Request<Body>, Response, BoxError>;

/// The gateway's state: where Together is, and the stack that calls it.
#[derive(Clone)]
struct Gateway {
    together: String,
    stack: Stack,
}

/// Forwards one call to Together through the stack.
async fn forward(
    State(gateway): State<Gateway>,
    Path(path): Path<String>,
    mut request: Request,
) -> Response {
    if !point_at_together(&mut request, &gateway.together, &path) {
        return empty(StatusCode::BAD_REQUEST);
    }
    // A caller may say how long it will wait for its turn.
    let max_wait = request
        .headers()
        .get("x-max-wait-ms")
        .and_then(|value| value.to_str().ok()?.parse().ok());
    if let Some(max_wait) = max_wait {
        request
            .extensions_mut()
            .insert(MaxWait(Duration::from_millis(max_wait)));
    }
    match gateway.stack.oneshot(request).await {
        Ok(response) => response,
        // Refused before sending: 429 with Retry-After, as the caller expects of Together.
        Err(error) => gateway_error(&error),
    }
}

/// Each team 5 chat requests a second.
fn team_limits() -> Result<Limits<ByTeam>, BoxError> {
    let table = QuotaTable::builder()
        .group("chat", GroupQuota::rate(Rate::per_second(5)))
        .class(EndpointClass::Chat, "chat")
        .build()?;
    Ok(Limits::builder(table).classifier(ByTeam).build())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = simulator(600, SimConfig::default()).await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Body>>();
    let organisation = Limits::new(QuotaTable::together_defaults());
    let stack = ServiceBuilder::new()
        .map_response(|response: http::Response<_>| response.map(Body::new))
        // Each team's share.
        .layer(RateLimitLayer::new(team_limits()?))
        // Together sees the organisation's key; the teams never hold it.
        .layer(SetRequestHeaderLayer::overriding(
            AUTHORIZATION,
            HeaderValue::from_static("Bearer organisation-key"),
        ))
        // The organisation's quota at Together, with retries.
        .layer(TogetherLayer::new(organisation))
        .service(client);
    let gateway = Gateway {
        together: sim.url(),
        stack: BoxCloneSyncService::new(stack),
    };
    let app = Router::new()
        .route("/v1/{*path}", any(forward))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "gateway at http://{addr}, in front of simulated Together at {}\n",
        sim.url()
    );

    // Two teams send 15 requests each, all at once.
    let started = std::time::Instant::now();
    let calls: Vec<_> = ["team-a", "team-b"]
        .into_iter()
        .flat_map(|team| (0..15).map(move |_| tokio::spawn(call(addr, team, None))))
        .collect();
    let mut statuses = Vec::new();
    for call in calls {
        statuses.push(call.await??.0);
    }
    let seconds = started.elapsed().as_secs_f64();
    let ok = statuses.iter().filter(|status| status.is_success()).count();
    println!(
        "two teams, 15 requests each: {ok} of 30 answered 2xx in {seconds:.2} s (5 a second per team)"
    );

    // A third team that will not wait: its second request is refused by the gateway. It
    // comes once the organisation's bucket is at rest, which it would wait for too.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (first, _) = call(addr, "team-c", Some(0)).await?;
    let (second, retry_after) = call(addr, "team-c", Some(0)).await?;
    println!(
        "a team that will not wait: {first}, then {second} with Retry-After: {}",
        retry_after.as_deref().unwrap_or("none")
    );

    let seen = sim.stats().class(Class::Chat);
    println!(
        "Together saw {} requests, all with the organisation's key: {} ok, {} 429",
        seen.requests, seen.ok, seen.rate_limited
    );
    if ok != 30 || !first.is_success() || second != StatusCode::TOO_MANY_REQUESTS {
        return Err("the gateway did not keep the teams to their quotas".into());
    }
    Ok(())
}

/// One chat completion through the gateway, as `team`; its status and `Retry-After`.
async fn call(
    gateway: SocketAddr,
    team: &str,
    max_wait_ms: Option<u64>,
) -> Result<(StatusCode, Option<String>), BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::post(format!("http://{gateway}/v1/chat/completions"))
        .header("x-team", team)
        .header("content-type", "application/json");
    if let Some(max_wait) = max_wait_ms {
        request = request.header("x-max-wait-ms", max_wait);
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(chat_body("Say hello."))))?)
        .await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    response.into_body().collect().await?;
    Ok((status, retry_after))
}
