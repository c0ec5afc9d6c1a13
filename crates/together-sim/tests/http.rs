//! The simulator over real HTTP on loopback, against hand-computed expectations.
//!
//! Limits here are per minute with one-minute windows, so the statuses do not depend on how
//! fast the test runs.

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use together_sim::{
    Algorithm, Class, ClassLimits, Counters, Hints, LimitChange, Sim, SimConfig, SimHandle,
    key_label, parse_stats,
};

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    json: Value,
}

struct Caller {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
}

impl Caller {
    fn new(sim: &SimHandle) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: sim.url(),
        }
    }

    async fn send(&self, method: Method, path: &str, key: Option<&str>, body: &str) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body.as_bytes())))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            json,
        }
    }

    async fn post(&self, path: &str, key: &str, body: Value) -> Answer {
        self.send(Method::POST, path, Some(key), &body.to_string())
            .await
    }

    async fn chat(&self, key: &str) -> Answer {
        let body = json!({"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{"role": "user", "content": "hello there"}]});
        self.post("/v1/chat/completions", key, body).await
    }

    async fn stats(&self) -> together_sim::Stats {
        let answer = self.send(Method::GET, "/sim/stats", None, "").await;
        parse_stats(answer.json.to_string().as_bytes()).unwrap()
    }
}

fn config(algorithm: Algorithm, limits: &[(Class, ClassLimits)]) -> SimConfig {
    SimConfig {
        algorithm,
        window_ms: 60_000,
        limits: limits.iter().copied().collect(),
        ..SimConfig::default()
    }
}

#[tokio::test]
async fn every_algorithm_allows_its_quota_then_answers_429_with_headers() {
    // Two requests a minute, in a one-minute window (GCRA: a burst of two).
    let limits = ClassLimits {
        burst: 2,
        ..ClassLimits::rpm(2)
    };
    for algorithm in [
        Algorithm::Gcra,
        Algorithm::FixedWindow,
        Algorithm::SlidingWindow,
    ] {
        let sim = Sim::start(config(algorithm, &[(Class::Chat, limits)]))
            .await
            .unwrap();
        let caller = Caller::new(&sim);
        let mut statuses = Vec::new();
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let answer = caller.chat("key-a").await;
            statuses.push(answer.status.as_u16());
            remaining.push(
                answer.headers["x-ratelimit-remaining"]
                    .to_str()
                    .unwrap()
                    .to_owned(),
            );
            assert_eq!(answer.headers["x-ratelimit-limit"], "2", "{algorithm:?}");
            if answer.status == StatusCode::TOO_MANY_REQUESTS {
                assert_eq!(answer.json["error"]["type"], "dynamic_request_limited");
                let retry_after: u64 = answer.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(
                    (1..=60).contains(&retry_after),
                    "{algorithm:?}: {retry_after}"
                );
                let reset: f64 = answer.headers["x-ratelimit-reset"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!(reset > 0.0 && reset <= 60.0);
            }
        }
        assert_eq!(statuses, [200, 200, 429], "{algorithm:?}");
        assert_eq!(remaining, ["1", "0", "0"], "{algorithm:?}");
        // Another key has a quota of its own.
        assert_eq!(caller.chat("key-b").await.status, 200, "{algorithm:?}");
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn token_limits_refuse_with_their_own_error_type() {
    let limits = ClassLimits::rpm(600).with_tpm(10);
    let sim = Sim::start(config(Algorithm::Gcra, &[(Class::Chat, limits)]))
        .await
        .unwrap();
    let caller = Caller::new(&sim);
    let long = "word ".repeat(20);
    let body = json!({"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{"role": "user", "content": long}]});
    let answer = caller.post("/v1/chat/completions", "k", body).await;
    assert_eq!(answer.status, 429);
    assert_eq!(answer.json["error"]["type"], "dynamic_token_limited");
    assert_eq!(answer.headers["x-tokenlimit-limit"], "10");
    // The refusal spent nothing: a small request still fits.
    let small = json!({"model": "meta-llama/Llama-3.3-70B-Instruct-Turbo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    assert_eq!(
        caller.post("/v1/chat/completions", "k", small).await.status,
        200
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn keys_json_and_models_are_checked() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let caller = Caller::new(&sim);
    let chat = r#"{"model":"meta-llama/Llama-3.3-70B-Instruct-Turbo","messages":[]}"#;
    assert_eq!(
        caller
            .send(Method::POST, "/v1/chat/completions", None, chat)
            .await
            .status,
        401
    );
    let not_json = caller
        .send(Method::POST, "/v1/chat/completions", Some("k"), "model=x")
        .await;
    assert_eq!(
        (not_json.status, not_json.json["error"]["type"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_request_error"))
    );
    let unknown = caller
        .post(
            "/v1/embeddings",
            "k",
            json!({"model": "no/such-model", "input": "x"}),
        )
        .await;
    assert_eq!(
        (unknown.status, unknown.json["error"]["type"].as_str()),
        (StatusCode::NOT_FOUND, Some("model_not_found"))
    );
    let nowhere = caller.send(Method::GET, "/v1/nowhere", Some("k"), "").await;
    assert_eq!(nowhere.status, 404);
    let models = caller.send(Method::GET, "/v1/models", Some("k"), "").await;
    assert_eq!(models.status, 200);
    assert!(
        models
            .json
            .as_array()
            .unwrap()
            .iter()
            .any(|model| model["id"] == "BAAI/bge-large-en-v1.5")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn answers_are_openai_shaped_and_deterministic() {
    let mut config = SimConfig {
        embedding_dimensions: 8,
        ..SimConfig::default()
    };
    // Three embeddings calls in a row: not what this test is about.
    config.limits.remove(&Class::Embeddings);
    let sim = Sim::start(config).await.unwrap();
    let caller = Caller::new(&sim);
    let chat = caller.chat("k").await;
    assert_eq!(chat.status, 200);
    assert_eq!(chat.json["object"], "chat.completion");
    assert_eq!(
        chat.json["choices"][0]["message"]["content"],
        "Simulated reply to: hello there"
    );
    assert_eq!(chat.json["usage"]["prompt_tokens"], 2);
    assert_eq!(chat.json["usage"]["total_tokens"], 7);
    assert_eq!(chat.headers["x-ratelimit-limit"], "10");
    assert_eq!(chat.headers["x-tokenlimit-limit"], "3000");

    let embed = |input: Value| {
        caller.post(
            "/v1/embeddings",
            "k",
            json!({"model": "BAAI/bge-large-en-v1.5", "input": input}),
        )
    };
    let three = embed(json!(["alpha", "beta", "gamma"])).await;
    let data = three.json["data"].as_array().unwrap();
    assert_eq!(
        data.iter()
            .map(|item| item["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(data[0]["embedding"].as_array().unwrap().len(), 8);
    let beta_alone = embed(json!("beta")).await;
    assert_eq!(
        beta_alone.json["data"][0]["embedding"],
        data[1]["embedding"]
    );
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);

    let rerank = caller
        .post("/v1/rerank", "k", json!({"model": "Salesforce/Llama-Rank-V1", "query": "red apple", "documents": ["blue sky", "red apple pie", "apple"], "top_n": 2}))
        .await;
    let order: Vec<u64> = rerank.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(order, [1, 2]);
    let image = caller
        .post(
            "/v1/images/generations",
            "k",
            json!({"model": "black-forest-labs/FLUX.1-schnell", "prompt": "a cat"}),
        )
        .await;
    assert_eq!(image.status, 200);
    assert!(
        image.json["data"][0]["url"]
            .as_str()
            .unwrap()
            .ends_with(".png")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn fine_tunes_beyond_the_concurrent_limit_get_409_until_one_ends() {
    let mut config = SimConfig::default();
    config.fine_tunes.concurrent = 2;
    let sim = Sim::start(config).await.unwrap();
    let caller = Caller::new(&sim);
    let create = || {
        caller.post("/v1/fine-tunes", "k", json!({"model": "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo", "training_file": "file-1"}))
    };
    let first = create().await;
    assert_eq!(
        (first.status.as_u16(), first.json["status"].as_str()),
        (200, Some("running"))
    );
    assert_eq!(create().await.status, 200);
    let third = create().await;
    assert_eq!(
        (third.status.as_u16(), third.json["error"]["type"].as_str()),
        (409, Some("concurrency_limit_exceeded"))
    );
    // Another key has slots of its own.
    assert_eq!(
        caller
            .post("/v1/fine-tunes", "other", json!({"training_file": "f"}))
            .await
            .status,
        200
    );

    let id = first.json["id"].as_str().unwrap();
    let listed = caller
        .send(Method::GET, "/v1/fine-tunes", Some("k"), "")
        .await;
    assert_eq!(listed.json["data"].as_array().unwrap().len(), 2);
    let cancelled = caller
        .send(
            Method::POST,
            &format!("/v1/fine-tunes/{id}/cancel"),
            Some("k"),
            "",
        )
        .await;
    assert_eq!(cancelled.json["status"], "cancelled");
    let shown = caller
        .send(Method::GET, &format!("/v1/fine-tunes/{id}"), Some("k"), "")
        .await;
    assert_eq!(
        (
            shown.json["status"].as_str(),
            shown.json["training_file"].as_str()
        ),
        (Some("cancelled"), Some("file-1"))
    );
    assert_eq!(create().await.status, 200, "a cancelled job frees its slot");
    assert_eq!(
        caller
            .send(Method::GET, "/v1/fine-tunes/ft-999999", Some("k"), "")
            .await
            .status,
        404
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn batches_complete_after_their_duration() {
    let mut config = SimConfig::default();
    config.batches.duration_ms = 0;
    let sim = Sim::start(config).await.unwrap();
    let caller = Caller::new(&sim);
    let created = caller
        .post(
            "/v1/batches",
            "k",
            json!({"input_file_id": "file-1", "endpoint": "/v1/chat/completions"}),
        )
        .await;
    assert_eq!(created.status, 200);
    let id = created.json["id"].as_str().unwrap();
    let shown = caller
        .send(Method::GET, &format!("/v1/batches/{id}"), Some("k"), "")
        .await;
    assert_eq!(
        (
            shown.json["status"].as_str(),
            shown.json["endpoint"].as_str()
        ),
        (Some("completed"), Some("/v1/chat/completions"))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn stats_count_what_the_server_saw_by_key_and_class_and_reset() {
    let limits = ClassLimits {
        burst: 2,
        ..ClassLimits::rpm(2)
    };
    let mut config = config(Algorithm::Gcra, &[(Class::Chat, limits)]);
    config.fine_tunes.concurrent = 1;
    let sim = Sim::start(config).await.unwrap();
    let caller = Caller::new(&sim);
    for _ in 0..3 {
        caller.chat("key-a").await;
    }
    caller
        .send(Method::POST, "/v1/chat/completions", None, "{}")
        .await;
    for _ in 0..2 {
        caller
            .post("/v1/fine-tunes", "key-a", json!({"training_file": "f"}))
            .await;
    }

    let stats = caller.stats().await;
    let key_a = &stats.keys[&key_label("key-a")];
    let chat = Counters {
        requests: 3,
        ok: 2,
        rate_limited: 1,
        tokens: 14,
        ..Counters::default()
    };
    assert_eq!(key_a["chat"], chat);
    assert_eq!(
        key_a["fine-tunes"],
        Counters {
            requests: 2,
            ok: 1,
            conflict: 1,
            ..Counters::default()
        }
    );
    assert_eq!(
        stats.keys["anonymous"]["chat"],
        Counters {
            requests: 1,
            unauthorized: 1,
            ..Counters::default()
        }
    );
    assert_eq!(stats.classes["chat"].requests, 4);
    assert!(
        !serde_json::to_string(&stats).unwrap().contains("key-a\""),
        "stats name keys by label only"
    );

    assert_eq!(
        caller
            .send(Method::POST, "/sim/reset", None, "")
            .await
            .status,
        200
    );
    assert_eq!(caller.stats().await, together_sim::Stats::default());
    assert_eq!(
        caller.chat("key-a").await.status,
        200,
        "reset also refills the meters"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_503s_are_answered_and_counted() {
    let mut config = SimConfig::default();
    config.faults.unavailable_rate = 1.0;
    let sim = Sim::start(config).await.unwrap();
    let caller = Caller::new(&sim);
    let answer = caller.chat("k").await;
    assert_eq!(
        (
            answer.status.as_u16(),
            answer.json["error"]["type"].as_str()
        ),
        (503, Some("server_error"))
    );
    assert_eq!(caller.stats().await.classes["chat"].unavailable, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn limits_change_at_run_time() {
    let sim = Sim::start(config(
        Algorithm::Gcra,
        &[(Class::Chat, ClassLimits::rpm(1))],
    ))
    .await
    .unwrap();
    let caller = Caller::new(&sim);
    assert_eq!(caller.chat("k").await.status, 200);
    assert_eq!(caller.chat("k").await.status, 429);
    let changes = json!({"chat": {"rpm": 60000}});
    let changed = caller
        .send(Method::POST, "/sim/limits", None, &changes.to_string())
        .await;
    assert_eq!(changed.status, 200);
    assert_eq!(changed.json["chat"]["rpm"], 60_000);
    let answer = caller.chat("k").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-ratelimit-limit"], "60000");
    let invalid = caller
        .send(Method::POST, "/sim/limits", None, r#"{"chat": {"rpm": 0}}"#)
        .await;
    assert_eq!(invalid.status, 400);
    let unknown_class = caller
        .send(
            Method::POST,
            "/sim/limits",
            None,
            r#"{"chats": {"rpm": 5}}"#,
        )
        .await;
    assert_eq!(unknown_class.status, 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let addr = sim.addr();
    let caller = Caller::new(&sim);
    assert_eq!(caller.chat("k").await.status, 200);
    sim.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn hints_can_be_limited_to_togethers_or_turned_off() {
    for (hints, limit_headers, retry_after) in [
        (Hints::All, true, true),
        (Hints::Together, true, false),
        (Hints::None, false, false),
    ] {
        let sim = Sim::start(SimConfig {
            hints,
            ..config(Algorithm::Gcra, &[(Class::Chat, ClassLimits::rpm(1))])
        })
        .await
        .unwrap();
        let caller = Caller::new(&sim);
        let ok = caller.chat("k").await;
        let refused = caller.chat("k").await;
        assert_eq!(
            (ok.status, refused.status),
            (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS)
        );
        for answer in [&ok, &refused] {
            assert_eq!(
                answer.headers.contains_key("x-ratelimit-limit"),
                limit_headers,
                "{hints:?}"
            );
            assert_eq!(
                answer.headers.contains_key("x-ratelimit-reset"),
                limit_headers,
                "{hints:?}"
            );
        }
        assert_eq!(
            refused.headers.contains_key("retry-after"),
            retry_after,
            "{hints:?}"
        );
        sim.shutdown().await;
    }
}

#[tokio::test]
async fn over_the_limit_can_be_answered_503_instead_of_429() {
    let sim = Sim::start(SimConfig {
        over_limit_status: 503,
        ..config(Algorithm::Gcra, &[(Class::Chat, ClassLimits::rpm(1))])
    })
    .await
    .unwrap();
    let caller = Caller::new(&sim);
    assert_eq!(caller.chat("k").await.status, StatusCode::OK);
    let slow_down = caller.chat("k").await;
    assert_eq!(slow_down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(slow_down.json["error"]["type"], "server_error");
    let stats = caller.stats().await;
    assert_eq!(
        (
            stats.classes["chat"].unavailable,
            stats.classes["chat"].rate_limited
        ),
        (1, 0)
    );
    assert!(
        SimConfig {
            over_limit_status: 500,
            ..SimConfig::default()
        }
        .validate()
        .is_err()
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn limits_change_at_their_scheduled_times() {
    // One request a minute; from 300 ms in, a hundred.
    let sim = Sim::start(SimConfig {
        schedule: vec![LimitChange {
            at_ms: 300,
            limits: [(Class::Chat, ClassLimits::rpm(100))].into(),
        }],
        ..config(
            Algorithm::SlidingWindow,
            &[(Class::Chat, ClassLimits::rpm(1))],
        )
    })
    .await
    .unwrap();
    let caller = Caller::new(&sim);
    assert_eq!(caller.chat("k").await.status, StatusCode::OK);
    assert_eq!(caller.chat("k").await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(sim.limits()[&Class::Chat].rpm, 1);
    tokio::time::sleep(std::time::Duration::from_millis(350)).await;
    assert_eq!(sim.limits()[&Class::Chat].rpm, 100);
    for _ in 0..5 {
        assert_eq!(caller.chat("k").await.status, StatusCode::OK);
    }
    assert_eq!(sim.stats().classes["chat"].ok, 6);
    sim.shutdown().await;
}
