//! Against a real `redis-server` that the test starts on a free loopback port.

use std::process::Stdio;
use std::time::Duration;

use together_tower::key::ApiKeyId;
use together_tower::limit::{BucketSpec, Cost, Decision, Limiter, Pace, Rates};
use together_tower_redis::{RedisLimiter, RedisSettings};
use tokio::process::{Child, Command};

/// A `redis-server` on a free loopback port, with no persistence, stopped when dropped.
struct RedisServer {
    child: Child,
    port: u16,
}

impl RedisServer {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on the PATH (./scripts/test installs it)");
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Self { child, port };
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn ten_a_second() -> Rates {
    Rates {
        requests: Some(Pace::new(Duration::from_millis(100), Duration::ZERO)),
        tokens: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_on_one_redis_share_one_bucket() {
    let redis = RedisServer::start().await;
    let first = RedisLimiter::connect(&redis.url(), RedisSettings::default())
        .await
        .unwrap();
    let second = RedisLimiter::connect(&redis.url(), RedisSettings::default())
        .await
        .unwrap();
    let spec = || BucketSpec::new(ApiKeyId::ANONYMOUS, "chat", None, ten_a_second());
    let (a, b) = (first.bucket(spec()), second.bucket(spec()));
    let one = Cost {
        requests: 1,
        tokens: 0,
    };
    assert_eq!(
        first.acquire(&a, one, Duration::ZERO).await.unwrap(),
        Decision::Allow
    );
    // The other process sees the turn taken: its request must wait about one interval.
    match second.acquire(&b, one, Duration::ZERO).await.unwrap() {
        Decision::Wait(wait) => assert!(
            wait > Duration::from_millis(50) && wait <= Duration::from_millis(100),
            "{wait:?}"
        ),
        other => panic!("expected a wait, got {other:?}"),
    }
}
