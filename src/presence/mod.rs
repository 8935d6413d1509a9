//! The Presence seam: stores who is subscribed to which channel, cluster-wide, and announces
//! every change as a join or leave event.
//!
//! Presence only stores members; the node decides when to add and remove them. Every change of
//! the stored set is announced on the broker channel `__presence:<channel>` by the store itself,
//! atomically with the change (a Lua script on Redis, under the map's lock in memory), so a
//! member's join and leave are published in the order they happened and never twice.
//!
//! Cost does not grow with members: the Redis implementation keeps one heartbeat per node, not
//! a TTL per member. Survivors find a node whose heartbeat lapsed and reap its members (with
//! their leave events) through a per-node index of its channels.

mod memory;
mod redis;

use async_trait::async_trait;

use crate::error::BrokerError;

pub use self::memory::MemoryPresence;
pub use self::redis::RedisPresence;
pub use crate::wire::member::{
    event_conn_id, event_json, events_channel, is_events_channel, EventKind, Info, Member,
    EVENTS_PREFIX, MAX_INFO_BYTES,
};

/// The answer to a presence query.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Every member of the channel, exactly.
    pub count: usize,
    /// At most the requested number of members (an arbitrary subset when capped).
    pub members: Vec<Member>,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    /// The store had lost this node (first beat, a Redis restart, or a lapse that got the node
    /// reaped): its members must be restored.
    pub lost: bool,
    /// A survivor is reaping this node right now: restore only once it is done.
    pub being_reaped: bool,
    /// Other nodes whose heartbeat lapsed, to be reaped.
    pub dead: Vec<String>,
}

/// Stores channel members and announces joins and leaves.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// Adds (or re-adds) `member` to `channel`; visible to `list` on every node once it returns.
    /// A member that was not present yet is announced with a join; returns whether it was.
    async fn add(&self, channel: &str, member: &Member) -> Result<bool, BrokerError>;

    /// Removes (channel, conn_id) pairs at once, grouped by channel (pipelined on Redis); each
    /// member that was present is announced with a leave and is gone from `list` on every node
    /// once this returns. Returns how many leaves. The three methods below are its shapes.
    async fn remove_pairs(&self, pairs: &[(&str, &str)]) -> Result<usize, BrokerError>;

    /// Removes a connection from one channel; returns how many leaves (0 or 1).
    async fn remove(&self, channel: &str, conn_id: &str) -> Result<usize, BrokerError> {
        self.remove_pairs(&[(channel, conn_id)]).await
    }

    /// Removes a closing connection from all its channels in one call; returns the leaves.
    async fn remove_all(&self, conn_id: &str, channels: &[String]) -> Result<usize, BrokerError> {
        let pairs: Vec<(&str, &str)> = channels.iter().map(|c| (c.as_str(), conn_id)).collect();
        self.remove_pairs(&pairs).await
    }

    /// Removes many (channel, member) pairs at once: a draining node's members. Returns the
    /// leaves announced.
    async fn remove_members(&self, members: &[(String, Member)]) -> Result<usize, BrokerError> {
        let pairs: Vec<(&str, &str)> = members
            .iter()
            .map(|(c, m)| (c.as_str(), m.conn_id.as_str()))
            .collect();
        self.remove_pairs(&pairs).await
    }

    /// The exact member count of `channel` and at most `max` members (`0`: the count only).
    async fn list(&self, channel: &str, max: usize) -> Result<Listing, BrokerError>;

    /// Re-adds every given member (announcing joins for those that were missing), for when the
    /// store lost them. Returns the joins announced.
    async fn restore(&self, members: &[(String, Member)]) -> Result<usize, BrokerError>;

    /// Tells the store this node has no member left in `channel` (its last local subscriber
    /// left), so a reaper need not visit the channel. Called under the node's channel lock.
    async fn unindex(&self, channel: &str) -> Result<(), BrokerError>;

    /// Keeps this node alive in the store; called every tenth of the presence TTL. Reports
    /// whether the node must restore its members and which other nodes are dead.
    async fn heartbeat(&self) -> Result<Heartbeat, BrokerError>;

    /// Removes a dead node's members, announcing their leaves, unless another node is already
    /// doing it (a short lock). Returns the leaves announced.
    async fn reap(&self, node: &str) -> Result<usize, BrokerError>;
}
