//! Local fan-out: which connections of this node are subscribed to which channel.
//!
//! The hub is where the broker's messages end: every message for a channel is encoded once and
//! the same bytes are queued to each local subscriber. With Redis the broker's reader does not
//! call it directly: it hands each message to a fan-out worker ([`FanOut`]), so a hot channel
//! never delays the reader. The hub does not talk to the broker: deciding when to subscribe the
//! node to a channel is [`crate::node::Node`]'s job.
//!
//! The registry is split into shards by channel hash so unrelated channels never contend. A
//! channel's subscribers are also kept as an immutable list (copy-on-write, rebuilt lazily on the
//! first delivery after a change): a delivery holds the shard lock only to clone that list's
//! `Arc`, never during the fan-out, so subscribing and unsubscribing never wait for a fan-out and
//! a steady channel costs no copy at all. A subscription removed while a fan-out already holds
//! the old list is skipped through its `live` flag, so nothing is queued after `unsubscribed`.
//!
//! With history on, a new subscription starts behind a [`Gate`] (see `gate.rs`): live deliveries
//! for that one connection are held while its subscribe reads the history, then merged by offset.
//! Without a gate (history off, every v1 subscription) delivery is the plain queue push.
//!
//! A payload over `PUBGATE_MAX_MESSAGE_SIZE` (backends publish on Redis directly, past every
//! client-side check) is dropped before it is encoded and counted as `too_big`: one such message
//! would otherwise be copied into a frame and held by every subscriber's queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{MessageSink, Position};
use crate::metrics::Metrics;
use crate::presence::{event_conn_id, is_events_channel};
use crate::shard;
use crate::wire::protocol::{encode_delivery, encode_delivery_at};
use crate::wire::{frame, Budget, Member, Outbox, Push};

pub use self::fanout::{FanOut, FanOutOptions};
pub use self::gate::Gate;

mod fanout;
mod gate;

const SHARDS: usize = 64;
/// At most one log line per this period about oversized backend payloads.
const TOO_BIG_LOG_EVERY: Duration = Duration::from_secs(10);

/// One local subscription to a channel.
#[derive(Debug)]
struct Sub {
    outbox: Arc<Outbox>,
    /// Present for subscriptions made with history on, until they were merged with the history
    /// they read (and a little after, to drop late duplicates).
    gate: Option<Arc<Gate>>,
    /// Cleared when the subscription is removed: a fan-out still holding an older list skips it.
    live: AtomicBool,
}

/// The subscribers of one channel.
#[derive(Debug, Default)]
struct Channel {
    by_key: HashMap<u64, Arc<Sub>>,
    /// `by_key` as a list for fan-out; `None` after a change until the next delivery rebuilds it.
    list: Option<Arc<[Arc<Sub>]>>,
}

impl Channel {
    /// The current list, rebuilt if a subscription came or went since the last delivery.
    fn list(&mut self) -> Arc<[Arc<Sub>]> {
        let by_key = &self.by_key;
        self.list
            .get_or_insert_with(|| by_key.values().cloned().collect())
            .clone()
    }
}

