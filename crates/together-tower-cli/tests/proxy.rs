//! `together-tower proxy` as a process, over loopback, in front of the simulator: what a client
//! in any language sees. The Python `openai` package and `curl` are run against it by
//! `scripts/proxy-clients`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use together_sim::{Class, ClassLimits, Sim, SimConfig};

const CHAT_MODEL: &str = "meta-llama/Llama-3.3-70B-Instruct-Turbo";

/// A proxy process, its output kept in files so that every line can be searched for a key.
struct Proxy {
    child: Child,
    url: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proxy {
    fn start(name: &str, args: &[&str]) -> Proxy {
        let dir = scratch(name);
        let (stdout, stderr) = (dir.join("stdout"), dir.join("stderr"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_together-tower"))
            .args(["proxy", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("TOGETHER_API_KEY")
            .env_remove("TOGETHER_BASE_URL")
            .env_remove("TOGETHER_REDIS_URL")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let started = Instant::now();
        loop {
            let out = std::fs::read_to_string(&stdout).unwrap_or_default();
            if let Some(url) = out
                .lines()
                .next()
                .and_then(|line| line.strip_prefix("listening on "))
            {
                return Proxy {
                    child,
                    url: url.to_owned(),
                    stdout,
                    stderr,
                };
            }
            if started.elapsed() > Duration::from_secs(60) || child.try_wait().unwrap().is_some() {
                let _ = child.kill();
                let _ = child.wait();
                let err = std::fs::read_to_string(&stderr).unwrap_or_default();
                panic!("the proxy did not start: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the process to end: its exit code, stdout and stderr.
    fn terminate(mut self) -> (i32, String) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap().code().unwrap_or(-1);
        let output = std::fs::read_to_string(&self.stdout).unwrap()
            + &std::fs::read_to_string(&self.stderr).unwrap();
        (exit, output)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "together-tower-proxy-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An answer: its status, headers and body.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

async fn send(url: &str, method: Method, path: &str, key: Option<&str>, body: String) -> Answer {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("{url}{path}"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    let response = client
        .request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn chat(model: &str, stream: bool) -> String {
    json!({"model": model, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "stream": stream})
        .to_string()
}

async fn post_chat(url: &str, key: Option<&str>, body: String) -> Answer {
    send(url, Method::POST, "/v1/chat/completions", key, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_keys_name_tenants_and_the_proxy_key_never_leaves_it() {
    const UPSTREAM_KEY: &str = "upstream-secret-7f3a91c2";
    const ALPHA_KEY: &str = "tenant-key-alpha-5521";
    const BETA_KEY: &str = "tenant-key-beta-8830";
    let sim = Sim::start(SimConfig::default()).await.unwrap();
    let config = scratch("managed-config").join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[quota]\npreset = \"tier-1\"\n[quota.groups.chat]\nrate = \"600/min\"\n\
             tokens = \"60000/min\"\nper_model = true\n\n\
             [tenants.alpha]\nkeys = [\"{ALPHA_KEY}\"]\nweight = 2\npriority = \"interactive\"\n\n\
             [tenants.beta]\nkeys = [\"{BETA_KEY}\"]\ncap = \"50%\"\n"
        ),
    )
    .unwrap();
    let proxy = Proxy::start(
        "managed",
        &[
            "--base-url",
            &sim.url(),
            "--api-key",
            UPSTREAM_KEY,
            "--config",
            config.to_str().unwrap(),
            "--log",
            "trace",
        ],
    );
    let ok = post_chat(&proxy.url, Some(ALPHA_KEY), chat(CHAT_MODEL, false)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    let streamed = post_chat(&proxy.url, Some(BETA_KEY), chat(CHAT_MODEL, true)).await;
    assert_eq!(streamed.status, StatusCode::OK);
    assert!(
        streamed.body.trim_end().ends_with("data: [DONE]"),
        "{}",
        streamed.body
    );
    for key in [Some("tenant-key-gamma"), Some(UPSTREAM_KEY), None] {
        let refused = post_chat(&proxy.url, key, chat(CHAT_MODEL, false)).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{key:?}");
        assert_eq!(refused.json()["error"]["code"], "invalid_api_key");
        assert!(!refused.body.contains(UPSTREAM_KEY));
    }
    let metrics = send(&proxy.url, Method::GET, "/metrics", None, String::new()).await;
    assert!(
        metrics.body.contains("tenant=\"alpha\""),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("together_tower_requests_total"));
    // Together saw the proxy's key only, for both tenants.
    let seen: Vec<String> = sim.stats().keys.into_keys().collect();
    assert_eq!(seen, [together_sim::key_label(UPSTREAM_KEY)]);
    let (exit, output) = proxy.terminate();
    assert_eq!(exit, 0, "{output}");
    for secret in [UPSTREAM_KEY, ALPHA_KEY, BETA_KEY] {
        assert!(!output.contains(secret), "a key in the output:\n{output}");
        assert!(!metrics.body.contains(secret));
        assert!(!ok.body.contains(secret) && !streamed.body.contains(secret));
    }
    assert!(output.contains("tenant=\"alpha\""), "{output}");
    // The stream's token charge was settled from its usage, at its `[DONE]`.
    assert!(output.contains("token charge settled"), "{output}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_unknown_models_and_large_bodies_answer_as_together_would() {
    let proxy = Proxy::start(
        "answers",
        &["--rpm", "60", "--max-wait", "0s", "--max-body", "2000"],
    );
    let first = post_chat(&proxy.url, Some("k"), chat(CHAT_MODEL, false)).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let refused = post_chat(&proxy.url, Some("k"), chat(CHAT_MODEL, false)).await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    assert_eq!(refused.json()["error"]["type"], "rate_limit_exceeded");
    assert_eq!(refused.headers["retry-after"], "1");
    let wait_ms: u64 = refused.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1_000).contains(&wait_ms), "{wait_ms}");
    // Another key has buckets of its own.
    let other = post_chat(&proxy.url, Some("k2"), chat(CHAT_MODEL, false)).await;
    assert_eq!(other.status, StatusCode::OK);

    let unknown = post_chat(
        &proxy.url,
        Some("k3"),
        chat("meta-llama/Llama-3.3-70B-Instruct-Turb", false),
    )
    .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
    assert!(
        unknown.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains(CHAT_MODEL)
    );

    let large = chat(&"x".repeat(3_000), false);
    let too_large = post_chat(&proxy.url, Some("k4"), large).await;
    assert_eq!(too_large.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(too_large.json()["error"]["code"], "request_too_large");

    for path in ["/", "/v2/chat/completions", "/admin"] {
        let answer = send(&proxy.url, Method::GET, path, None, String::new()).await;
        assert_eq!(answer.status, StatusCode::NOT_FOUND, "{path}");
    }
    for path in ["/healthz", "/readyz"] {
        let answer = send(&proxy.url, Method::GET, path, None, String::new()).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
    }
    let metrics = send(&proxy.url, Method::GET, "/metrics", None, String::new()).await;
    assert!(
        metrics
            .body
            .contains("together_tower_refused_total{class=\"chat\",reason=\"rate_limited\"} 1"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("status=\"429\""));
    assert_eq!(proxy.terminate().0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_disconnected_and_a_stalled_body_gets_a_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let proxy = Proxy::start(
        "timeouts",
        &["--header-timeout", "300ms", "--idle-timeout", "300ms"],
    );
    let address = proxy.url.trim_start_matches("http://").to_owned();
    // A connection that never sends a request head is closed.
    let mut silent = tokio::net::TcpStream::connect(&address).await.unwrap();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), silent.read_to_end(&mut buffer));
    assert!(read.await.is_ok(), "a silent connection stayed open");
    // A body that stops coming fails the request with a 408.
    let mut stalled = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\n\
                authorization: Bearer k\r\ncontent-length: 100\r\n\r\n{\"model\":";
    stalled.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0; 4096];
    let read = tokio::time::timeout(Duration::from_secs(30), stalled.read(&mut answer));
    let length = read.await.expect("no answer to a stalled body").unwrap();
    let answer = String::from_utf8_lossy(&answer[..length]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert_eq!(proxy.terminate().0, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_request_in_flight_finish() {
    // Ten requests a second: fifteen sent at once take 1.4 s, and most are still waiting for
    // their turn when the signal comes.
    let proxy = Proxy::start("sigterm", &["--rpm", "600"]);
    let url = proxy.url.clone();
    let calls: Vec<_> = (0..15)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { post_chat(&url, Some("k"), chat(CHAT_MODEL, false)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = tokio::task::spawn_blocking(move || proxy.terminate());
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let (exit, output) = stopped.await.unwrap();
    assert_eq!(exit, 0, "{output}");
    assert!(
        output.contains("every request in flight was answered"),
        "{output}"
    );
    // It no longer accepts.
    assert!(
        tokio::net::TcpStream::connect(url.trim_start_matches("http://"))
            .await
            .is_err()
    );
}

/// Starts the proxy with its own key and `args`, expecting it to refuse: its exit code and
/// stderr.
fn refused_at_start(args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_together-tower"))
        .args(["proxy", "--listen", "127.0.0.1:0"])
        .args(["--api-key", "secret-upstream-key"])
        .args(args)
        .env_remove("TOGETHER_BASE_URL")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code(), stderr)
}

#[test]
fn a_bad_configuration_is_refused_at_start_naming_the_line() {
    let config = scratch("bad-config").join("proxy.toml");
    let tenant = "[tenants.a]\nkeys = [\"secret-tenant-key\"]\nweight = 0\n";
    std::fs::write(&config, tenant).unwrap();
    let (code, stderr) = refused_at_start(&["--config", config.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("proxy.toml:3: tenant \"a\": weight must be at least 1"),
        "{stderr}"
    );
    // A key of its own without tenants would make it an open proxy.
    let (code, stderr) = refused_at_start(&[]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("without tenants"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
}

/// A `redis-server` on a free loopback port, with no persistence, stopped when dropped.
struct RedisServer {
    child: Child,
    url: String,
}

impl RedisServer {
    async fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on the PATH (./scripts/test installs it)");
        let mut server = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
        };
        for _ in 0..250 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = server.child.kill();
        let _ = server.child.wait();
        panic!("redis-server did not start");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_share_one_quota() {
    let redis = RedisServer::start().await;
    // Ten chat requests a second per key, as the proxies are told; a request may arrive 20 ms
    // early (two processes on a loaded 2-core machine).
    let sim = Sim::start(SimConfig {
        limits: [(Class::Chat, ClassLimits::rpm(600))].into(),
        gcra_tolerance_ms: 20,
        ..SimConfig::default()
    })
    .await
    .unwrap();
    let flags = |name| {
        let shared = [
            "--base-url",
            &sim.url(),
            "--rpm",
            "600",
            "--redis-url",
            &redis.url,
            "--redis-replicas",
            "2",
        ]
        .map(str::to_owned);
        Proxy::start(name, &shared.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let proxies = [flags("redis-a"), flags("redis-b")];
    // Thirty requests of one key at once, half through each proxy: alone, each proxy would
    // send at the whole rate, and the server would refuse about half.
    let calls: Vec<_> = (0..30)
        .map(|index| {
            let url = proxies[index % 2].url.clone();
            tokio::spawn(async move { post_chat(&url, Some("k"), chat(CHAT_MODEL, false)).await })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    }
    let chat = sim.stats().class(Class::Chat);
    assert!(chat.rate_limited <= 1, "{chat:?}");
    for proxy in proxies {
        assert_eq!(proxy.terminate().0, 0);
    }
}
