//! Local fan-out: which connections of this node are subscribed to which channel.
//!
//! The hub is the broker's [`MessageSink`]: every message the broker receives for a channel is
//! encoded once and the same bytes are queued to each local subscriber. The registry is split
//! into shards by channel hash so unrelated channels never contend, and a shard lock is only held
//! while queueing (never while writing to a socket). The hub does not talk to the broker: deciding
//! when to subscribe the node to a channel is [`crate::node::Node`]'s job.
//!
//! A payload over `PUBGATE_MAX_MESSAGE_SIZE` (backends publish on Redis directly, past every
//! client-side check) is dropped before it is encoded and counted as `too_big`: one such message
//! would otherwise be copied into a frame and held by every subscriber's queue.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::MessageSink;
use crate::conn::{Outbox, Push};
use crate::metrics::Metrics;
use crate::presence::Member;
use crate::protocol::encode_delivery;

const SHARDS: usize = 64;
/// At most one log line per this period about oversized backend payloads.
const TOO_BIG_LOG_EVERY: Duration = Duration::from_secs(10);

type Subscribers = HashMap<u64, Arc<Outbox>>;
type Shard = RwLock<HashMap<Box<str>, Subscribers>>;

/// Channel -> local subscribers.
#[derive(Debug)]
pub struct Hub {
    shards: Box<[Shard]>,
    metrics: Arc<Metrics>,
    /// Largest payload delivered (`PUBGATE_MAX_MESSAGE_SIZE`).
    max_payload: usize,
    /// Unix seconds of the last oversized-payload log line (rate limit).
    too_big_logged: AtomicU64,
}

/// Shard index of a channel; also used for the node's per-channel locks.
pub fn channel_slot(channel: &str, slots: usize) -> usize {
    (BuildHasherDefault::<DefaultHasher>::default().hash_one(channel) as usize) % slots
}

impl Hub {
    /// A hub that delivers payloads of any size (tests); nodes use [`Hub::with_max_payload`].
    #[cfg(test)]
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self::with_max_payload(metrics, usize::MAX)
    }

    /// A hub that drops payloads longer than `max_payload` bytes instead of delivering them.
    pub fn with_max_payload(metrics: Arc<Metrics>, max_payload: usize) -> Self {
        Hub {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            metrics,
            max_payload,
            too_big_logged: AtomicU64::new(0),
        }
    }

    /// Counts (and now and then logs) a payload too big to deliver.
    fn too_big(&self, channel: &str, len: usize) {
        self.metrics
            .messages_dropped
            .with_label_values(&["too_big"])
            .inc();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.too_big_logged.load(Ordering::Relaxed);
        if now >= last + TOO_BIG_LOG_EVERY.as_secs()
            && self
                .too_big_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                channel,
                bytes = len,
                max = self.max_payload,
                "dropped a broker payload over PUBGATE_MAX_MESSAGE_SIZE (logged at most every 10 s; \
                 see pubgate_messages_dropped_total{{reason=\"too_big\"}})"
            );
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[channel_slot(channel, SHARDS)]
    }

    /// Whether any local connection is subscribed to `channel`.
    pub fn has_channel(&self, channel: &str) -> bool {
        read(self.shard(channel)).contains_key(channel)
    }

    /// Adds a subscriber; returns false if it was already subscribed.
    pub fn add(&self, channel: &str, outbox: &Arc<Outbox>) -> bool {
        let mut shard = write(self.shard(channel));
        let subscribers = shard.entry(channel.into()).or_insert_with(|| {
            self.metrics.channels.inc();
            Subscribers::new()
        });
        let added = subscribers.insert(outbox.key, outbox.clone()).is_none();
        if added {
            self.metrics.subscriptions.inc();
        }
        added
    }

    /// Removes a subscriber; returns true if the channel has no local subscriber left.
    pub fn remove(&self, channel: &str, key: u64) -> bool {
        let mut shard = write(self.shard(channel));
        let Some(subscribers) = shard.get_mut(channel) else {
            return true;
        };
        if subscribers.remove(&key).is_some() {
            self.metrics.subscriptions.dec();
        }
        if subscribers.is_empty() {
            shard.remove(channel);
            self.metrics.channels.dec();
            return true;
        }
        false
    }

    /// Every (channel, member) pair of this node, for the presence refresh.
    pub fn members(&self) -> Vec<(String, Member)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (channel, subscribers) in read(shard).iter() {
                out.extend(
                    subscribers
                        .values()
                        .map(|o| (channel.to_string(), o.member.clone())),
                );
            }
        }
        out
    }
}

impl MessageSink for Hub {
    fn deliver(&self, channel: &str, payload: &[u8]) {
        if payload.len() > self.max_payload {
            self.too_big(channel, payload.len());
            return;
        }
        let shard = read(self.shard(channel));
        let Some(subscribers) = shard.get(channel) else {
            return;
        };
        let frame = encode_delivery(channel, payload);
        let (mut queued, mut dropped) = (0, 0);
        for outbox in subscribers.values() {
            match outbox.try_push(frame.clone()) {
                Push::Queued => queued += 1,
                Push::Full => dropped += 1,
                Push::Closed => {}
            }
        }
        drop(shard);
        self.metrics.messages_delivered.inc_by(queued);
        if dropped > 0 {
            self.metrics
                .messages_dropped
                .with_label_values(&["slow_consumer"])
                .inc_by(dropped);
        }
    }
}

// A poisoned lock means a panic while holding it; the maps stay consistent (every update is a
// single insert or remove), so keep serving.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
