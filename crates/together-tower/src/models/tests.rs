//! The check as a service: the list fetched once for every 404, within its timeout, and only
//! for a 404 that may be about the model.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use tokio::time::Instant;
use tower::BoxError;
use tower_layer::Layer;
use tower_service::Service;

use crate::body::{BufferedBody, RequestMeta};

use super::list::{FAILURE_TTL, FETCH_TIMEOUT};
use super::*;

type Checked = ModelCheck<
    tower::util::BoxCloneSyncService<Request<BufferedBody<()>>, Response<String>, BoxError>,
>;

/// A stack below the check: chat answers a JSON 404 (or `not_found`'s own answer), and
/// `/v1/models` answers `models`; the counter counts the list's fetches.
fn server(
    not_found: fn() -> Response<String>,
    models: fn() -> Option<Response<String>>,
) -> (Checked, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&fetches);
    let inner = tower::service_fn(move |request: Request<BufferedBody<()>>| {
        let counted = Arc::clone(&counted);
        async move {
            if request.uri().path() != "/v1/models" {
                return Ok::<_, BoxError>(not_found());
            }
            counted.fetch_add(1, Ordering::SeqCst);
            match models() {
                Some(response) => Ok(response),
                None => std::future::pending().await,
            }
        }
    });
    let service = ModelCheckLayer::new().layer(tower::util::BoxCloneSyncService::new(inner));
    (service, fetches)
}

fn json_404() -> Response<String> {
    let mut response = Response::new(r#"{"error":{"code":"model_not_found"}}"#.to_owned());
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn to(path: &str) -> Request<BufferedBody<()>> {
    let mut request = Request::post(format!("http://together.test{path}"))
        .body(BufferedBody::buffered(Bytes::from_static(b"{}")))
        .unwrap();
    request.extensions_mut().insert(RequestMeta {
        model: Some("no-such-model".into()),
        ..RequestMeta::default()
    });
    request
}

/// Sends twenty 404s at once and then twenty more; each comes back as the 404 it was.
async fn twenty_and_twenty<S>(service: &S)
where
    S: Service<Request<BufferedBody<()>>, Response = Response<String>, Error = BoxError> + Clone,
{
    use tower::ServiceExt;
    for _ in 0..2 {
        let answers = futures_util::future::join_all(
            (0..20).map(|_| service.clone().oneshot(to("/v1/chat/completions"))),
        )
        .await;
        for answer in answers {
            assert_eq!(answer.unwrap().status(), StatusCode::NOT_FOUND);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_failing_models_list_is_fetched_once_for_every_404() {
    fn error() -> Option<Response<String>> {
        let mut response = Response::new(String::new());
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        Some(response)
    }
    fn malformed() -> Option<Response<String>> {
        Some(Response::new("[{\"id\": 1}".to_owned()))
    }
    for models in [error as fn() -> _, malformed] {
        let (service, fetches) = server(json_404, models);
        let started = Instant::now();
        twenty_and_twenty(&service).await;
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}

#[tokio::test(start_paused = true)]
async fn a_models_list_that_never_answers_holds_a_404_for_the_fetch_timeout_only() {
    let (service, fetches) = server(json_404, || None);
    let started = Instant::now();
    twenty_and_twenty(&service).await;
    // The first twenty wait out one fetch; the next twenty find the failure remembered.
    assert_eq!(started.elapsed(), FETCH_TIMEOUT);
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
    // Once the failure is forgotten, the list is asked for again.
    tokio::time::advance(FAILURE_TTL).await;
    twenty_and_twenty(&service).await;
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_404_about_a_path_asks_for_no_models_list() {
    use tower::ServiceExt;
    fn listed() -> Option<Response<String>> {
        Some(Response::new(r#"[{"id":"a"}]"#.to_owned()))
    }
    fn html_404() -> Response<String> {
        let mut response = Response::new("<h1>Not Found</h1>".to_owned());
        *response.status_mut() = StatusCode::NOT_FOUND;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/html"));
        response
    }
    // A path that is no model endpoint, and a 404 page that is not JSON.
    let (service, fetches) = server(json_404, listed);
    let answer = service.oneshot(to("/v1/chat/completion")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    let (service, html) = server(html_404, listed);
    let answer = service.oneshot(to("/v1/chat/completions")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::NOT_FOUND);
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(html.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Together's own answer is checked.
    let (service, fetches) = server(json_404, listed);
    let error = service
        .oneshot(to("/v1/chat/completions"))
        .await
        .unwrap_err();
    assert!(error.is::<ModelNotFound>());
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// The ask a request keeps for a 404 is made once for every clone of the service, as a layer
/// above may clone it for each request, and made again only for another key or model.
#[tokio::test(start_paused = true)]
async fn clones_share_the_kept_ask_until_the_key_or_model_changes() {
    use tower::ServiceExt;
    fn ok() -> Response<String> {
        Response::new(String::new())
    }
    let (service, _) = server(ok, || None);
    let kept = |service: &Checked| {
        let last = service.shared.last_ask.lock().unwrap();
        last.as_ref().map(|ask| Arc::as_ptr(ask) as usize)
    };
    let with_key = |key: &'static str| {
        let mut request = to("/v1/chat/completions");
        let value = HeaderValue::from_static(key);
        request.headers_mut().insert("authorization", value);
        crate::key::hide_credentials(request.headers_mut());
        request
    };
    service.clone().oneshot(with_key("Bearer a")).await.unwrap();
    let first = kept(&service).expect("an ask is kept");
    service.clone().oneshot(with_key("Bearer a")).await.unwrap();
    assert_eq!(kept(&service), Some(first), "a clone made it again");
    service.clone().oneshot(with_key("Bearer b")).await.unwrap();
    assert_ne!(
        kept(&service),
        Some(first),
        "another key kept the first ask"
    );
}
