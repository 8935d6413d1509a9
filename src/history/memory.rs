//! History of the embedded broker: per-channel state in this process.
//!
//! A publish assigns the offset, appends to the channel's ring and hands the message to the sink
//! while holding the channel's shard lock, so deliveries leave in offset order and a reader that
//! takes the same lock sees either before or after a message, never half of it. State unused for
//! the TTL (no publish since) is dropped lazily on access and by a periodic sweep, so memory is
//! freed; the next use starts a new epoch. Epochs carry a random salt of this process, so a
//! restarted node never reuses one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::{History, Read, Snapshot};
use crate::broker::{MessageSink, Position};
use crate::error::BrokerError;
use crate::shard;

const SHARDS: usize = 64;

/// In-process history; one node only.
pub struct MemoryHistory {
    inner: Arc<Inner>,
}

struct Inner {
    sink: Arc<dyn MessageSink>,
    size: usize,
    ttl: Duration,
    salt: u64,
    next_epoch: AtomicU64,
    /// Channel states by channel hash: unrelated channels rarely contend.
    shards: Box<[Mutex<Channels>]>,
}

type Channels = HashMap<Box<str>, ChannelState>;

struct ChannelState {
    epoch: Box<str>,
    offset: u64,
    /// The last `size` messages, oldest first.
    kept: VecDeque<(u64, Bytes)>,
    /// Last publish (or creation): the TTL counts from here.
    touched: Instant,
}

impl MemoryHistory {
    /// Keeps `size` messages per channel for `ttl` after the last publish, delivering through
    /// `sink`. Starts the sweep task, which ends when the history is dropped.
    pub fn new(sink: Arc<dyn MessageSink>, size: usize, ttl: Duration) -> Self {
        let inner = Arc::new(Inner {
            sink,
            size: size.max(1),
            ttl,
            salt: rand::random(),
            next_epoch: AtomicU64::new(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        });
        tokio::spawn(sweep(Arc::downgrade(&inner)));
        MemoryHistory { inner }
    }
}

impl Inner {
    fn shard(&self, channel: &str) -> MutexGuard<'_, Channels> {
        self.shards[shard::index(channel, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The channel's live state, created (a new epoch) when absent or expired.
    fn state<'m>(
        &self,
        map: &'m mut Channels,
        channel: &str,
        now: Instant,
    ) -> &'m mut ChannelState {
        if map
            .get(channel)
            .is_some_and(|s| now.duration_since(s.touched) >= self.ttl)
        {
            map.remove(channel);
        }
        map.entry(channel.into()).or_insert_with(|| ChannelState {
            epoch: format!(
                "{:016x}-{}",
                self.salt,
                self.next_epoch.fetch_add(1, Ordering::Relaxed)
            )
            .into(),
            offset: 0,
            kept: VecDeque::new(),
            touched: now,
        })
    }
}

#[async_trait]
impl History for MemoryHistory {
    async fn publish(&self, channel: &str, payload: Bytes) -> Result<u64, BrokerError> {
        let inner = &self.inner;
        let now = Instant::now();
        let mut map = inner.shard(channel);
        let state = inner.state(&mut map, channel, now);
        state.offset += 1;
        state.touched = now;
        if state.kept.len() == inner.size {
            state.kept.pop_front();
        }
        state.kept.push_back((state.offset, payload.clone()));
        let position = Position {
            offset: state.offset,
            epoch: &state.epoch,
        };
        inner.sink.deliver(channel, &payload, Some(position));
        Ok(state.offset)
    }

    async fn read(&self, channel: &str, read: Read<'_>) -> Result<Snapshot, BrokerError> {
        let inner = &self.inner;
        let mut map = inner.shard(channel);
        let state = inner.state(&mut map, channel, Instant::now());
        let messages = match read {
            Read::State => Vec::new(),
            Read::Since { epoch, offset } if *epoch == *state.epoch && offset < state.offset => {
                let first = state.kept.partition_point(|(o, _)| *o <= offset);
                state.kept.range(first..).cloned().collect()
            }
            Read::Since { .. } => Vec::new(),
            Read::Latest { limit } => {
                let first = state.kept.len().saturating_sub(limit);
                state.kept.range(first..).cloned().collect()
            }
        };
        Ok(Snapshot {
            epoch: state.epoch.to_string(),
            offset: state.offset,
            messages,
        })
    }
}

/// Drops expired channels every half TTL (at least every second, at most every minute).
async fn sweep(inner: Weak<Inner>) {
    let every = match inner.upgrade() {
        Some(i) => (i.ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(60)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        for shard in inner.shards.iter() {
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            map.retain(|_, s| now.duration_since(s.touched) < inner.ttl);
            if map.capacity() > 2 * map.len() + 16 {
                map.shrink_to_fit();
            }
        }
    }
}
