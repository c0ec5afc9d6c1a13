//! What one 404 costs the model check once the models list is known: finding the closest ids.
//!
//! In a gateway the end user picks the model name, so a hostile name or a huge list must not
//! cost more than about a millisecond of CPU per 404. Each iteration sends one request naming
//! an unknown model through `ModelCheck` over a service that answers a JSON 404 at once (the
//! list was fetched before the timed loop).
//!
//! `cargo bench -p together-tower --bench model_check`

#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use together_tower::body::{BufferedBody, RequestMeta};
use together_tower::models::{ModelCheck, ModelCheckLayer};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Layer, ServiceExt};

type Inner = BoxCloneSyncService<Request<BufferedBody<()>>, Response<Full<Bytes>>, BoxError>;

/// The check over a server that knows `ids` and answers every other request with a JSON 404.
fn check_over(ids: usize) -> ModelCheck<Inner> {
    let list: Vec<String> = (0..ids)
        .map(|i| format!(r#"{{"id":"org-{i}/Model-{i}-70B-Turbo"}}"#))
        .collect();
    let list = Bytes::from(format!("[{}]", list.join(",")));
    let inner = tower::service_fn(move |request: Request<BufferedBody<()>>| {
        let list = list.clone();
        async move {
            let mut response = if request.uri().path() == "/v1/models" {
                Response::new(Full::new(list))
            } else {
                let mut response = Response::new(Full::new(Bytes::from_static(b"{}")));
                *response.status_mut() = StatusCode::NOT_FOUND;
                response
            };
            response
                .headers_mut()
                .insert(CONTENT_TYPE, "application/json".parse().unwrap());
            Ok::<_, BoxError>(response)
        }
    });
    ModelCheckLayer::new().layer(BoxCloneSyncService::new(inner))
}

fn naming(model: &str) -> Request<BufferedBody<()>> {
    let mut request = Request::post("http://together.test/v1/chat/completions")
        .body(BufferedBody::buffered(Bytes::from_static(b"{}")))
        .unwrap();
    // The names here hold no quote, so the body is JSON as written.
    let body = format!(r#"{{"model":"{model}"}}"#);
    let meta = RequestMeta::from_json(body.as_bytes()).expect("a JSON object");
    request.extensions_mut().insert(meta);
    request
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("model_check_404");
    let cases = [
        ("typo, 200 ids", 200, "org-7/Model-7-70B".to_owned()),
        ("128 characters, 200 ids", 200, "x".repeat(128)),
        ("1 KiB name, 100,000 ids", 100_000, "y".repeat(1024)),
        ("512 KiB name, 200 ids", 200, "z".repeat(512 * 1024)),
        ("typo, 100,000 ids", 100_000, "org-7/Model-7-70B".to_owned()),
    ];
    for (name, ids, model) in cases {
        let check = check_over(ids);
        // The first 404 fetches the list; the timed ones find it cached.
        let _ = runtime.block_on(check.clone().oneshot(naming(&model)));
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime
                    .block_on(check.clone().oneshot(naming(&model)))
                    .unwrap_err()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
