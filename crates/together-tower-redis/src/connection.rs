//! The connection to Redis: one server, or a Redis Cluster.
//!
//! Both carry every script call the same way (redis-rs's `ConnectionLike`); a cluster
//! connection routes each call to the node that owns its keys' slot and follows the cluster's
//! `MOVED` and `ASK` redirections itself. Every key of a bucket shares one `{hash tag}`, so
//! one script call never spans two slots.

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

use crate::RedisSettings;
use crate::error::RedisBackendError;

/// A connection to one Redis, or to a cluster.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One server, reconnected by redis-rs's connection manager.
    Single(ConnectionManager),
    /// A cluster, whose nodes redis-rs discovers from the ones given.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Whether this is a cluster connection.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// Connects to the one Redis at `url`, and checks that it is not a cluster node: its
    /// answers for keys on other nodes would be `MOVED`, which a single connection cannot
    /// follow.
    pub(crate) async fn single(
        url: &str,
        settings: &RedisSettings,
    ) -> Result<Self, RedisBackendError> {
        let client = redis::Client::open(url).map_err(RedisBackendError::from_redis)?;
        // Reconnecting backs off no longer than `retry_after`, so that once Redis is back
        // every process returns to it within about that long.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.call_timeout))
            .set_response_timeout(Some(settings.call_timeout))
            .set_max_delay(settings.retry_after);
        let mut connection =
            within(settings, client.get_connection_manager_with_config(config)).await?;
        let info: String = within(
            settings,
            redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut connection),
        )
        .await?;
        if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
            return Err(RedisBackendError::Misconfigured(format!(
                "{} is a Redis Cluster node: connect to the cluster (RedisBackend::connect_cluster, or the CLI's --redis-cluster)",
                redacted(url)
            )));
        }
        Ok(Connection::Single(connection))
    }

    /// Connects to the cluster that `nodes` belong to (one is enough; the rest are found).
    pub(crate) async fn cluster(
        nodes: &[&str],
        settings: &RedisSettings,
    ) -> Result<Self, RedisBackendError> {
        let client = ClusterClient::builder(nodes.iter().copied())
            .connection_timeout(settings.call_timeout)
            .response_timeout(settings.call_timeout)
            // A redirection or a node that went away is retried within the call timeout,
            // which bounds every decision anyway.
            .retries(3)
            .min_retry_wait(10)
            .max_retry_wait(u64::try_from(settings.retry_after.as_millis()).unwrap_or(u64::MAX))
            .build()
            .map_err(RedisBackendError::from_redis)?;
        let connection = within(settings, client.get_async_connection()).await?;
        Ok(Connection::Cluster(connection))
    }
}

/// `call`, within the call timeout; its error typed.
async fn within<T>(
    settings: &RedisSettings,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisBackendError> {
    tokio::time::timeout(settings.call_timeout, call)
        .await
        .map_err(|_| RedisBackendError::Timeout(settings.call_timeout))?
        .map_err(RedisBackendError::from_redis)
}

/// A URL without its password, for an error message.
fn redacted(url: &str) -> String {
    match redis::parse_redis_url(url) {
        Some(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        None => "the Redis URL".to_owned(),
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            Connection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}
