//! The Presence seam: stores who is subscribed to which channel, cluster-wide.
//!
//! Presence only stores members; the hub decides when to add and remove them. The Redis
//! implementation lets members expire unless their node refreshes them, so a crashed node's
//! members vanish within the presence TTL.

mod memory;
mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

pub use self::memory::MemoryPresence;
pub use self::redis::RedisPresence;

/// One subscribed connection as a presence query shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The connection id from the client's `welcome`.
    pub conn_id: String,
    /// The node id the connection is on.
    pub node: String,
    /// The authenticated user (`sub`), `null` for anonymous connections.
    pub user: Option<String>,
}

/// Stores channel members.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Adds (or re-adds) `member` to `channel`; visible to `list` on every node once it returns.
    async fn add(&self, channel: &str, member: &Member) -> Result<(), BrokerError>;

    /// Removes a connection from one channel; gone from `list` on every node once it returns.
    async fn remove(&self, channel: &str, conn_id: &str) -> Result<(), BrokerError>;

    /// Removes a closing connection from all its channels in one call.
    async fn remove_all(&self, conn_id: &str, channels: &[String]) -> Result<(), BrokerError>;

    /// Every live member of `channel`, on every node.
    async fn list(&self, channel: &str) -> Result<Vec<Member>, BrokerError>;

    /// Keeps this node's members from expiring: called periodically with every (channel,
    /// member) pair of the node, in one batch. Only members still stored are kept alive, so a
    /// member removed while the batch was in flight does not come back.
    async fn refresh(&self, members: &[(String, Member)]) -> Result<(), BrokerError>;

    /// Re-adds every given member, for when the store may have lost them (Redis restarted, or
    /// refreshes failed for longer than the TTL).
    async fn restore(&self, members: &[(String, Member)]) -> Result<(), BrokerError>;
}
