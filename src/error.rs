//! Error types, one small enum per boundary.
//!
//! Expected conditions a client can cause are not errors here: they are `ErrorCode` replies
//! (in the wire protocol, a layer above). These enums are for start-up and for the broker seam.

use std::time::Duration;

/// A configuration value that parses but cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}: {reason}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub name: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl ConfigError {
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        ConfigError {
            name,
            reason: reason.into(),
        }
    }
}

/// Why a node could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address from `PUBGATE_LISTEN`.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metrics registry refused a collector (a bug, not a runtime condition).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The Redis connection pool could not be built from the URL.
    #[error("redis: {0}")]
    Redis(String),
}

/// A broker or presence call that did not succeed. Clients see `timeout` for
/// [`BrokerError::Timeout`] (outcome unknown) and `unavailable` otherwise (nothing done).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker is known to be down (reconnecting); nothing was sent.
    #[error("broker unavailable")]
    Down,
    /// The call was sent and did not finish in time; its outcome is unknown.
    #[error("broker call timed out after {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error or the connection failed before the call was sent.
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}
