//! Redis commands (PUBLISH, presence scripts) over one long-lived multiplexed connection, to one
//! Redis or to a Redis Cluster.
//!
//! One Redis: deadpool-redis creates and health-checks the connections, but taking one from the
//! pool per command costs a recycle round trip (UNWATCH + PING) that would double the cost of a
//! publish. So the node takes one connection out of the pool and shares it: a redis-rs
//! `MultiplexedConnection` pipelines concurrent commands from every task over one socket. When it
//! fails, it is dropped and the next command takes a fresh one from the pool. The pool stays
//! (rather than a bare `Client`) because it bounds connection creation with its create and wait
//! timeouts and serialises reconnect attempts; its manager is built from the `ConnectionInfo` of
//! a client made by [`crate::redis_client`], which is how `rediss://` with a private CA reaches it.
//!
//! Cluster: a redis-rs `ClusterConnection` (cluster-async), which routes each command by its key's
//! slot and follows MOVED/ASK itself. A pipeline whose commands hit several slots is split into
//! one sub-pipeline per slot (sent concurrently, answers kept in order), because redis-rs sends a pipeline to
//! the node of its first key. Every call is bounded by the configured timeout, because redis-rs
//! can otherwise wait through a whole reconnect.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis::aio::{ConnectionLike, MultiplexedConnection};
use deadpool_redis::redis::cluster::ClusterClient;
use deadpool_redis::redis::cluster_async::ClusterConnection;
use deadpool_redis::redis::{
    self, AsyncConnectionConfig, Cmd, Pipeline, RedisFuture, RedisResult, Value,
};
use deadpool_redis::{Manager, Pool, Runtime};

use crate::error::{BrokerError, Error};

/// A command connection: to one Redis, or to a cluster.
#[derive(Clone)]
pub enum CommandConnection {
    /// One Redis server.
    Single(MultiplexedConnection),
    /// A Redis Cluster, routed by key slot.
    Cluster(ClusterConnection),
}

