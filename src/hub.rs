//! Local fan-out: which connections of this node are subscribed to which channel.
//!
//! The hub is the broker's [`MessageSink`]: every message the broker receives for a channel is
//! encoded once and the same bytes are queued to each local subscriber. The registry is split
//! into shards by channel hash so unrelated channels never contend, and a shard lock is only held
//! while queueing (never while writing to a socket). The hub does not talk to the broker: deciding
//! when to subscribe the node to a channel is [`crate::node::Node`]'s job.
//!
//! With history on, a new subscription starts behind a [`Gate`] (see `gate.rs`): live deliveries
//! for that one connection are held while its subscribe reads the history, then merged by offset.
//! Without a gate (history off, every v1 subscription) delivery is the plain queue push.
//!
//! A payload over `PUBGATE_MAX_MESSAGE_SIZE` (backends publish on Redis directly, past every
//! client-side check) is dropped before it is encoded and counted as `too_big`: one such message
//! would otherwise be copied into a frame and held by every subscriber's queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{MessageSink, Position};
use crate::metrics::Metrics;
use crate::presence::{event_conn_id, is_events_channel};
use crate::shard;
use crate::wire::protocol::{encode_delivery, encode_delivery_at};
use crate::wire::{frame, Budget, Member, Outbox, Push};

pub use self::gate::Gate;

mod gate;

const SHARDS: usize = 64;
/// At most one log line per this period about oversized backend payloads.
const TOO_BIG_LOG_EVERY: Duration = Duration::from_secs(10);

/// One local subscriber of a channel.
#[derive(Debug)]
struct Sub {
    outbox: Arc<Outbox>,
    /// Present for subscriptions made with history on, until they were merged with the history
    /// they read (and a little after, to drop late duplicates).
    gate: Option<Arc<Gate>>,
}

type Subscribers = HashMap<u64, Sub>;
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
        &self.shards[shard::index(channel, SHARDS)]
    }

    /// Whether any local connection is subscribed to `channel`.
    pub fn has_channel(&self, channel: &str) -> bool {
        read(self.shard(channel)).contains_key(channel)
    }

    /// Adds a subscriber; returns false if it was already subscribed.
    pub fn add(&self, channel: &str, outbox: &Arc<Outbox>) -> bool {
        self.insert(channel, outbox, None)
    }

    /// Adds a subscriber whose live deliveries are held by a new gate until
    /// [`Gate::go_live`]; `None` if it was already subscribed (nothing changes).
    pub fn add_gated(
        &self,
        channel: &str,
        outbox: &Arc<Outbox>,
        hold: Budget,
    ) -> Option<Arc<Gate>> {
        let gate = Arc::new(Gate::new(hold));
        self.insert(channel, outbox, Some(gate.clone()))
            .then_some(gate)
    }

    fn insert(&self, channel: &str, outbox: &Arc<Outbox>, gate: Option<Arc<Gate>>) -> bool {
        let mut shard = write(self.shard(channel));
        // Presence-event entries are not subscriptions a client made: they stay out of the gauges.
        let counted = !is_events_channel(channel);
        let subscribers = shard.entry(channel.into()).or_insert_with(|| {
            if counted {
                self.metrics.channels.inc();
            }
            Subscribers::new()
        });
        if subscribers.contains_key(&outbox.key) {
            return false;
        }
        let sub = Sub {
            outbox: outbox.clone(),
            gate,
        };
        subscribers.insert(outbox.key, sub);
        if counted {
            self.metrics.subscriptions.inc();
            self.metrics.presence_members.inc();
        }
        true
    }

    /// Removes a subscriber; returns true if the channel has no local subscriber left.
    pub fn remove(&self, channel: &str, key: u64) -> bool {
        let mut shard = write(self.shard(channel));
        let Some(subscribers) = shard.get_mut(channel) else {
            return true;
        };
        let counted = !is_events_channel(channel);
        if subscribers.remove(&key).is_some() && counted {
            self.metrics.subscriptions.dec();
            self.metrics.presence_members.dec();
        }
        if subscribers.is_empty() {
            shard.remove(channel);
            if counted {
                self.metrics.channels.dec();
            }
            return true;
        }
        false
    }

    /// Every (channel, member) pair of this node, for a presence restore or a drain.
    pub fn members(&self) -> Vec<(String, Member)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (channel, subscribers) in read(shard).iter() {
                if is_events_channel(channel) {
                    continue;
                }
                out.extend(
                    subscribers
                        .values()
                        .map(|s| (channel.to_string(), s.outbox.member.clone())),
                );
            }
        }
        out
    }
}

impl Hub {
    /// Delivers a presence event (its payload is the client frame's JSON, as published by the
    /// presence store) to the connections that asked for `key`'s events, except the member the
    /// event is about: nobody is told about its own join or leave. Encoded once per node and
    /// queued like any delivery, so a join storm meets the same send budget as messages.
    pub fn deliver_event(&self, key: &str, payload: &[u8]) {
        let Some(conn_id) = event_conn_id(payload) else {
            tracing::debug!(key, "presence event ignored: not an event");
            return;
        };
        let shard = read(self.shard(key));
        let Some(subscribers) = shard.get(key) else {
            return;
        };
        let frame = frame::text(payload.len(), |out| out.extend_from_slice(payload));
        let (mut queued, mut dropped) = (0, 0);
        for sub in subscribers.values() {
            if sub.outbox.conn_id() == conn_id {
                continue;
            }
            match sub.outbox.try_push(frame.clone()) {
                Push::Queued => queued += 1,
                Push::Full => dropped += 1,
                Push::Closed => {}
            }
        }
        drop(shard);
        self.count(queued, dropped);
    }

    fn count(&self, queued: u64, dropped: u64) {
        self.metrics.messages_delivered.inc_by(queued);
        if dropped > 0 {
            self.metrics
                .messages_dropped
                .with_label_values(&["slow_consumer"])
                .inc_by(dropped);
        }
    }
}

impl MessageSink for Hub {
    fn deliver(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>) {
        if payload.len() > self.max_payload {
            self.too_big(channel, payload.len());
            return;
        }
        let shard = read(self.shard(channel));
        let Some(subscribers) = shard.get(channel) else {
            return;
        };
        let frame = match position {
            None => encode_delivery(channel, payload),
            Some(p) => encode_delivery_at(channel, payload, p.offset),
        };
        let (mut queued, mut dropped) = (0, 0);
        for sub in subscribers.values() {
            let pushed = match &sub.gate {
                None => sub.outbox.try_push(frame.clone()),
                Some(gate) => gate.pass(&sub.outbox, &frame, position),
            };
            match pushed {
                Push::Queued => queued += 1,
                Push::Full => dropped += 1,
                Push::Closed => {}
            }
        }
        drop(shard);
        self.count(queued, dropped);
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
