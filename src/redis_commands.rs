//! Redis commands (PUBLISH, presence scripts) over one long-lived multiplexed connection.
//!
//! deadpool-redis creates and health-checks the connections, but taking one from the pool per
//! command costs a recycle round trip (UNWATCH + PING) that would double the cost of a publish.
//! So the node takes one connection out of the pool and shares it: a redis-rs
//! `MultiplexedConnection` pipelines concurrent commands from every task over one socket. When it
//! fails, it is dropped and the next command takes a fresh one from the pool. Every call is bounded
//! by the configured timeout, because redis-rs can otherwise wait through a whole reconnect.

use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_redis::redis::aio::MultiplexedConnection;
use deadpool_redis::redis::{AsyncConnectionConfig, RedisResult};
use deadpool_redis::{Manager, Pool, Runtime};

use crate::error::{BrokerError, Error};

/// The node's command connection to Redis.
pub struct RedisCommands {
    pool: Pool,
    /// The shared connection and a generation number, so a failure seen by a slow caller does
    /// not throw away a newer connection.
    current: Mutex<(u64, Option<MultiplexedConnection>)>,
    timeout: Duration,
}

impl std::fmt::Debug for RedisCommands {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCommands")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisCommands {
    /// Builds the pool; connects lazily, so a Redis that is down at start does not stop the node.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, Error> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let manager =
            Manager::new_with_config(url, config).map_err(|e| Error::Redis(e.to_string()))?;
        let pool = Pool::builder(manager)
            .max_size(4)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Redis(e.to_string()))?;
        Ok(RedisCommands {
            pool,
            current: Mutex::new((0, None)),
            timeout,
        })
    }

    /// The per-call timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn connection(&self) -> Result<(u64, MultiplexedConnection), BrokerError> {
        if let (generation, Some(conn)) = &*self.lock() {
            return Ok((*generation, conn.clone()));
        }
        // No connection within the timeout: nothing was sent, so the outcome is known (`Down`).
        let object = match tokio::time::timeout(self.timeout, self.pool.get()).await {
            Err(_) => return Err(BrokerError::Down),
            Ok(Err(deadpool_redis::PoolError::Backend(e))) => return Err(e.into()),
            Ok(Err(_)) => return Err(BrokerError::Down),
            Ok(Ok(object)) => object,
        };
        let conn = deadpool_redis::Connection::take(object);
        let mut current = self.lock();
        if let (generation, Some(existing)) = &*current {
            // Another caller connected meanwhile; use theirs and let ours close.
            return Ok((*generation, existing.clone()));
        }
        current.0 += 1;
        current.1 = Some(conn.clone());
        Ok((current.0, conn))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, Option<MultiplexedConnection>)> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn discard(&self, generation: u64) {
        let mut current = self.lock();
        if current.0 == generation {
            current.1 = None;
        }
    }

    /// Runs one command, pipeline or script on the shared connection, bounded by the timeout.
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, BrokerError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (generation, conn) = self.connection().await?;
        match tokio::time::timeout(self.timeout, f(conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
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
