//! The Broker seam: moves messages between nodes.
//!
//! A broker knows nothing about WebSocket connections. The node subscribes a channel on the
//! broker when its first local subscriber arrives and unsubscribes after the last one leaves
//! (see `node.rs`); everything the broker receives for a subscribed channel is handed, in
//! arrival order, to the [`MessageSink`] given at construction. Both implementations use a single
//! delivery path: even this node's own publishes come back through the sink.

mod cluster;
mod memory;
mod position;
mod redis;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BrokerError;

pub use self::cluster::{ClusterBroker, ClusterBrokerOptions};
pub use self::memory::MemoryBroker;
pub use self::position::{encode_positioned, parse_positioned, Position, POSITION_MARK};
pub use self::redis::{RedisBroker, RedisBrokerOptions};

/// Receives every message a broker delivers to this node.
pub trait MessageSink: Send + Sync + 'static {
    /// Called once per message, in the order the broker received them; must not block.
    /// `payload` is the raw published bytes (the JSON text for client publishes); `position` is
    /// the message's place in the channel's history (history on, published through it), `None`
    /// for a raw publish and always with history off.
    fn deliver(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>);
}

/// Moves messages between nodes.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Makes this node receive `channel`. Returns only once the subscription is live, so a
    /// message published after it returns reaches the sink. Calls for one channel are never
    /// concurrent (the node serialises them).
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops receiving `channel`. Messages already received may still reach the sink.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Publishes `payload` to every node subscribed to `channel`. `Ok` means the broker accepted
    /// it; an error means it was not accepted and will not be delivered later.
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError>;

    /// Whether the broker is connected and delivering (drives `/readyz` and `pubgate_broker_up`).
    fn is_up(&self) -> bool;

    /// Stops background tasks and releases connections.
    async fn shutdown(&self) {}
}
