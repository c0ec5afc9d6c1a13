//! Forwarding one `/v1/*` request upstream through the stack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use http::header::{CONTENT_LENGTH, HOST, HeaderMap, HeaderName};
use http::uri::PathAndQuery;
use http::{Uri, request::Parts};
use http_body_util::Limited;
use together_tower::classify::classify_path;
use tower::ServiceExt;
use tower_http::timeout::TimeoutBody;

use super::access::{Access, Caller};
use super::answers;
use super::ops::Outcome;
use super::stack::ProxyStack;

/// What forwarding needs, shared by every request.
#[derive(Debug)]
pub struct Forward {
    /// The upstream base URL, up to but without `/v1`.
    pub upstream: String,
    /// How keys are held.
    pub access: Access,
    /// The same, in words, for the start line.
    pub description: String,
    /// The stack requests go through.
    pub stack: ProxyStack,
    /// The largest request body accepted.
    pub body_limit: usize,
    /// How long a request body may send nothing before it is cut.
    pub body_idle: Duration,
}

/// Headers that belong to one connection, not to the request or answer they came with
/// (RFC 9110, section 7.6.1), and the proxy's own `Proxy-Authorization`.
const HOP_BY_HOP: [HeaderName; 8] = [
    http::header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// The handler of `/v1/*`: checks the key, points the request upstream and sends it through
/// the stack; the answer streams back as it comes.
pub async fn forward(State(proxy): State<Arc<Forward>>, request: Request) -> Response {
    let started = Instant::now();
    let (mut parts, body) = request.into_parts();
    let class = classify_path(&parts.method, parts.uri.path());
    let caller = match proxy.access.admit(&mut parts) {
        Ok(caller) => caller,
        Err(_) => return Outcome::new(class, None, started).record(answers::unknown_key()),
    };
    let outcome = Outcome::new(class, caller.as_ref(), started);
    if declared_length(&parts.headers).is_some_and(|length| length > proxy.body_limit as u64) {
        return outcome.record(answers::too_large(proxy.body_limit));
    }
    if !point_upstream(&mut parts, &proxy.upstream, caller) {
        return outcome.record(answers::not_found(parts.uri.path()));
    }
    let body = Body::new(TimeoutBody::new(proxy.body_idle, body));
    let body = Limited::new(body, proxy.body_limit);
    let request = http::Request::from_parts(parts, body);
    let response = match proxy.stack.clone().oneshot(request).await {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            response
        }
        Err(error) => answers::stack_error(&error, proxy.body_limit),
    };
    outcome.record(response)
}

/// Rewrites the request for the upstream: its URI under the base URL, no `Host` of the
/// proxy's, no hop-by-hop headers, and the tenant and priority the limits read. `false` if
/// the path makes no URI.
fn point_upstream(parts: &mut Parts, upstream: &str, caller: Option<Caller>) -> bool {
    let path = parts.uri.path_and_query().map_or("/", PathAndQuery::as_str);
    match format!("{upstream}{path}").parse::<Uri>() {
        Ok(uri) => parts.uri = uri,
        Err(_) => return false,
    }
    parts.headers.remove(HOST);
    strip_hop_by_hop(&mut parts.headers);
    if let Some(caller) = caller {
        parts.extensions.insert(caller.tenant);
        parts.extensions.insert(caller.priority);
    }
    true
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers that `Connection` names are hop-by-hop too.
    let named: Vec<HeaderName> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in HOP_BY_HOP.iter().chain(&named) {
        headers.remove(name);
    }
}

/// The body's length, when the client says it.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", "keep-alive, x-private".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert("x-private", "1".parse().unwrap());
        headers.insert("transfer-encoding", "chunked".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        strip_hop_by_hop(&mut headers);
        let left: Vec<_> = headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn the_request_goes_under_the_base_url_with_its_query() {
        let request = http::Request::get("http://127.0.0.1:8080/v1/models?limit=5")
            .header(HOST, "127.0.0.1:8080")
            .body(())
            .unwrap();
        let (mut parts, ()) = request.into_parts();
        assert!(point_upstream(&mut parts, "https://api.together.xyz", None));
        assert_eq!(parts.uri, "https://api.together.xyz/v1/models?limit=5");
        assert!(!parts.headers.contains_key(HOST));
    }
}