type Shard = Mutex<HashMap<Box<str>, Channel>>;

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
        lock(self.shard(channel)).contains_key(channel)
    }

    /// The subscribers of `channel` now, without holding any lock afterwards.
    fn subscribers(&self, channel: &str) -> Option<Arc<[Arc<Sub>]>> {
        lock(self.shard(channel))
            .get_mut(channel)
            .map(Channel::list)
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
        let mut shard = lock(self.shard(channel));
        // Presence-event entries are not subscriptions a client made: they stay out of the gauges.
        let counted = !is_events_channel(channel);
        let subscribers = shard.entry(channel.into()).or_insert_with(|| {
            if counted {
                self.metrics.channels.inc();
            }
            Channel::default()
        });
        if subscribers.by_key.contains_key(&outbox.key) {
            return false;
        }
        let sub = Sub {
            outbox: outbox.clone(),
            gate,
            live: AtomicBool::new(true),
        };
        subscribers.by_key.insert(outbox.key, Arc::new(sub));
        subscribers.list = None;
        if counted {
            self.metrics.subscriptions.inc();
            self.metrics.presence_members.inc();
        }
        true
    }

    /// Removes a subscriber; returns true if the channel has no local subscriber left.
    pub fn remove(&self, channel: &str, key: u64) -> bool {
        let mut shard = lock(self.shard(channel));
        let Some(subscribers) = shard.get_mut(channel) else {
            return true;
        };
        let counted = !is_events_channel(channel);
        if let Some(sub) = subscribers.by_key.remove(&key) {
            // Cleared, then fenced: a fan-out holding the old list queues nothing from now on,
            // so the caller's reply (`unsubscribed`) is the subscription's last frame.
            sub.live.store(false, Ordering::Relaxed);
            sub.outbox.fence();
            subscribers.list = None;
            if counted {
                self.metrics.subscriptions.dec();
                self.metrics.presence_members.dec();
            }
        }
        if subscribers.by_key.is_empty() {
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
            for (channel, subscribers) in lock(shard).iter() {
                if is_events_channel(channel) {
                    continue;
                }
                out.extend(
                    subscribers
                        .by_key
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
    fn deliver_event(&self, key: &str, payload: &[u8]) {
        let Some(conn_id) = event_conn_id(payload) else {
            tracing::debug!(key, "presence event ignored: not an event");
            return;
        };
        let Some(subscribers) = self.subscribers(key) else {
            return;
        };
        let frame = frame::text(payload.len(), |out| out.extend_from_slice(payload));
        let (mut queued, mut dropped) = (0, 0);
        for sub in subscribers.iter() {
            if sub.outbox.conn_id() == conn_id {
                continue;
            }
            match sub.outbox.try_push_live(&sub.live, frame.clone()) {
                Push::Queued => queued += 1,
                Push::Full => dropped += 1,
                Push::Closed => {}
            }
        }
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
        if is_events_channel(channel) {
            self.deliver_event(channel, payload);
        } else {
            self.deliver_message(channel, payload, position);
        }
    }
}

impl Hub {
    /// One message of a channel to its local subscribers: encoded once, the same bytes queued to
    /// each.
    fn deliver_message(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>) {
        if payload.len() > self.max_payload {
            self.too_big(channel, payload.len());
            return;
        }
        let Some(subscribers) = self.subscribers(channel) else {
            return;
        };
        let frame = match position {
            None => encode_delivery(channel, payload),
            Some(p) => encode_delivery_at(channel, payload, p.offset),
        };
        let (mut queued, mut dropped) = (0, 0);
        for sub in subscribers.iter() {
            let pushed = match &sub.gate {
                None => sub.outbox.try_push_live(&sub.live, frame.clone()),
                Some(gate) => gate.pass(&sub.outbox, &sub.live, &frame, position),
            };
            match pushed {
                Push::Queued => queued += 1,
                Push::Full => dropped += 1,
                Push::Closed => {}
            }
        }
        self.count(queued, dropped);
    }
}

// A poisoned lock means a panic while holding it; the maps stay consistent (every update is a
// single insert or remove), so keep serving.
fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use bytes::Bytes;

    use super::*;
    use crate::wire::{Budget, CloseReason};

    fn outbox(key: u64) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("c{key}"),
            node: "n".into(),
            user: None,
            info: None,
        };
        let budget = Budget {
            frames: 100,
            bytes: 1 << 20,
        };
        Arc::new(Outbox::new(key, member, budget))
    }

    fn queued(outbox: &Outbox) -> usize {
        let mut frames = VecDeque::new();
        outbox.take(&mut frames);
        frames.len()
    }

    fn with_budget(key: u64, frames: usize, bytes: usize) -> Arc<Outbox> {
        let member = outbox(key).member.clone();
        Arc::new(Outbox::new(key, member, Budget { frames, bytes }))
    }

    /// The payloads of the frames queued for `outbox` (taken, as the writer would), in order.
    fn texts(outbox: &Outbox) -> Vec<String> {
        let mut frames = VecDeque::new();
        outbox.take(&mut frames);
        frames
            .iter()
            .map(|f| {
                // Test frames are short unmasked text frames: a 2-byte header.
                assert_eq!((f[0], f[1] < 126), (0x81, true), "{f:?}");
                String::from_utf8(f[2..].to_vec()).unwrap()
            })
            .collect()
    }

    fn message(channel: &str, n: u64) -> String {
        format!(r#"{{"type":"message","channel":"{channel}","data":{n}}}"#)
    }

    fn dropped(metrics: &Metrics, reason: &str) -> u64 {
        metrics.messages_dropped.with_label_values(&[reason]).get()
    }

    #[test]
    fn a_delivery_reaches_every_subscriber_once() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (a, b) = (outbox(1), outbox(2));
        assert!(hub.add("ch", &a) && hub.add("ch", &b));
        assert!(!hub.add("ch", &a), "already subscribed");
        hub.deliver("ch", b"{}", None);
        hub.deliver("other", b"{}", None);
        assert_eq!((queued(&a), queued(&b)), (1, 1));
    }

    #[test]
    fn the_list_is_rebuilt_after_a_change_and_shared_until_then() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (a, b) = (outbox(1), outbox(2));
        hub.add("ch", &a);
        let first = hub.subscribers("ch").unwrap();
        assert!(Arc::ptr_eq(&first, &hub.subscribers("ch").unwrap()));
        hub.add("ch", &b);
        let second = hub.subscribers("ch").unwrap();
        assert_eq!((first.len(), second.len()), (1, 2));
        assert!(!hub.remove("ch", 1) && hub.remove("ch", 2));
        assert!(hub.subscribers("ch").is_none(), "an empty channel is gone");
    }

    /// A fan-out that took the list before an unsubscribe queues nothing for it afterwards, so
    /// the `unsubscribed` reply queued after `remove` is the subscription's last frame.
    #[test]
    fn a_removed_subscription_gets_nothing_from_an_older_list() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (a, b) = (outbox(1), outbox(2));
        hub.add("ch", &a);
        hub.add("ch", &b);
        let in_flight = hub.subscribers("ch").unwrap();
        hub.remove("ch", 1);
        let frame = Bytes::from_static(b"x");
        let pushed: Vec<Push> = in_flight
            .iter()
            .map(|sub| sub.outbox.try_push_live(&sub.live, frame.clone()))
            .collect();
        assert_eq!(pushed.iter().filter(|p| **p == Push::Queued).count(), 1);
        assert_eq!((queued(&a), queued(&b)), (0, 1));
    }

    #[test]
    fn subscribing_and_unsubscribing_keep_the_gauges_and_the_channel_exact() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone());
        let (a, b) = (outbox(1), outbox(2));
        let gauges = || {
            (
                metrics.subscriptions.get(),
                metrics.channels.get(),
                metrics.presence_members.get(),
            )
        };
        assert!(hub.add("x", &a) && hub.add("x", &b) && hub.add("y", &a));
        assert!(!hub.add("x", &a));
        // Presence-event entries are not client subscriptions: out of the gauges.
        assert!(hub.add("__presence:x", &b));
        assert_eq!(gauges(), (3, 2, 3));
        assert!(!hub.remove("x", 1), "b is still subscribed to x");
        assert!(hub.has_channel("x"));
        assert!(!hub.remove("x", 1), "a second remove changes nothing");
        assert_eq!(gauges(), (2, 2, 2));
        assert!(hub.remove("x", 2) && hub.remove("y", 1));
        assert!(hub.remove("__presence:x", 2));
        assert!(!hub.has_channel("x") && !hub.has_channel("y"));
        assert_eq!(gauges(), (0, 0, 0));
        hub.deliver("x", b"1", None);
        assert_eq!((queued(&a), queued(&b)), (0, 0));
        assert_eq!(metrics.messages_delivered.get(), 0);
    }

    /// The copy-on-write list is rebuilt after each change: a delivery after an unsubscribe
    /// does not reach the removed subscription, one after a subscribe reaches the new one.
    #[test]
    fn deliveries_follow_the_subscriptions_of_the_moment() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone());
        let (a, b, c) = (outbox(1), outbox(2), outbox(3));
        hub.add("ch", &a);
        hub.add("ch", &b);
        hub.deliver("ch", b"1", None);
        let before = hub.subscribers("ch").unwrap();
        hub.remove("ch", 1);
        let after = hub.subscribers("ch").unwrap();
        assert!(!Arc::ptr_eq(&before, &after));
        assert_eq!((before.len(), after.len()), (2, 1));
        hub.deliver("ch", b"2", None);
        hub.add("ch", &c);
        hub.deliver("ch", b"3", None);
        assert_eq!(texts(&a), [message("ch", 1)]);
        assert_eq!(
            texts(&b),
            [message("ch", 1), message("ch", 2), message("ch", 3)]
        );
        assert_eq!(texts(&c), [message("ch", 3)]);
        assert_eq!(metrics.messages_delivered.get(), 5);
    }

    /// Fan-out runs on other threads while the connection unsubscribes: whatever the
    /// interleaving, once `remove` returned, the reply queued after it (`unsubscribed`) is the
    /// subscription's last frame.
    #[test]
    fn nothing_is_queued_after_unsubscribed_while_fan_out_runs() {
        let hub = Arc::new(Hub::new(Arc::new(Metrics::new().unwrap())));
        for round in 0..50u64 {
            // Room enough that nobody overflows while nothing is taken.
            let (a, b) = (
                with_budget(1, 1 << 30, 1 << 40),
                with_budget(2, 1 << 30, 1 << 40),
            );
            hub.add("ch", &a);
            hub.add("ch", &b);
            let stop = Arc::new(AtomicBool::new(false));
            let fan_outs: Vec<_> = (0..2)
                .map(|_| {
                    let (hub, stop) = (hub.clone(), stop.clone());
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            hub.deliver("ch", b"1", None);
                        }
                    })
                })
                .collect();
            // Let a few deliveries through first (every round, a different point).
            while a.queued_bytes() < (round % 7 + 1) as usize * 10 {
                std::thread::yield_now();
            }
            hub.remove("ch", 1);
            assert_eq!(
                a.try_push(Bytes::from_static(b"\x81\x0cunsubscribed")),
                Push::Queued
            );
            // b keeps receiving after a left.
            let b_then = b.queued_bytes();
            while b.queued_bytes() == b_then {
                std::thread::yield_now();
            }
            stop.store(true, Ordering::Relaxed);
            fan_outs.into_iter().for_each(|t| t.join().unwrap());
            let frames = texts(&a);
            assert_eq!(frames.last().map(String::as_str), Some("unsubscribed"));
            assert!(frames[..frames.len() - 1]
                .iter()
                .all(|f| *f == message("ch", 1)));
            hub.remove("ch", 2);
        }
    }

    #[test]
    fn each_channel_arrives_in_delivery_order() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (a, b) = (outbox(1), outbox(2));
        hub.add("x", &a);
        hub.add("y", &a);
        hub.add("x", &b);
        for n in 0..50 {
            hub.deliver("x", n.to_string().as_bytes(), None);
            hub.deliver("y", (100 + n).to_string().as_bytes(), None);
        }
        let of = |frames: &[String], channel: &str| -> Vec<String> {
            frames
                .iter()
                .filter(|f| f.contains(&format!(r#""channel":"{channel}""#)))
                .cloned()
                .collect()
        };
        let (a, b) = (texts(&a), texts(&b));
        let x: Vec<String> = (0..50).map(|n| message("x", n)).collect();
        let y: Vec<String> = (100..150).map(|n| message("y", n)).collect();
        assert_eq!((of(&a, "x"), of(&a, "y")), (x.clone(), y));
        assert_eq!(b, x);
    }

    /// A subscriber whose queue is full is closed as a slow consumer and counted once; the
    /// others get every message.
    #[test]
    fn a_full_queue_closes_only_that_connection() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone());
        let slow = with_budget(1, 3, 1 << 20);
        let fast = with_budget(2, 3, 1 << 20);
        hub.add("ch", &slow);
        hub.add("ch", &fast);
        let mut got = Vec::new();
        for n in 0..10 {
            hub.deliver("ch", n.to_string().as_bytes(), None);
            // The fast one's writer keeps up.
            got.extend(texts(&fast));
        }
        assert_eq!(got, (0..10).map(|n| message("ch", n)).collect::<Vec<_>>());
        assert_eq!(slow.close_reason(), CloseReason::SlowConsumer);
        assert_eq!(
            CloseReason::SlowConsumer.frame(),
            Some((1008, "slow consumer"))
        );
        // What it had queued before the overflow stays (its writer sends it before the close).
        assert_eq!(
            texts(&slow),
            (0..3).map(|n| message("ch", n)).collect::<Vec<_>>()
        );
        assert!(!fast.is_closing());
        assert_eq!(dropped(&metrics, "slow_consumer"), 1);
        assert_eq!(metrics.messages_delivered.get(), 10 + 3);
    }

    #[test]
    fn the_byte_budget_overflows_like_the_frame_count() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::new(metrics.clone());
        let frame_len = encode_delivery("ch", b"1").len();
        let slow = with_budget(1, 100, frame_len * 5 / 2);
        hub.add("ch", &slow);
        for n in 1..=3 {
            hub.deliver("ch", n.to_string().as_bytes(), None);
        }
        assert_eq!(slow.close_reason(), CloseReason::SlowConsumer);
        assert_eq!(slow.queued_bytes(), 2 * frame_len);
        assert_eq!(dropped(&metrics, "slow_consumer"), 1);
    }

    #[test]
    fn a_payload_over_the_limit_is_dropped_before_fan_out() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Hub::with_max_payload(metrics.clone(), 4);
        let a = outbox(1);
        hub.add("ch", &a);
        hub.deliver("ch", b"12345", None);
        hub.deliver("ch", b"1234", None);
        assert_eq!(texts(&a), [message("ch", 1234)]);
        assert_eq!(dropped(&metrics, "too_big"), 1);
    }

    /// A gated (history) subscription holds its live messages until it goes live while the
    /// other subscribers of the channel get them at once; both see one order.
    #[test]
    fn a_gated_subscription_does_not_hold_up_the_others() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (plain, gated) = (outbox(1), outbox(2));
        hub.add("ch", &plain);
        let gate = hub.add_gated("ch", &gated, gated_budget()).unwrap();
        assert!(hub.add_gated("ch", &gated, gated_budget()).is_none());
        let at = |offset| Some(Position { offset, epoch: "e" });
        for n in 1..=4 {
            hub.deliver("ch", n.to_string().as_bytes(), at(n));
        }
        assert_eq!(texts(&plain).len(), 4);
        assert_eq!(queued(&gated), 0);
        // The replay covered up to 2.
        gate.go_live(&gated, "e", 2);
        hub.deliver("ch", b"5", at(5));
        let with_offset = |n| {
            let m = message("ch", n);
            format!(r#"{},"offset":{n}}}"#, &m[..m.len() - 1])
        };
        assert_eq!(texts(&gated), [3, 4, 5].map(with_offset));
        assert_eq!(texts(&plain), [with_offset(5)]);
    }

    fn gated_budget() -> Budget {
        Budget {
            frames: 10,
            bytes: 1 << 20,
        }
    }

    #[test]
    fn a_presence_event_skips_the_member_it_is_about() {
        let hub = Hub::new(Arc::new(Metrics::new().unwrap()));
        let (a, b) = (outbox(1), outbox(2));
        hub.add("__presence:ch", &a);
        hub.add("__presence:ch", &b);
        let event = crate::presence::event_json(
            crate::presence::EventKind::Join,
            "ch",
            &a.member.to_json(),
        );
        hub.deliver("__presence:ch", event.as_bytes(), None);
        assert_eq!((texts(&a), texts(&b)), (vec![], vec![event]));
    }
}
