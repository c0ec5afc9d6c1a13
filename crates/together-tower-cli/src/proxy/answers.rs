//! The proxy's own answers, in Together's error shape, so that a client's SDK reads them as
//! it reads Together's: `{"error": {"message", "type", "param", "code"}}`.

use std::error::Error as StdError;

use axum::body::Body;
use axum::response::Response;
use http::StatusCode;
use http::header::{CONTENT_TYPE, HeaderValue};
use together_tower::limit::error::refusal_response;
use together_tower::models::ModelNotFound;
use tower::BoxError;

/// An error answer with `status`, in Together's shape.
pub fn error(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    shaped(status, kind, code, None, message)
}

fn shaped(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: &str,
) -> Response {
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": param, "code": code}
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// 404 for a path the proxy does not forward: it is not an open proxy.
pub fn not_found(path: &str) -> Response {
    let path: String = path.chars().take(128).collect();
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        &format!("{path} is not a path this proxy forwards; it forwards /v1/*"),
    )
}

/// 401 for a key no tenant has, as Together answers an invalid key.
pub fn unknown_key() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_api_key"),
        "Invalid API key provided: this proxy does not know the key. Ask its operator for one.",
    )
}

/// 413 for a body over the limit.
pub fn too_large(limit: usize) -> Response {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        Some("request_too_large"),
        &format!("the request body is larger than the {limit} bytes this proxy accepts"),
    )
}

/// The answer to a request the stack gave no answer for: the limiter's refusal as Together
/// would send it (429 with `Retry-After` and `retry-after-ms`), an unknown model as a 404
/// naming the closest, a body over the limit as 413, a body that stopped coming as 408, and
/// anything else (the upstream unreachable) as 502.
pub fn stack_error(failure: &BoxError, body_limit: usize) -> Response {
    if let Some(refusal) = refusal_response(&**failure) {
        return refusal.map(Body::from);
    }
    if let Some(unknown) = find::<ModelNotFound>(failure) {
        return shaped(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
            &unknown.to_string(),
        );
    }
    if find::<http_body_util::LengthLimitError>(failure).is_some() {
        return too_large(body_limit);
    }
    if find::<tower_http::timeout::TimeoutError>(failure).is_some() {
        return error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            "the request body stopped coming",
        );
    }
    error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        Some("upstream_unreachable"),
        &format!("the proxy could not reach the API: {}", chain(failure)),
    )
}

/// `error` and its sources, outermost first.
fn sources(error: &BoxError) -> impl Iterator<Item = &(dyn StdError + 'static)> {
    let first: &(dyn StdError + 'static) = &**error;
    std::iter::successors(Some(first), |&error| error.source())
}

/// The first error of type `E` in `error`'s chain of sources.
fn find<E: StdError + 'static>(error: &BoxError) -> Option<&E> {
    sources(error).find_map(|error| error.downcast_ref::<E>())
}

/// An error and its sources, on one line.
fn chain(error: &BoxError) -> String {
    let parts: Vec<String> = sources(error).map(ToString::to_string).collect();
    parts.join(": ")
}
