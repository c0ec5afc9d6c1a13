//! Answers and callers as a broken or hostile server and end user would make them, through the
//! layers themselves: response bodies with any `usage` and any job answer, 429s with any body
//! and hints, model names of any length, models lists and embeddings answers of any shape.
//! Each must leave the layer without a panic, with bounded state, and with every later wait
//! bounded by what the configuration allows.
//!
//! Each case runs on a runtime of its own with paused time, so the waits are exact and cost no
//! real time. `PROPTEST_CASES` raises the number of cases.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use proptest::prelude::*;
use together_tower::body::{BufferedBody, RequestMeta};
use together_tower::classify::EndpointClass;
use together_tower::embeddings::{ChunkError, embed_chunk};
use together_tower::limit::{Adaptation, Limits, RateLimitLayer, TokenRequest};
use together_tower::models::{ModelCheckLayer, ModelNotFound};
use together_tower::quota::{GroupQuota, QuotaTable, Rate};
use tower::{BoxError, Layer, ServiceExt};

const CASES: u32 = 256;

fn config() -> ProptestConfig {
    common::config(CASES)
}

/// Runs `test` on a fresh current-thread runtime with paused time.
fn paused<T>(test: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(test)
}

/// Numbers as JSON might carry them, in and beyond every range.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<u64>().prop_map(|n| n.to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| format!("{n:?}")),
        "[0-9]{20,60}",
        Just("1e400".to_owned()),
        Just("-0".to_owned()),
        Just("null".to_owned()),
        Just("\"12\"".to_owned()),
    ]
}

/// Bodies a chat answer might end with: JSON with any `usage`, a stream of them, or garbage.
fn chat_body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..512),
        (json_number(), json_number(), json_number()).prop_map(|(total, prompt, completion)| {
            format!(r#"{{"choices":[],"usage":{{"total_tokens":{total},"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}"#)
                .into_bytes()
        }),
        proptest::collection::vec(json_number(), 1..6).prop_map(|totals| {
            let mut stream = String::new();
            for total in totals {
                stream.push_str(&format!("data: {{\"usage\":{{\"total_tokens\":{total}}}}}\n\n"));
            }
            stream.push_str("data: [DONE]\n\n");
            stream.into_bytes()
        }),
        (0usize..70_000, json_number()).prop_map(|(padding, total)| {
            format!(r#"{{"x":"{}","usage":{{"total_tokens":{total}}}}}"#, "y".repeat(padding))
                .into_bytes()
        }),
    ]
}

/// Chat at 10 a second, 1,000 tokens a second with a burst of 1,000, one bucket per model;
/// a request costs its `max_tokens`.
fn token_limits() -> Limits {
    let table = QuotaTable::builder()
        .group(
            "chat",
            GroupQuota::rate(Rate::per_second(10))
                .with_tokens(Rate::per_second(1_000).with_burst(1_000))
                .per_model(true),
        )
        .class(EndpointClass::Chat, "chat")
        .build()
        .unwrap();
    Limits::builder(table)
        .adaptation(Adaptation::fixed())
        .max_wait(Duration::from_secs(30))
        .token_estimate(|request: &TokenRequest<'_>| {
            request.meta.and_then(|meta| meta.max_tokens).unwrap_or(0)
        })
        .build()
}

fn chat(model: &str, max_tokens: u64) -> Request<String> {
    let mut request = Request::post("http://together.test/v1/chat/completions")
        .header("authorization", "Bearer hostile-test-key")
        .body(String::new())
        .unwrap();
    let body = serde_json::json!({"model": model, "max_tokens": max_tokens}).to_string();
    request
        .extensions_mut()
        .insert(RequestMeta::from_json(body.as_bytes()).unwrap());
    request
}

/// Header names and values a 429 might carry.
fn hint() -> impl Strategy<Value = (&'static str, String)> {
    (
        prop::sample::select(vec![
            "retry-after",
            "retry-after-ms",
            "x-ratelimit-reset",
            "x-ratelimit-remaining",
            "x-ratelimit-limit",
            "x-tokenlimit-limit",
            "x-ratelimit-limit-dynamic",
        ]),
        prop_oneof![json_number(), "[ -~]{0,30}"],
    )
}

