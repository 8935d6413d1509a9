//! The History seam: per-channel offsets, epochs and the last N messages, for recovery.
//!
//! Only used when `PUBGATE_HISTORY_SIZE` is above zero; with history off the node never builds
//! one and deliveries keep v1's code path and bytes. A history *publishes*: assigning the offset,
//! appending and delivering are one step (a Redis function, or the memory channel's lock), so
//! every node delivers the same offset for the same message, in offset order. Reads take the
//! epoch and the newest offset, plus the messages a recovery or a `history` request needs.
//!
//! What a positioned message looks like on the broker (backends that SUBSCRIBE read it) is
//! [`crate::broker::encode_positioned`]: a header no JSON text can start with, then the raw
//! payload.

mod memory;
mod redis;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BrokerError;

pub use self::memory::MemoryHistory;
pub use self::redis::{RedisHistory, RedisHistoryOptions};

/// A channel's state as read, and the messages asked for (oldest first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub epoch: String,
    /// Offset of the newest message; 0 if none.
    pub offset: u64,
    /// `(offset, payload)` pairs, oldest first, contiguous.
    pub messages: Vec<(u64, Bytes)>,
}

/// What the messages of a read should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read<'a> {
    /// None: only the epoch and the newest offset.
    State,
    /// Every kept message after `offset` when `epoch` is the current one (none otherwise).
    Since { epoch: &'a str, offset: u64 },
    /// The newest `limit` kept messages.
    Latest { limit: usize },
}

/// Per-channel history shared by every node of a deployment.
#[async_trait]
pub trait History: Send + Sync + 'static {
    /// Assigns the channel's next offset to `payload`, keeps it, and publishes it to every node
    /// as one step; returns the offset. An error means nothing was published (except
    /// [`BrokerError::Timeout`]: the outcome is unknown).
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<u64, BrokerError>;

    /// Reads the channel's epoch (creating it on first use) and the messages `read` asks for.
    async fn read(&self, channel: &str, read: Read<'_>) -> Result<Snapshot, BrokerError>;
}

impl Snapshot {
    /// Whether a client that saw `since` can be brought up to date from this snapshot (read with
    /// [`Read::Since`]): same epoch, not beyond the newest, and nothing after it trimmed.
    pub fn recovers(&self, epoch: &str, offset: u64) -> bool {
        if epoch != self.epoch || offset > self.offset {
            return false;
        }
        let missing = self.offset - offset;
        self.messages.len() as u64 == missing
            && self.messages.first().is_none_or(|(o, _)| *o == offset + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_needs_the_same_epoch_and_every_message_after_since() {
        let snap = |offset, first: u64| Snapshot {
            epoch: "e".into(),
            offset,
            messages: (first..=offset).map(|o| (o, Bytes::new())).collect(),
        };
        assert!(snap(5, 3).recovers("e", 2));
        assert!(snap(5, 6).recovers("e", 5));
        assert!(snap(0, 1).recovers("e", 0));
        assert!(!snap(5, 3).recovers("f", 2));
        assert!(!snap(5, 4).recovers("e", 2), "message 3 trimmed");
        assert!(!snap(5, 6).recovers("e", 6), "beyond the newest");
    }
}
