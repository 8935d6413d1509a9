//! The History seam: per-channel offsets, epochs and the last N messages, for recovery.
//!
//! Only used when `PUBGATE_HISTORY_SIZE` is above zero; with history off the node never builds
//! one and deliveries keep v1's code path and bytes. A history *publishes*: assigning the offset,
//! appending and delivering are one step (a Redis function, or the memory channel's lock), so
//! every node delivers the same offset for the same message, in offset order. Reads take the
//! epoch and the newest offset, plus the messages a recovery or a `history` request needs.
//!
//! What a positioned message looks like on the broker (backends that SUBSCRIBE read it) is
//! [`encode_positioned`]: a header no JSON text can start with, then the raw payload.

mod memory;
mod redis;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BrokerError;

pub use self::memory::MemoryHistory;
pub use self::redis::{RedisHistory, RedisHistoryOptions};

/// Where a delivered message sits in its channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position<'a> {
    /// 1, 2, 3 ... within the epoch.
    pub offset: u64,
    /// The channel's epoch when the message was published.
    pub epoch: &'a str,
}

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

/// First byte of a positioned payload on the broker: ASCII RS (record separator), which no JSON
/// text may start with (JSON allows only space, tab, CR and LF before a value).
pub const POSITION_MARK: u8 = 0x1E;

/// `RS <offset> ":" <epoch> LF <payload>`: the positioned message as the Redis function
/// publishes it (the memory history never encodes one). Kept here beside its parser.
pub fn encode_positioned(offset: u64, epoch: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + epoch.len() + 24);
    out.push(POSITION_MARK);
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(epoch.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Splits a broker payload into its position and the raw payload, without allocating. A payload
/// that does not start with a well-formed header is raw (v1: no offset) and returned whole.
pub fn parse_positioned(payload: &[u8]) -> (Option<Position<'_>>, &[u8]) {
    let raw = (None, payload);
    if payload.first() != Some(&POSITION_MARK) {
        return raw;
    }
    // Header: at most 20 digits, ':', an epoch of at most 64 bytes, '\n'.
    let head = &payload[1..payload.len().min(1 + 20 + 1 + 64 + 1)];
    let Some(nl) = head.iter().position(|&b| b == b'\n') else {
        return raw;
    };
    let Some(colon) = head[..nl].iter().position(|&b| b == b':') else {
        return raw;
    };
    let digits = &head[..colon];
    let epoch = &head[colon + 1..nl];
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return raw;
    }
    let (Ok(offset), Ok(epoch)) = (
        std::str::from_utf8(digits).unwrap_or("").parse::<u64>(),
        std::str::from_utf8(epoch),
    ) else {
        return raw;
    };
    if offset == 0 || epoch.is_empty() {
        return raw;
    }
    (Some(Position { offset, epoch }), &payload[1 + nl + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positioned_payloads_round_trip() {
        let encoded = encode_positioned(18, "1733300000123456", br#"{"x":1}"#);
        assert_eq!(&encoded[..], b"\x1e18:1733300000123456\n{\"x\":1}");
        let (pos, payload) = parse_positioned(&encoded);
        assert_eq!(
            pos,
            Some(Position {
                offset: 18,
                epoch: "1733300000123456"
            })
        );
        assert_eq!(payload, br#"{"x":1}"#);
        // The payload may itself contain newlines and colons.
        let encoded = encode_positioned(1, "e", b"a:b\nc");
        assert_eq!(parse_positioned(&encoded).1, b"a:b\nc");
    }

    #[test]
    fn anything_else_is_a_raw_payload() {
        for raw in [
            &b""[..],
            b"{\"x\":1}",
            b"hello",
            b"\x1e",
            b"\x1e12",
            b"\x1e12:e",
            b"\x1e:e\n{}",
            b"\x1e0:e\n{}",
            b"\x1e12:\n{}",
            b"\x1ex2:e\n{}",
            b"\x1e99999999999999999999999:e\n{}",
        ] {
            assert_eq!(parse_positioned(raw), (None, raw), "{raw:?}");
        }
    }

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
