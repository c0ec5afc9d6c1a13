//! A `redis-server` for the tests: started on a free loopback port, stopped when dropped.

#![allow(dead_code)]

use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A `redis-server` on a free loopback port, with no persistence, stopped when dropped.
pub(crate) struct RedisServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    pub(crate) async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    pub(crate) async fn start_on(port: u16) -> Self {
        Self::spawn(port, &[]).await
    }

    /// A node of a cluster, keeping its cluster configuration in `dir`.
    pub(crate) async fn start_cluster_node(port: u16, dir: &std::path::Path) -> Self {
        let config = dir.join(format!("nodes-{port}.conf"));
        let config = config.to_str().unwrap();
        Self::spawn(
            port,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                config,
                "--cluster-node-timeout",
                "2000",
            ],
        )
        .await
    }

    async fn spawn(port: u16, more: &[&str]) -> Self {
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
                // For `DEBUG SLEEP`: a Redis that answers slowly.
                "--enable-debug-command",
                "yes",
            ])
            .args(more)
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

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server and waits until it is gone.
    pub(crate) async fn stop(mut self) -> u16 {
        let _ = self.child.kill().await;
        self.port
    }

    /// A command, on a connection of its own.
    pub(crate) async fn command(&self, args: &[&str]) {
        let client = redis::Client::open(self.url()).unwrap();
        let mut connection = client.get_multiplexed_async_connection().await.unwrap();
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        let _: redis::Value = command.query_async(&mut connection).await.unwrap();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// A Redis Cluster of three masters on free loopback ports, each node a `redis-server` of
/// its own, stopped when dropped.
pub(crate) struct RedisCluster {
    nodes: Vec<Option<RedisServer>>,
    ports: Vec<u16>,
    dir: std::path::PathBuf,
}

impl RedisCluster {
    /// Starts three nodes, joins them into one cluster, and waits until it serves every slot.
    pub(crate) async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "together-tower-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for &port in &ports {
            nodes.push(Some(RedisServer::start_cluster_node(port, &dir).await));
        }
        let addresses: Vec<String> = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .await
            .expect("redis-cli on the PATH (it comes with redis-server)");
        assert!(created.success(), "redis-cli --cluster create failed");
        let cluster = Self { nodes, ports, dir };
        cluster.wait_until_ok().await;
        cluster
    }

    /// Every node's URL.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|port| format!("redis://127.0.0.1:{port}/"))
            .collect()
    }

    /// Stops node `index` (its slots are served by nobody until it is back).
    pub(crate) async fn stop(&mut self, index: usize) {
        if let Some(node) = self.nodes[index].take() {
            node.stop().await;
        }
    }

    /// Starts node `index` again, on its port, with the cluster configuration it left.
    pub(crate) async fn restart(&mut self, index: usize) {
        let node = RedisServer::start_cluster_node(self.ports[index], &self.dir).await;
        self.nodes[index] = Some(node);
        self.wait_until_ok().await;
    }

    async fn wait_until_ok(&self) {
        for _ in 0..250 {
            let mut all_ok = true;
            for url in self.urls() {
                let client = redis::Client::open(url).unwrap();
                let info: Option<String> = match client.get_multiplexed_async_connection().await {
                    Ok(mut connection) => redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut connection)
                        .await
                        .ok(),
                    Err(_) => None,
                };
                all_ok &= info.is_some_and(|info| info.contains("cluster_state:ok"));
            }
            if all_ok {
                return;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        panic!("the cluster did not come up");
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