/// `error.type` as anything JSON can hold, of any size.
fn error_type() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,40}".prop_map(|text| serde_json::to_string(&text).unwrap()),
        (0usize..100_000).prop_map(|size| format!("\"{}\"", "t".repeat(size))),
        json_number(),
        Just("{\"nested\":[1,{\"a\":null}]}".to_owned()),
        Just("[\"dynamic_token_limited\"]".to_owned()),
        Just("true".to_owned()),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_answer_body_leaves_the_token_bucket_open_within_one_burst(body in chat_body()) {
        paused(async move {
            let limits = token_limits();
            let answer = Bytes::from(body);
            let inner = tower::service_fn(move |_: Request<String>| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(answer))) }
            });
            let service = RateLimitLayer::new(limits).layer(inner);
            let first = service.clone().oneshot(chat("m", 100)).await.unwrap();
            first.into_body().collect().await.unwrap();
            // A whole burst after whatever that answer said: at most a burst of debt (1 s)
            // and the burst itself (1 s) away.
            let started = tokio::time::Instant::now();
            service.clone().oneshot(chat("m", 1_000)).await.expect("a bounded wait");
            prop_assert!(started.elapsed() <= Duration::from_secs(2), "{:?}", started.elapsed());
            Ok(())
        })?;
    }

    #[test]
    fn any_job_answer_keeps_the_slots_within_their_bounds(
        created in chat_body(),
        listed in prop_oneof![
            chat_body(),
            proptest::collection::vec(("[a-z0-9-]{0,12}", "(running|completed|RUNNING|FAILED|[a-z]{0,8})"), 0..8)
                .prop_map(|jobs| {
                    let data: Vec<_> = jobs.into_iter()
                        .map(|(id, status)| serde_json::json!({"id": id, "status": status}))
                        .collect();
                    serde_json::json!({"object": "list", "data": data}).to_string().into_bytes()
                }),
        ],
        status in prop::sample::select(vec![200u16, 201, 409, 500, 503]),
    ) {
        paused(async move {
            let table = QuotaTable::builder()
                .group("fine-tune-create", GroupQuota::concurrency(3))
                .class(EndpointClass::FineTuneCreate, "fine-tune-create")
                .build()
                .unwrap();
            let limits = Limits::builder(table).max_wait(Duration::from_secs(5)).build();
            let (created, listed) = (Bytes::from(created), Bytes::from(listed));
            let inner = tower::service_fn(move |request: Request<String>| {
                let body = if request.method() == http::Method::POST { created.clone() } else { listed.clone() };
                let status = StatusCode::from_u16(status).unwrap();
                async move {
                    let mut response = Response::new(Full::new(body));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                }
            });
            let service = RateLimitLayer::new(limits.clone()).layer(inner);
            for path in ["/v1/fine-tunes", "/v1/fine-tunes", "/v1/fine-tunes/ft-1"] {
                let method = if path == "/v1/fine-tunes/ft-1" { "GET" } else { "POST" };
                let request = Request::builder()
                    .method(method)
                    .uri(format!("http://together.test{path}"))
                    .header("authorization", "Bearer hostile-test-key")
                    .body(String::new())
                    .unwrap();
                let started = tokio::time::Instant::now();
                if let Ok(answer) = service.clone().oneshot(request).await {
                    answer.into_body().collect().await.unwrap();
                }
                prop_assert!(started.elapsed() <= Duration::from_secs(5));
            }
            for bucket in limits.snapshot() {
                prop_assert!(bucket.held_jobs <= 3, "{bucket:?}");
                prop_assert!(bucket.free_slots.unwrap_or(0) <= 3, "{bucket:?}");
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_429_leaves_the_bucket_closed_no_longer_than_the_longest_pause(
        error_type in error_type(),
        hints in proptest::collection::vec(hint(), 0..4),
    ) {
        paused(async move {
            let limits = Limits::builder(
                QuotaTable::builder()
                    .group("chat", GroupQuota::rate(Rate::per_second(10)))
                    .class(EndpointClass::Chat, "chat")
                    .build()
                    .unwrap(),
            )
            .max_pause(Duration::from_secs(60))
            .max_wait(Duration::from_secs(120))
            .build();
            let body = Bytes::from(format!(r#"{{"error":{{"message":"slow down","type":{error_type}}}}}"#));
            let hints = Arc::new(hints);
            let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let inner = tower::service_fn(move |_: Request<String>| {
                let mut response = Response::new(Full::new(body.clone()));
                if !refused.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                    for (name, value) in hints.iter() {
                        if let Ok(value) = value.parse() {
                            response.headers_mut().append(*name, value);
                        }
                    }
                }
                async move { Ok::<_, Infallible>(response) }
            });
            let service = RateLimitLayer::new(limits).layer(inner);
            let answer = service.clone().oneshot(chat("m", 0)).await.unwrap();
            answer.into_body().collect().await.unwrap();
            let started = tokio::time::Instant::now();
            let next = service.clone().oneshot(chat("m", 0)).await.expect("a bounded wait");
            prop_assert_eq!(next.status(), StatusCode::OK);
            // The longest pause, and one turn: whatever the 429 said.
            prop_assert!(started.elapsed() <= Duration::from_millis(60_100), "{:?}", started.elapsed());
            Ok(())
        })?;
    }

    #[test]
    fn any_model_name_gets_a_bucket_that_keeps_a_bounded_name(
        model in prop_oneof![
            "\\PC{0,300}",
            (1usize..200_000, any::<char>()).prop_map(|(count, c)| c.to_string().repeat(count)),
        ],
    ) {
        paused(async move {
            let limits = token_limits();
            let inner = tower::service_fn(|_: Request<String>| async {
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            });
            let service = RateLimitLayer::new(limits.clone()).layer(inner);
            service.oneshot(chat(&model, 1)).await.unwrap();
            for bucket in limits.snapshot() {
                let kept = bucket.model.unwrap_or_default();
                prop_assert!(kept.len() <= 128, "{} bytes kept", kept.len());
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_models_list_answers_a_404_with_the_404_or_a_short_suggestion(
        list in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec("\\PC{0,200}", 0..300).prop_map(|ids| {
                let data: Vec<_> = ids.into_iter().map(|id| serde_json::json!({"id": id})).collect();
                serde_json::json!({"data": data}).to_string().into_bytes()
            }),
            proptest::collection::vec(json_number(), 0..20)
                .prop_map(|ids| format!("[{}]", ids.iter().map(|id| format!("{{\"id\":{id}}}")).collect::<Vec<_>>().join(",")).into_bytes()),
        ],
        model in prop_oneof!["[a-zA-Z0-9/._-]{1,60}", (129usize..5_000).prop_map(|n| "q".repeat(n))],
    ) {
        paused(async move {
            let list = Bytes::from(list);
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
                    response.headers_mut().insert(CONTENT_TYPE, "application/json".parse().unwrap());
                    Ok::<_, BoxError>(response)
                }
            });
            let check = ModelCheckLayer::new().layer(inner);
            let mut request = Request::post("http://together.test/v1/chat/completions")
                .body(BufferedBody::buffered(Bytes::from_static(b"{}")))
                .unwrap();
            let body = serde_json::json!({"model": model}).to_string();
            request.extensions_mut().insert(RequestMeta::from_json(body.as_bytes()).unwrap());
            match check.oneshot(request).await {
                Ok(answer) => prop_assert_eq!(answer.status(), StatusCode::NOT_FOUND),
                Err(error) => {
                    let missing = error.downcast_ref::<ModelNotFound>().expect("ModelNotFound");
                    prop_assert!(missing.closest().len() <= 3);
                    prop_assert!(missing.closest().iter().all(|id| id.chars().count() <= 128));
                }
            }
            Ok(())
        })?;
    }

    #[test]
    fn any_embeddings_answer_is_whole_vectors_or_a_failed_chunk(
        inputs in 1usize..6,
        answer in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..256),
            proptest::collection::vec(
                (0usize..8, prop::option::of(proptest::collection::vec(-1.0f32..1.0, 0..4))),
                0..8,
            )
            .prop_map(|items| {
                let data: Vec<_> = items.into_iter().map(|(index, embedding)| match embedding {
                    Some(embedding) => serde_json::json!({"index": index, "embedding": embedding}),
                    None => serde_json::json!({"index": index}),
                }).collect();
                serde_json::json!({"data": data}).to_string().into_bytes()
            }),
        ],
    ) {
        paused(async move {
            let answer = Bytes::from(answer);
            let service = tower::service_fn(move |_: Request<Full<Bytes>>| {
                let answer = answer.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(answer))) }
            });
            let request = Request::post("http://together.test/v1/embeddings")
                .body(Full::new(Bytes::new()))
                .unwrap();
            match embed_chunk(service, request, inputs).await {
                Ok(vectors) => {
                    prop_assert_eq!(vectors.len(), inputs);
                    let dimension = vectors[0].len();
                    prop_assert!(dimension > 0);
                    prop_assert!(vectors.iter().all(|vector| vector.len() == dimension));
                }
                Err(error) => prop_assert!(matches!(error, ChunkError::Malformed(_))),
            }
            Ok(())
        })?;
    }
}