impl ConnectionLike for CommandConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CommandConnection::Single(c) => c.req_packed_command(cmd),
            CommandConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CommandConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            CommandConnection::Cluster(c) => {
                let groups = if pipeline.is_transaction() {
                    Vec::new()
                } else {
                    slot_groups(pipeline)
                };
                if groups.len() <= 1 && groups.iter().all(|g| g.0.is_some()) {
                    c.req_packed_commands(pipeline, offset, count)
                } else {
                    Box::pin(split_by_slot(c.clone(), pipeline, groups))
                }
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CommandConnection::Single(c) => c.get_db(),
            CommandConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// Sends each slot's commands as one sub-pipeline (their order kept) and each keyless command on
/// its own (so redis-rs routes it: SCRIPT LOAD and FUNCTION LOAD to every master), all
/// concurrently, and puts the answers back in the pipeline's order.
async fn split_by_slot(
    conn: ClusterConnection,
    pipeline: &Pipeline,
    groups: Vec<(Option<u16>, Vec<usize>)>,
) -> RedisResult<Vec<Value>> {
    let commands: Vec<&Cmd> = pipeline.cmd_iter().collect();
    let sends = groups.iter().map(|(slot, indexes)| {
        let mut conn = conn.clone();
        let mut sub = redis::pipe();
        for &i in indexes {
            sub.add_command(commands[i].clone());
        }
        let keyless = slot.is_none();
        async move {
            if keyless {
                let cmd = sub.cmd_iter().next().expect("one command");
                conn.req_packed_command(cmd).await.map(|v| vec![v])
            } else {
                let n = sub.len();
                conn.req_packed_commands(&sub, 0, n).await
            }
        }
    });
    let answers = futures_util::future::join_all(sends).await;
    let mut out = vec![Value::Nil; commands.len()];
    for ((_, indexes), answer) in groups.iter().zip(answers) {
        for (&i, value) in indexes.iter().zip(answer?) {
            out[i] = value;
        }
    }
    Ok(out)
}

/// The pipeline's command indexes grouped by the slot of their key; each keyless command is a
/// group of its own (slot `None`).
fn slot_groups(pipeline: &Pipeline) -> Vec<(Option<u16>, Vec<usize>)> {
    let mut groups: Vec<(Option<u16>, Vec<usize>)> = Vec::new();
    for (i, cmd) in pipeline.cmd_iter().enumerate() {
        let slot = key_slot(cmd);
        match groups
            .iter_mut()
            .find(|(s, _)| slot.is_some() && *s == slot)
        {
            Some((_, indexes)) => indexes.push(i),
            None => groups.push((slot, vec![i])),
        }
    }
    groups
}

/// The slot of a command's first key, for the commands pubgate pipelines (single-key commands
/// and scripts/functions, whose first key follows `numkeys`).
fn key_slot(cmd: &Cmd) -> Option<u16> {
    let mut args = cmd.args_iter().filter_map(|a| match a {
        redis::Arg::Simple(b) => Some(b),
        _ => None,
    });
    let name = args.next()?.to_ascii_uppercase();
    let key = match name.as_slice() {
        b"EVAL" | b"EVALSHA" | b"EVAL_RO" | b"EVALSHA_RO" | b"FCALL" | b"FCALL_RO" => {
            let _body = args.next()?;
            let numkeys: usize = std::str::from_utf8(args.next()?).ok()?.parse().ok()?;
            if numkeys == 0 {
                return None;
            }
            args.next()?
        }
        b"PING" | b"SCRIPT" | b"FUNCTION" | b"CLUSTER" | b"INFO" | b"TIME" => return None,
        _ => args.next()?,
    };
    Some(crate::redis_client::slots::slot_of(key))
}

enum Backend {
    Single(Pool),
    Cluster(Box<ClusterClient>),
}

/// The node's command connection to Redis.
pub struct RedisCommands {
    backend: Backend,
    /// The shared connection and a generation number, so a failure seen by a slow caller does
    /// not throw away a newer connection.
    current: Mutex<(u64, Option<CommandConnection>)>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCommands")
            .field("timeout", &self.timeout)
            .field("cluster", &self.is_cluster())
            .finish_non_exhaustive()
    }
}

