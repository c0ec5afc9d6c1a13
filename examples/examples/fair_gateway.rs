//! An axum gateway that shares one organisation's quota between teams by weight, and lets an
//! interactive route go first.
//!
//! The gateway calls Together with the organisation's key (10 chat requests a second here,
//! which the simulated Together enforces). Teams name themselves in `x-team`; the limits read
//! that header as the request's tenant ([`LimitsBuilder::tenant_from`]) and weigh team-c
//! twice. Requests to `/interactive/v1/...` carry [`Priority::Interactive`]; the rest are
//! background. The gateway removes `x-team` before the request leaves: neither the tenant nor
//! the priority is sent upstream.
//!
//! Three teams flood the gateway with 40 background requests each, all at once; a second in,
//! an interactive caller sends five requests, one every half second. The output shows each
//! team's share of the turns while all three waited (a quarter, a quarter, a half), and the
//! interactive requests' waits (about one turn, not the three teams' backlog).
//!
//! ```text
//! cargo run -p together-tower-examples --example fair_gateway
//! ```

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use together_tower::limit::{LimitsBuilder, Priority, Tenant};
use together_tower::quota::QuotaTable;
use together_tower::{Limits, TogetherLayer};
use together_tower_examples::{chat_body, empty, gateway_error, point_at_together, simulator};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, ServiceBuilder, ServiceExt};

type Stack = BoxCloneSyncService<http::Request<Body>, Response, BoxError>;

/// The gateway's state: where Together is, and the stack that calls it.
#[derive(Clone)]
struct Gateway {
    together: String,
    stack: Stack,
}

/// Forwards one call to Together through the stack, at `priority`.
async fn forward(
    gateway: Gateway,
    path: &str,
    priority: Priority,
    mut request: Request,
) -> Response {
    if !point_at_together(&mut request, &gateway.together, path) {
        return empty(StatusCode::BAD_REQUEST);
    }
    request.extensions_mut().insert(priority);
    match gateway.stack.oneshot(request).await {
        Ok(response) => response,
        Err(error) => gateway_error(&error),
    }
}

async fn background(
    State(gateway): State<Gateway>,
    Path(path): Path<String>,
    request: Request,
) -> Response {
    forward(gateway, &path, Priority::Background, request).await
}

async fn interactive(
    State(gateway): State<Gateway>,
    Path(path): Path<String>,
    request: Request,
) -> Response {
    forward(gateway, &path, Priority::Interactive, request).await
}

/// Together's quotas for the organisation, shared by team and weighted.
fn organisation_limits() -> LimitsBuilder {
    Limits::builder(QuotaTable::together_defaults())
        .tenant_from(|headers| {
            let team = headers.get("x-team")?.to_str().ok()?;
            Some(Tenant::new(team))
        })
        .tenant_weight("team-c", 2)
        .max_wait(Duration::from_secs(60))
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let sim = simulator(600, SimConfig::default()).await?;
    let client = Client::builder(TokioExecutor::new()).build_http::<BufferedBody<Body>>();
    let stack = ServiceBuilder::new()
        .map_response(|response: http::Response<_>| response.map(Body::new))
        .layer(TogetherLayer::new(organisation_limits().build()))
        // Below the limits, which read it: the team's header does not leave the gateway, and
        // Together sees the organisation's key.
        .map_request(|mut request: http::Request<BufferedBody<Body>>| {
            request.headers_mut().remove("x-team");
            let key = HeaderValue::from_static("Bearer organisation-key");
            request.headers_mut().insert(AUTHORIZATION, key);
            request
        })
        .service(client);
    let gateway = Gateway {
        together: sim.url(),
        stack: BoxCloneSyncService::new(stack),
    };
    let app = Router::new()
        .route("/v1/{*path}", any(background))
        .route("/interactive/v1/{*path}", any(interactive))
        .with_state(gateway);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!(
        "gateway at http://{addr}, in front of simulated Together (10 chat requests a second)\n"
    );

    let started = Instant::now();
    let answered = Arc::new(Mutex::new(Vec::new()));
    let teams = ["team-a", "team-b", "team-c"];
    let floods: Vec<_> = teams
        .into_iter()
        .flat_map(|team| (0..40).map(move |_| team))
        .map(|team| {
            let answered = Arc::clone(&answered);
            tokio::spawn(async move {
                let status = call(addr, "/v1/chat/completions", team).await?;
                answered.lock().unwrap().push((started.elapsed(), team));
                Ok::<_, BoxError>(status)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let sent = Instant::now();
        let status = call(addr, "/interactive/v1/chat/completions", "team-a").await?;
        waits.push((sent.elapsed(), status));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut failed = 0;
    for flood in floods {
        failed += usize::from(!flood.await??.is_success());
    }
    let shares = report(&answered.lock().unwrap(), &teams, &waits);
    let seen = sim.stats().class(Class::Chat);
    println!(
        "\nTogether saw {} requests, all with the organisation's key: {} ok, {} 429",
        seen.requests, seen.ok, seen.rate_limited
    );
    if failed > 0 || waits.iter().any(|(_, status)| !status.is_success()) {
        return Err("a request failed".into());
    }
    let fair = shares
        .iter()
        .zip([0.25, 0.25, 0.5])
        .all(|(share, expected)| (share - expected).abs() <= 0.06);
    // A turn is 100 ms; an interactive request goes at the next one.
    let first = waits
        .iter()
        .all(|(wait, _)| *wait < Duration::from_millis(300));
    if !fair || !first {
        return Err("the teams did not get their shares, or the interactive route waited".into());
    }
    Ok(())
}

/// Prints each team's share of the answers while all three still waited, and the
/// interactive requests' waits; returns the shares.
fn report(
    answered: &[(Duration, &str)],
    teams: &[&str],
    waits: &[(Duration, StatusCode)],
) -> Vec<f64> {
    let mut answered = answered.to_vec();
    answered.sort();
    // Every team still waited until the first of them had its last answer.
    let until = teams
        .iter()
        .filter_map(|team| answered.iter().rev().find(|(_, seen)| seen == team))
        .map(|(at, _)| *at)
        .min()
        .unwrap_or_default();
    let busy: Vec<&str> = answered
        .iter()
        .filter(|(at, _)| *at < until)
        .map(|(_, team)| *team)
        .collect();
    println!("while all three teams waited ({} answers):", busy.len());
    let mut shares = Vec::new();
    for (team, weight) in teams.iter().zip([1, 1, 2]) {
        let share = busy.iter().filter(|seen| *seen == team).count() as f64 / busy.len() as f64;
        println!(
            "  {team} (weight {weight}): {:.0}% of the turns",
            share * 100.0
        );
        shares.push(share);
    }
    let waits: Vec<String> = waits
        .iter()
        .map(|(wait, _)| format!("{} ms", wait.as_millis()))
        .collect();
    println!(
        "interactive requests behind ~100 waiting, one turn every 100 ms: answered in {}",
        waits.join(", ")
    );
    shares
}

/// One chat completion through the gateway to `path`, as `team`; its status.
async fn call(gateway: SocketAddr, path: &str, team: &str) -> Result<StatusCode, BoxError> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(format!("http://{gateway}{path}"))
        .header("x-team", team)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(chat_body("Say hello."))))?;
    let response = client.request(request).await?;
    let status = response.status();
    response.into_body().collect().await?;
    Ok(status)
}