impl RedisCommands {
    /// Builds the pool; connects lazily, so a Redis that is down at start does not stop the node.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        Self::with_ca(url, None, timeout)
    }

    /// Like [`RedisCommands::new`], trusting `ca` (PEM) for `rediss://`.
    pub fn with_ca(url: &str, ca: Option<&[u8]>, timeout: Duration) -> Result<Self, Error> {
        let client = crate::redis_client::open(url, ca).map_err(|e| Error::Redis(e.to_string()))?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager = Manager::new_with_config(client.get_connection_info().clone(), config)
            .map_err(|e| Error::Redis(e.to_string()))?;
        let pool = Pool::builder(manager)
            .max_size(4)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Redis(e.to_string()))?;
        Ok(Self::from_backend(Backend::Single(pool), timeout))
    }

    /// Commands to a Redis Cluster known by its seed URLs; connects lazily.
    pub fn cluster(seeds: &[String], ca: Option<&[u8]>, timeout: Duration) -> Result<Self, Error> {
        let mut builder =
            redis::cluster::ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                .connection_timeout(timeout)
                .response_timeout(timeout)
                // Give up within about one call timeout; the caller's bound cuts it anyway.
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(500);
        if let Some(pem) = ca {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            });
        }
        let client = builder.build().map_err(|e| Error::Redis(e.to_string()))?;
        Ok(Self::from_backend(
            Backend::Cluster(Box::new(client)),
            timeout,
        ))
    }

    fn from_backend(backend: Backend, timeout: Duration) -> Self {
        RedisCommands {
            backend,
            current: Mutex::new((0, None)),
            timeout,
        }
    }

    /// Whether commands go to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.backend, Backend::Cluster(_))
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn connect(&self) -> Result<CommandConnection, BrokerError> {
        match &self.backend {
            // No connection within the timeout: nothing was sent, so the outcome is known (`Down`).
            Backend::Single(pool) => match tokio::time::timeout(self.timeout, pool.get()).await {
                Err(_) => Err(BrokerError::Down),
                Ok(Err(deadpool_redis::PoolError::Backend(e))) => Err(e.into()),
                Ok(Err(_)) => Err(BrokerError::Down),
                Ok(Ok(object)) => Ok(CommandConnection::Single(deadpool_redis::Connection::take(
                    object,
                ))),
            },
            Backend::Cluster(client) => {
                match tokio::time::timeout(self.timeout, client.get_async_connection()).await {
                    Err(_) => Err(BrokerError::Down),
                    Ok(Err(e)) => Err(e.into()),
                    Ok(Ok(conn)) => Ok(CommandConnection::Cluster(conn)),
                }
            }
        }
    }

    async fn connection(&self) -> Result<(u64, CommandConnection), BrokerError> {
        if let (generation, Some(conn)) = &*self.lock() {
            return Ok((*generation, conn.clone()));
        }
        let conn = self.connect().await?;
        let mut current = self.lock();
        if let (generation, Some(existing)) = &*current {
            // Another caller connected meanwhile; use theirs and let ours close.
            return Ok((*generation, existing.clone()));
        }
        current.0 += 1;
        current.1 = Some(conn.clone());
        Ok((current.0, conn))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<CommandConnection>)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn discard(&self, generation: u64) {
        let mut current = self.lock();
        if current.0 == generation {
            current.1 = None;
        }
    }

    /// Publishes `payload` on the Redis channel `channel` with `command`: `PUBLISH`, or
    /// `SPUBLISH` for a shard channel in cluster mode. Returns the number of receivers.
    pub async fn publish<P>(
        &self,
        command: &'static str,
        channel: String,
        payload: P,
    ) -> Result<i64, BrokerError>
    where
        P: deadpool_redis::redis::ToRedisArgs,
    {
        self.run(|mut c| async move {
            deadpool_redis::redis::cmd(command)
                .arg(channel)
                .arg(payload)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
    }

    /// Runs one command, pipeline or script on the shared connection, bounded by the timeout.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(CommandConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.connection().await?;
        let cluster = matches!(conn, CommandConnection::Cluster(_));
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                // A cluster connection reconnects per node by itself; a single one is replaced.
                if !cluster
                    && (e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error())
                {
                    self.discard(generation);
                }
                // redis-rs's own response timeout: sent, no answer, outcome unknown.
                if e.is_timeout() {
                    return Err(BrokerError::Timeout(self.timeout));
                }
                Err(e.into())
            }
            Err(_) => {
                // The connection may be stuck behind a dead route; start afresh next time.
                self.discard(generation);
                Err(BrokerError::Timeout(self.timeout))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipelines_are_grouped_by_key_slot() {
        let mut pipe = redis::pipe();
        pipe.hdel("{a}h", "x")
            .zrem("{b}z", "x")
            .cmd("EVALSHA")
            .arg("sha")
            .arg(2)
            .arg("{a}k1")
            .arg("{a}k2")
            .cmd("PING")
            .zrem("{a}z", "y");
        let groups: Vec<Vec<usize>> = slot_groups(&pipe).into_iter().map(|g| g.1).collect();
        assert_eq!(groups, vec![vec![0, 2, 4], vec![1], vec![3]]);
        let mut one = redis::pipe();
        one.hdel("{a}h", "x").zrem("{a}z", "x");
        assert_eq!(slot_groups(&one).len(), 1);
        let mut load = redis::pipe();
        load.cmd("SCRIPT").arg("LOAD").arg("return 1");
        assert_eq!(slot_groups(&load), vec![(None, vec![0])]);
    }
}
