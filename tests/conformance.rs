//! One behaviour suite for the two seams, run against every implementation: the Broker suite
//! against `MemoryBroker` and `RedisBroker`, the Presence suite against `MemoryPresence` and
//! `RedisPresence`. Each behaviour is a function taking a fresh fixture; the `suite!` macro turns
//! it into one test per implementation (`memory_broker::...`, `redis_broker::...`).
//!
//! Redis fixtures start their own redis-server (tests/common/redis.rs) and use a random prefix.
//! A few Redis-only behaviours (several nodes on one Redis, expiry, reconnect) follow the suites.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pubgate::broker::{Broker, MemoryBroker, MessageSink, RedisBroker, RedisBrokerOptions};
use pubgate::metrics::Metrics;
use pubgate::presence::{
    events_channel, Heartbeat, Info, Member, MemoryPresence, Presence, RedisPresence,
};
use pubgate::redis_commands::RedisCommands;
use tokio::sync::watch;

use common::rand_u32;
use common::redis::RedisServer;

/// Bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);
/// Per-call timeout given to the Redis implementations.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The presence TTL of the Redis fixture: short, so reaping is observable.
const PRESENCE_TTL: Duration = Duration::from_millis(1500);

fn random_prefix() -> String {
    format!("t{:08x}:", rand_u32())
}

// ---------------------------------------------------------------------------------------------
// A MessageSink that records everything.

#[derive(Default)]
struct Collector {
    messages: Mutex<Vec<(String, Vec<u8>)>>,
    count: watch::Sender<usize>,
}

impl MessageSink for Collector {
    fn deliver(
        &self,
        channel: &str,
        payload: &[u8],
        _position: Option<pubgate::broker::Position<'_>>,
    ) {
        let mut messages = self.messages.lock().unwrap();
        messages.push((channel.to_owned(), payload.to_vec()));
        // Under the lock, so concurrent deliveries never publish a count that goes backwards.
        self.count.send_replace(messages.len());
    }
}

impl Collector {
    fn snapshot(&self) -> Vec<(String, Vec<u8>)> {
        self.messages.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.messages.lock().unwrap().len()
    }

    /// Waits until at least `n` messages were delivered; panics after `wait`.
    async fn wait_for_count(&self, n: usize, wait: Duration) {
        let mut rx = self.count.subscribe();
        if tokio::time::timeout(wait, rx.wait_for(|c| *c >= n))
            .await
            .is_err()
        {
            panic!(
                "expected {n} deliveries within {wait:?}, got {}: {:?}",
                self.len(),
                self.snapshot().iter().take(10).collect::<Vec<_>>()
            );
        }
    }

    /// Waits for a delivery of exactly (`channel`, `payload`); returns everything delivered
    /// before it. Used as a marker: whatever was published before the marker on the same broker
    /// by the same publisher and was going to arrive has arrived by then.
    async fn wait_for_marker(&self, channel: &str, payload: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut rx = self.count.subscribe();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                {
                    let messages = self.messages.lock().unwrap();
                    if let Some(i) = messages
                        .iter()
                        .position(|(c, p)| c == channel && p == payload)
                    {
                        return messages[..i].to_vec();
                    }
                }
                rx.changed().await.expect("collector alive");
            }
        })
        .await;
        match found {
            Ok(before) => before,
            Err(_) => panic!(
                "marker {channel}/{} not delivered within {WAIT:?}; got {:?}",
                String::from_utf8_lossy(payload),
                self.snapshot()
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Broker fixtures.

struct BrokerUnderTest {
    broker: Arc<dyn Broker>,
    sink: Arc<Collector>,
    /// Keeps the Redis server of a Redis fixture alive.
    _redis: Option<RedisServer>,
}

impl BrokerUnderTest {
    /// Publishes a static payload; the broker must accept it.
    async fn publish(&self, channel: &str, payload: &'static [u8]) {
        self.broker
            .publish(channel, Bytes::from_static(payload))
            .await
            .expect("publish accepted");
    }
}

async fn memory_broker() -> BrokerUnderTest {
    let sink = Arc::new(Collector::default());
    let broker = MemoryBroker::new(sink.clone());
    assert!(broker.is_up(), "a memory broker is up from the start");
    BrokerUnderTest {
        broker: Arc::new(broker),
        sink,
        _redis: None,
    }
}

async fn redis_broker() -> BrokerUnderTest {
    let redis = RedisServer::start().await;
    let (broker, sink) = start_redis_broker(&redis.url(), &random_prefix()).await;
    BrokerUnderTest {
        broker,
        sink,
        _redis: Some(redis),
    }
}

/// A RedisBroker on `url` with its own sink; waits (bounded) until it reports up.
async fn start_redis_broker(url: &str, prefix: &str) -> (Arc<dyn Broker>, Arc<Collector>) {
    let broker = start_redis_broker_unchecked(url, prefix).await;
    wait_up(&*broker.0, true, WAIT).await;
    broker
}

async fn start_redis_broker_unchecked(
    url: &str,
    prefix: &str,
) -> (Arc<dyn Broker>, Arc<Collector>) {
    let sink = Arc::new(Collector::default());
    let commands = Arc::new(RedisCommands::new(url, REDIS_TIMEOUT).expect("redis commands"));
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let options = RedisBrokerOptions {
        url: url.to_owned(),
        ca: None,
        prefix: prefix.to_owned(),
        node_id: format!("conf-{:08x}", rand_u32()),
        probe_interval: PROBE_INTERVAL,
        timeout: REDIS_TIMEOUT,
        positioned: false,
    };
    let broker =
        RedisBroker::start(options, commands, sink.clone(), metrics).expect("broker starts");
    (Arc::new(broker), sink)
}

/// Waits until `is_up()` equals `up`; returns how long it took.
async fn wait_up(broker: &dyn Broker, up: bool, wait: Duration) -> Duration {
    let start = Instant::now();
    while broker.is_up() != up {
        assert!(
            start.elapsed() < wait,
            "broker is_up() did not become {up} within {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

async fn shutdown(fixture: BrokerUnderTest) {
    tokio::time::timeout(WAIT, fixture.broker.shutdown())
        .await
        .expect("shutdown returns within the wait");
}

// ---------------------------------------------------------------------------------------------
// Broker behaviours.

async fn subscribe_then_publish_delivers_exact_bytes_in_order(t: BrokerUnderTest) {
    assert!(t.broker.is_up(), "is_up() while running");
    t.broker.subscribe("news").await.expect("subscribe");
    let payloads: Vec<Vec<u8>> = (0..1000)
        .map(|i| format!("{{\"seq\":{i}}}").into_bytes())
        .collect();
    for p in &payloads {
        t.broker
            .publish("news", Bytes::from(p.clone()))
            .await
            .expect("publish accepted");
    }
    t.sink.wait_for_count(1000, Duration::from_secs(20)).await;
    let got = t.sink.snapshot();
    assert_eq!(got.len(), 1000, "no duplicates");
    for (i, (channel, payload)) in got.iter().enumerate() {
        assert_eq!(channel, "news", "the sink sees the channel without prefix");
        assert_eq!(
            payload, &payloads[i],
            "message {i} in publish order with exact bytes"
        );
    }
    assert!(t.broker.is_up());
    shutdown(t).await;
}

/// `subscribe` returns only once the subscription is live: a publish issued right after it
/// returns (on another connection, for Redis) is delivered. Fresh channels, many times.
async fn subscribe_is_live_when_it_returns(t: BrokerUnderTest) {
    const N: usize = 200;
    for i in 0..N {
        let channel = format!("live{i}");
        t.broker.subscribe(&channel).await.unwrap();
        t.broker
            .publish(&channel, Bytes::from(i.to_string()))
            .await
            .unwrap();
    }
    t.sink.wait_for_count(N, Duration::from_secs(10)).await;
    let got: HashSet<(String, Vec<u8>)> = t.sink.snapshot().into_iter().collect();
    for i in 0..N {
        assert!(
            got.contains(&(format!("live{i}"), i.to_string().into_bytes())),
            "the publish right after subscribe {i} returned was delivered"
        );
    }
    shutdown(t).await;
}

async fn payloads_are_opaque_bytes(t: BrokerUnderTest) {
    t.broker.subscribe("bin").await.unwrap();
    let samples: Vec<Vec<u8>> = vec![
        b"hello".to_vec(),
        b"not json {".to_vec(),
        vec![0xff, 0x00, 0xfe, b'\r', b'\n', 0x80],
        "h\u{e9}llo \u{2603}".as_bytes().to_vec(),
        vec![b'x'; 64 * 1024],
    ];
    for s in &samples {
        t.broker
            .publish("bin", Bytes::from(s.clone()))
            .await
            .unwrap();
    }
    t.sink.wait_for_count(samples.len(), WAIT).await;
    let got: Vec<Vec<u8>> = t.sink.snapshot().into_iter().map(|(_, p)| p).collect();
    assert_eq!(got, samples, "payloads arrive byte for byte");
    shutdown(t).await;
}

async fn publish_to_unsubscribed_channel_is_not_received(t: BrokerUnderTest) {
    t.broker.subscribe("a").await.unwrap();
    // Publishing needs no subscription and is accepted.
    t.broker
        .publish("other", Bytes::from_static(b"nobody listens"))
        .await
        .expect("publish to a channel nobody subscribed is accepted");
    t.publish("a.b", b"similar name").await;
    t.publish("a", b"marker").await;
    let before = t.sink.wait_for_marker("a", b"marker").await;
    assert!(
        before.is_empty(),
        "nothing but `a` was delivered: {before:?}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = t.sink.snapshot();
    assert_eq!(
        all,
        vec![("a".to_owned(), b"marker".to_vec())],
        "the sink only ever sees subscribed channels (no probes, no other channels)"
    );
    shutdown(t).await;
}

async fn unsubscribe_stops_delivery(t: BrokerUnderTest) {
    t.broker.subscribe("a").await.unwrap();
    t.broker.subscribe("b").await.unwrap();
    t.publish("a", b"1").await;
    t.sink.wait_for_marker("a", b"1").await;
    t.broker.unsubscribe("a").await.expect("unsubscribe");
    t.publish("a", b"2").await;
    t.publish("b", b"marker").await;
    t.sink.wait_for_marker("b", b"marker").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = t.sink.snapshot();
    assert_eq!(
        got,
        vec![
            ("a".to_owned(), b"1".to_vec()),
            ("b".to_owned(), b"marker".to_vec())
        ],
        "nothing for `a` after unsubscribe returned"
    );
    // Subscribing again makes it live again.
    t.broker.subscribe("a").await.unwrap();
    t.publish("a", b"3").await;
    t.sink.wait_for_marker("a", b"3").await;
    shutdown(t).await;
}

/// The hub counts local subscribers; the broker holds a set: subscribing twice delivers each
/// message once, one unsubscribe ends it, unsubscribing an unknown channel is harmless.
async fn subscribe_twice_and_unsubscribe_semantics(t: BrokerUnderTest) {
    t.broker.subscribe("a").await.unwrap();
    t.broker
        .subscribe("a")
        .await
        .expect("subscribing twice is accepted");
    t.broker.subscribe("m").await.unwrap();
    t.publish("a", b"once").await;
    t.publish("m", b"marker1").await;
    t.sink.wait_for_marker("m", b"marker1").await;
    assert_eq!(
        t.sink.snapshot(),
        vec![
            ("a".to_owned(), b"once".to_vec()),
            ("m".to_owned(), b"marker1".to_vec())
        ],
        "a channel subscribed twice delivers each message once"
    );
    t.broker.unsubscribe("a").await.unwrap();
    t.publish("a", b"after").await;
    t.publish("m", b"marker2").await;
    t.sink.wait_for_marker("m", b"marker2").await;
    assert!(
        !t.sink.snapshot().iter().any(|(_, p)| p == b"after"),
        "one unsubscribe ends a channel subscribed twice"
    );
    t.broker
        .unsubscribe("never-subscribed")
        .await
        .expect("unsubscribing an unknown channel is harmless");
    t.broker
        .unsubscribe("a")
        .await
        .expect("unsubscribing twice is harmless");
    t.publish("m", b"marker3").await;
    t.sink.wait_for_marker("m", b"marker3").await;
    assert!(t.broker.is_up(), "still up after redundant calls");
    shutdown(t).await;
}

async fn many_channels_each_delivered_to_its_own_channel(t: BrokerUnderTest) {
    let channels: Vec<String> = (0..300).map(|i| format!("room:{i}")).collect();
    for c in &channels {
        t.broker.subscribe(c).await.unwrap();
    }
    // Concurrent publishes from many tasks (each channel has one publisher).
    let mut tasks = Vec::new();
    for c in channels.clone() {
        let broker = t.broker.clone();
        tasks.push(tokio::spawn(async move {
            broker
                .publish(&c, Bytes::from(format!("for {c}")))
                .await
                .unwrap();
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    t.sink
        .wait_for_count(channels.len(), Duration::from_secs(10))
        .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = t.sink.snapshot();
    assert_eq!(
        got.len(),
        channels.len(),
        "exactly one delivery per publish"
    );
    let got: HashSet<(String, Vec<u8>)> = got.into_iter().collect();
    for c in &channels {
        assert!(
            got.contains(&(c.clone(), format!("for {c}").into_bytes())),
            "{c} delivered on its own channel"
        );
    }
    shutdown(t).await;
}

macro_rules! suite {
    ($fixture:ident => $($name:ident),* $(,)?) => {
        mod $fixture {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::$fixture().await).await;
                }
            )*
        }
    };
}

suite!(memory_broker =>
    subscribe_then_publish_delivers_exact_bytes_in_order,
    subscribe_is_live_when_it_returns,
    payloads_are_opaque_bytes,
    publish_to_unsubscribed_channel_is_not_received,
    unsubscribe_stops_delivery,
    subscribe_twice_and_unsubscribe_semantics,
    many_channels_each_delivered_to_its_own_channel,
);

suite!(redis_broker =>
    subscribe_then_publish_delivers_exact_bytes_in_order,
    subscribe_is_live_when_it_returns,
    payloads_are_opaque_bytes,
    publish_to_unsubscribed_channel_is_not_received,
    unsubscribe_stops_delivery,
    subscribe_twice_and_unsubscribe_semantics,
    many_channels_each_delivered_to_its_own_channel,
);

// ---------------------------------------------------------------------------------------------
// Presence fixtures: a "node" is one Presence handle; all nodes of a fixture share one store
// (one MemoryPresence, or one Redis with one prefix).

struct PresenceUnderTest {
    memory: Option<Arc<MemoryPresence>>,
    redis: Option<(RedisServer, String)>,
    /// A node whose heartbeat lapses is reaped within this (Redis only).
    ttl: Option<Duration>,
    /// Receives the join/leave events the store publishes (subscribe `__presence:<channel>`).
    events: Arc<dyn Broker>,
    sink: Arc<Collector>,
}

impl PresenceUnderTest {
    /// A presence handle acting as node `id`; every handle of a fixture shares one store.
    fn node(&self, id: &str) -> Arc<dyn Presence> {
        if let Some(memory) = &self.memory {
            return memory.clone();
        }
        let (redis, prefix) = self.redis.as_ref().unwrap();
        let commands =
            Arc::new(RedisCommands::new(&redis.url(), REDIS_TIMEOUT).expect("redis commands"));
        Arc::new(RedisPresence::new(
            commands,
            prefix.clone(),
            self.ttl.unwrap(),
            id.to_owned(),
        ))
    }

    /// Starts receiving `channel`'s presence events.
    async fn watch(&self, channel: &str) {
        self.events
            .subscribe(&events_channel(channel))
            .await
            .expect("events subscribe");
    }

    /// The (type, channel, conn_id) of every event received so far on `channel`.
    fn events_of(&self, channel: &str) -> Vec<(String, String)> {
        let key = events_channel(channel);
        self.sink
            .snapshot()
            .into_iter()
            .filter(|(c, _)| *c == key)
            .map(|(_, payload)| {
                let v: serde_json::Value = serde_json::from_slice(&payload).expect("event JSON");
                assert_eq!(v["channel"], channel, "{v}");
                (
                    v["type"].as_str().unwrap().to_owned(),
                    v["member"]["conn_id"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }

    /// Waits until `channel` has seen `n` events; returns them.
    async fn wait_events(&self, channel: &str, n: usize) -> Vec<(String, String)> {
        let start = Instant::now();
        loop {
            let events = self.events_of(channel);
            if events.len() >= n {
                return events;
            }
            assert!(
                start.elapsed() < WAIT,
                "expected {n} events on {channel}, got {events:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn memory_presence() -> PresenceUnderTest {
    let sink = Arc::new(Collector::default());
    let events: Arc<dyn Broker> = Arc::new(MemoryBroker::new(sink.clone()));
    PresenceUnderTest {
        memory: Some(Arc::new(MemoryPresence::with_events(events.clone()))),
        redis: None,
        ttl: None,
        events,
        sink,
    }
}

async fn redis_presence() -> PresenceUnderTest {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let (events, sink) = start_redis_broker(&redis.url(), &prefix).await;
    PresenceUnderTest {
        memory: None,
        redis: Some((redis, prefix)),
        ttl: Some(PRESENCE_TTL),
        events,
        sink,
    }
}

fn member(conn_id: &str, node: &str, user: Option<&str>) -> Member {
    Member {
        conn_id: conn_id.to_owned(),
        node: node.to_owned(),
        user: user.map(str::to_owned),
        info: None,
    }
}

/// Every member of `channel`, sorted by conn_id, bounded in time; checks the count agrees.
async fn list(p: &dyn Presence, channel: &str) -> Vec<Member> {
    let listing = tokio::time::timeout(WAIT, p.list(channel, 100_000))
        .await
        .expect("list within the wait")
        .expect("list succeeds");
    assert_eq!(listing.count, listing.members.len(), "uncapped: all listed");
    let mut members = listing.members;
    members.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    members
}

fn pairs(channel: &str, members: &[&Member]) -> Vec<(String, Member)> {
    members
        .iter()
        .map(|m| (channel.to_owned(), (*m).clone()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Presence behaviours.

async fn presence_add_list_remove(t: PresenceUnderTest) {
    let p = t.node("n1");
    let a = member("c1", "n1", None);
    let mut b = member("c2", "n1", Some("alice"));
    b.info = Some(Info::from_json(r#"{"name":"Alice","tags":["x"]}"#.into()).unwrap());
    assert!(p.add("room", &a).await.expect("add"), "a new member joins");
    assert!(p.add("room", &b).await.expect("add"));
    assert!(
        !p.add("room", &a).await.expect("re-adding is accepted"),
        "re-adding is not a join"
    );
    assert_eq!(
        list(&*p, "room").await,
        vec![a.clone(), b.clone()],
        "members listed once each, with node, user and info"
    );
    assert_eq!(
        list(&*p, "other").await,
        vec![],
        "other channels are unaffected"
    );
    assert_eq!(p.remove("room", "c1").await.expect("remove"), 1);
    assert_eq!(list(&*p, "room").await, vec![b.clone()]);
    assert_eq!(
        p.remove("room", "c1")
            .await
            .expect("removing twice is harmless"),
        0,
        "no second leave"
    );
    assert_eq!(
        p.remove("room", "unknown")
            .await
            .expect("removing an unknown member is harmless"),
        0
    );
    p.remove("room", "c2").await.unwrap();
    assert_eq!(
        list(&*p, "room").await,
        vec![],
        "empty after removing everyone"
    );
}

async fn presence_remove_all_removes_one_connection_everywhere(t: PresenceUnderTest) {
    let p = t.node("n1");
    let leaving = member("leaving", "n1", Some("bob"));
    let staying = member("staying", "n1", None);
    let channels: Vec<String> = (0..20).map(|i| format!("ch{i}")).collect();
    for c in &channels {
        p.add(c, &leaving).await.unwrap();
        p.add(c, &staying).await.unwrap();
    }
    p.add("solo", &leaving).await.unwrap();
    let mut all = channels.clone();
    all.push("solo".into());
    assert_eq!(p.remove_all("leaving", &all).await.expect("remove_all"), 21);
    for c in &channels {
        assert_eq!(list(&*p, c).await, vec![staying.clone()], "{c}");
    }
    assert_eq!(list(&*p, "solo").await, vec![]);
    p.remove_all("nobody", &all)
        .await
        .expect("remove_all of an unknown connection is harmless");
    p.remove_all("staying", &[])
        .await
        .expect("remove_all with no channels");
    assert_eq!(list(&*p, "ch0").await, vec![staying.clone()]);
}

async fn presence_unknown_channel_is_empty(t: PresenceUnderTest) {
    let p = t.node("n");
    assert_eq!(list(&*p, "never-used").await, vec![]);
    p.add("used", &member("c", "n", None)).await.unwrap();
    assert_eq!(list(&*p, "never-used").await, vec![]);
    assert_eq!(list(&*p, "used:sub").await, vec![], "no prefix matching");
}

async fn presence_members_of_several_nodes(t: PresenceUnderTest) {
    let node_a = t.node("node-a");
    let node_b = t.node("node-b");
    let a1 = member("a1", "node-a", None);
    let a2 = member("a2", "node-a", Some("u1"));
    let b1 = member("b1", "node-b", Some("u1"));
    node_a.add("room", &a1).await.unwrap();
    node_a.add("room", &a2).await.unwrap();
    node_b.add("room", &b1).await.unwrap();
    let expected = vec![a1.clone(), a2.clone(), b1.clone()];
    assert_eq!(list(&*node_a, "room").await, expected, "seen from node a");
    assert_eq!(list(&*node_b, "room").await, expected, "seen from node b");
    node_b.remove("room", "a1").await.unwrap();
    assert_eq!(
        list(&*node_a, "room").await,
        vec![a2.clone(), b1.clone()],
        "removal by conn id is visible everywhere"
    );
    node_a.remove_all("b1", &["room".to_owned()]).await.unwrap();
    assert_eq!(list(&*node_b, "room").await, vec![a2.clone()]);
}

/// `count` is exact; `members` holds at most `max` distinct members; `max` 0 is the count only.
async fn presence_list_caps_members_and_counts_exactly(t: PresenceUnderTest) {
    let p = t.node("n1");
    let all: Vec<Member> = (0..50)
        .map(|i| member(&format!("c{i:02}"), "n1", None))
        .collect();
    let batch: Vec<(String, Member)> = all.iter().map(|m| ("big".to_owned(), m.clone())).collect();
    assert_eq!(p.restore(&batch).await.expect("restore"), 50, "50 joins");
    let capped = p.list("big", 10).await.expect("list");
    assert_eq!(capped.count, 50);
    assert_eq!(capped.members.len(), 10);
    let distinct: HashSet<_> = capped.members.iter().map(|m| &m.conn_id).collect();
    assert_eq!(distinct.len(), 10, "no member twice");
    assert!(capped.members.iter().all(|m| all.contains(m)));
    let exact = p.list("big", 50).await.expect("list");
    assert_eq!((exact.count, exact.members.len()), (50, 50));
    let count_only = p.list("big", 0).await.expect("list");
    assert_eq!((count_only.count, count_only.members.len()), (50, 0));
    let empty = p.list("nothing", 0).await.expect("list");
    assert_eq!((empty.count, empty.members.len()), (0, 0));
}

/// Every change is announced on `__presence:<channel>`: a join when a member becomes present, a
/// leave when it stops being present, never twice, in order per member, with the member's JSON.
async fn presence_events_announce_joins_and_leaves_in_order(t: PresenceUnderTest) {
    t.watch("room").await;
    let p = t.node("n1");
    let a = member("a", "n1", Some("alice"));
    let b = member("b", "n1", None);
    p.add("room", &a).await.unwrap();
    p.add("room", &a).await.unwrap();
    p.add("room", &b).await.unwrap();
    p.add("elsewhere", &b).await.unwrap();
    p.remove("room", "a").await.unwrap();
    p.remove("room", "a").await.unwrap();
    p.add("room", &a).await.unwrap();
    p.remove_all("b", &["room".to_owned(), "elsewhere".to_owned()])
        .await
        .unwrap();
    p.remove_members(&pairs("room", &[&a, &b])).await.unwrap();
    let ev = |k: &str, c: &str| (k.to_owned(), c.to_owned());
    let expected = vec![
        ev("join", "a"),
        ev("join", "b"),
        ev("leave", "a"),
        ev("join", "a"),
        ev("leave", "b"),
        ev("leave", "a"),
    ];
    assert_eq!(t.wait_events("room", expected.len()).await, expected);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(t.events_of("room"), expected, "nothing more");
    assert!(t.events_of("elsewhere").is_empty(), "unwatched channel");
    // The event carries the member as presence shows it.
    let (_, payload) = t
        .sink
        .snapshot()
        .into_iter()
        .find(|(c, _)| *c == events_channel("room"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"type":"join","channel":"room",
            "member":{"conn_id":"a","node":"n1","user":"alice"}})
    );
}

/// restore re-adds members the store lost (Redis restarted); restoring present members keeps
/// one entry each and announces joins only for those that were missing.
async fn presence_restore_re_adds_members(t: PresenceUnderTest) {
    let p = t.node("n1");
    let m1 = member("m1", "n1", None);
    let m2 = member("m2", "n1", Some("bob"));
    p.add("room", &m1).await.unwrap();
    if let Some((redis, _)) = &t.redis {
        let _: () = redis.cmd(&["FLUSHALL"]).await;
        assert_eq!(list(&*p, "room").await, vec![], "Redis lost everything");
    }
    let batch = vec![
        ("room".to_owned(), m1.clone()),
        ("room".to_owned(), m2.clone()),
        ("lobby".to_owned(), m2.clone()),
    ];
    let expected_joins = if t.redis.is_some() { 3 } else { 2 };
    assert_eq!(p.restore(&batch).await.expect("restore"), expected_joins);
    assert_eq!(p.restore(&batch).await.expect("restore twice"), 0);
    assert_eq!(list(&*p, "room").await, vec![m1.clone(), m2.clone()]);
    assert_eq!(list(&*p, "lobby").await, vec![m2.clone()]);
    p.restore(&[]).await.expect("empty restore");
    p.remove_all("m2", &["room".to_owned(), "lobby".to_owned()])
        .await
        .unwrap();
    assert_eq!(list(&*p, "room").await, vec![m1]);
    assert_eq!(list(&*p, "lobby").await, vec![]);
}

/// A live node's heartbeat keeps its members; a node whose heartbeat lapses is reaped by a
/// survivor (its members leave, with leave events) within the TTL, while the survivor's stay.
/// In memory there is no other node: heartbeat reports nothing and reap removes nothing.
async fn presence_dead_node_is_reaped_within_the_ttl(t: PresenceUnderTest) {
    t.watch("room").await;
    let alive = t.node("alive");
    let dying = t.node("dying");
    let a = member("a", "alive", None);
    let mut d1 = member("d1", "dying", None);
    // An info that looks like a node field must not confuse the reaper.
    d1.info = Some(Info::from_json(r#"{"x":{"node":"alive","user":1}}"#.into()).unwrap());
    let mut a2 = member("a2", "alive", None);
    a2.info = Some(Info::from_json(r#"{"x":{"node":"dying","user":1}}"#.into()).unwrap());
    let d2 = member("d2", "dying", Some("u"));
    let first = alive.heartbeat().await.expect("beat");
    dying.heartbeat().await.expect("beat");
    alive.add("room", &a).await.unwrap();
    alive.add("room", &a2).await.unwrap();
    dying.add("room", &d1).await.unwrap();
    dying.add("room", &d2).await.unwrap();
    dying.add("lobby", &d2).await.unwrap();
    let Some(ttl) = t.ttl else {
        assert_eq!(first, Heartbeat::default());
        assert_eq!(alive.reap("dying").await.unwrap(), 0);
        assert_eq!(list(&*alive, "room").await.len(), 4);
        return;
    };
    assert!(first.lost, "the first beat finds the node new");
    let start = Instant::now();
    let mut gone_after = None;
    let mut reaped = 0;
    while start.elapsed() < ttl * 2 {
        let beat = alive.heartbeat().await.expect("beat");
        assert!(!beat.lost, "a node that beats is never lost");
        for dead in &beat.dead {
            assert_eq!(dead, "dying", "only the silent node is dead");
            reaped += alive.reap(dead).await.expect("reap");
        }
        let members = list(&*alive, "room").await;
        assert!(members.contains(&a) && members.contains(&a2), "{members:?}");
        if gone_after.is_none() && members.len() == 2 {
            gone_after = Some(start.elapsed());
        }
        tokio::time::sleep(RedisPresence::beat_interval(ttl)).await;
    }
    let gone_after = gone_after.expect("the dead node's members were reaped");
    println!("dead node's members gone after {gone_after:?} (ttl {ttl:?})");
    assert!(
        gone_after <= ttl,
        "reaped within the TTL of its last beat: {gone_after:?}"
    );
    assert_eq!(reaped, 3, "one leave per (channel, member)");
    assert_eq!(list(&*alive, "lobby").await, vec![]);
    let events = t.events_of("room");
    let leaves: HashSet<_> = events
        .iter()
        .filter(|(k, _)| k == "leave")
        .map(|(_, c)| c.as_str())
        .collect();
    assert_eq!(leaves, HashSet::from(["d1", "d2"]), "{events:?}");
    // Reaping again finds nothing; the dead node is forgotten.
    assert_eq!(alive.reap("dying").await.unwrap(), 0);
    assert!(alive.heartbeat().await.unwrap().dead.is_empty());
    // The dead node comes back: it learns it was lost, and its restore re-announces it.
    let back = dying.heartbeat().await.expect("beat");
    assert!(back.lost && !back.being_reaped, "{back:?}");
    assert_eq!(dying.restore(&pairs("room", &[&d1])).await.unwrap(), 1);
    assert_eq!(list(&*alive, "room").await.len(), 3);
}

suite!(memory_presence =>
    presence_add_list_remove,
    presence_restore_re_adds_members,
    presence_remove_all_removes_one_connection_everywhere,
    presence_unknown_channel_is_empty,
    presence_members_of_several_nodes,
    presence_list_caps_members_and_counts_exactly,
    presence_events_announce_joins_and_leaves_in_order,
    presence_dead_node_is_reaped_within_the_ttl,
);

suite!(redis_presence =>
    presence_add_list_remove,
    presence_restore_re_adds_members,
    presence_remove_all_removes_one_connection_everywhere,
    presence_unknown_channel_is_empty,
    presence_members_of_several_nodes,
    presence_list_caps_members_and_counts_exactly,
    presence_events_announce_joins_and_leaves_in_order,
    presence_dead_node_is_reaped_within_the_ttl,
);

// ---------------------------------------------------------------------------------------------
// Redis-only behaviours of the broker.

/// Two brokers on one Redis and one prefix act as two nodes; another prefix is another system.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_brokers_deliver_across_nodes_and_prefixes_isolate() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let (a, sink_a) = start_redis_broker(&redis.url(), &prefix).await;
    let (b, sink_b) = start_redis_broker(&redis.url(), &prefix).await;
    let (other, sink_other) = start_redis_broker(&redis.url(), &random_prefix()).await;
    a.subscribe("news").await.unwrap();
    b.subscribe("news").await.unwrap();
    other.subscribe("news").await.unwrap();
    assert_eq!(
        redis.numsub(&format!("{prefix}news")).await,
        2,
        "one Redis subscription per node"
    );
    a.publish("news", Bytes::from_static(b"from a"))
        .await
        .unwrap();
    b.publish("news", Bytes::from_static(b"from b"))
        .await
        .unwrap();
    let expected = vec![
        ("news".to_owned(), b"from a".to_vec()),
        ("news".to_owned(), b"from b".to_vec()),
    ];
    sink_a.wait_for_count(2, WAIT).await;
    sink_b.wait_for_count(2, WAIT).await;
    assert_eq!(sink_a.snapshot(), expected);
    assert_eq!(sink_b.snapshot(), expected);

    // A backend PUBLISH on <prefix>news reaches the sinks as channel `news`, raw.
    let receivers = redis.publish(&prefix, "news", "hello").await;
    assert_eq!(receivers, 2);
    sink_a.wait_for_count(3, WAIT).await;
    sink_b.wait_for_count(3, WAIT).await;
    assert_eq!(sink_a.snapshot()[2], ("news".to_owned(), b"hello".to_vec()));

    other
        .publish("news", Bytes::from_static(b"marker"))
        .await
        .unwrap();
    sink_other.wait_for_marker("news", b"marker").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        sink_other.snapshot(),
        vec![("news".to_owned(), b"marker".to_vec())],
        "another prefix sees nothing of this one"
    );
    assert_eq!(sink_a.len(), 3, "this prefix sees nothing of another");

    // The broker's subscription follows subscribe/unsubscribe, and shutdown releases it.
    a.unsubscribe("news").await.unwrap();
    assert_eq!(redis.numsub(&format!("{prefix}news")).await, 1);
    tokio::time::timeout(WAIT, b.shutdown())
        .await
        .expect("shutdown");
    let deadline = Instant::now() + WAIT;
    while redis.numsub(&format!("{prefix}news")).await != 0 {
        assert!(
            Instant::now() < deadline,
            "shutdown releases the pub/sub connection"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.shutdown().await;
    other.shutdown().await;
}

/// No Redis at the URL: the broker starts (it returns at once), reports down, and refuses
/// publishes quickly instead of hanging; once Redis is there it connects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_without_redis_is_down_and_refuses_quickly() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let prefix = random_prefix();
    redis.kill();
    let (broker, sink) = start_redis_broker_unchecked(&url, &prefix).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!broker.is_up(), "no Redis: not up");
    let bound = REDIS_TIMEOUT + Duration::from_secs(2);
    let start = Instant::now();
    let result = tokio::time::timeout(bound, broker.publish("news", Bytes::from_static(b"x")))
        .await
        .expect("publish is bounded by the Redis timeout");
    assert!(result.is_err(), "publish without Redis is an error");
    println!("publish refused after {:?}", start.elapsed());
    let subscribed = tokio::time::timeout(bound, broker.subscribe("news"))
        .await
        .expect("subscribe is bounded by the Redis timeout");

    redis.restart().await;
    let took = wait_up(&*broker, true, Duration::from_secs(15)).await;
    println!("broker up {took:?} after Redis started");
    if subscribed.is_ok() {
        // It accepted the subscription while down, so it must be live now that it is up.
        assert_eq!(redis.publish(&prefix, "news", "after").await, 1);
        sink.wait_for_marker("news", b"after").await;
    } else {
        broker.subscribe("news").await.expect("subscribe once up");
    }
    broker
        .publish("news", Bytes::from_static(b"once up"))
        .await
        .expect("publish once up");
    sink.wait_for_marker("news", b"once up").await;
    broker.shutdown().await;
}

/// Redis killed: is_up turns false; Redis restarted on the same port: is_up turns true and the
/// channels subscribed before deliver again without new subscribe calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_resubscribes_after_redis_restart() {
    let mut redis = RedisServer::start().await;
    let prefix = random_prefix();
    let (broker, sink) = start_redis_broker(&redis.url(), &prefix).await;
    let channels: Vec<String> = (0..50).map(|i| format!("c{i}")).collect();
    for c in &channels {
        broker.subscribe(c).await.unwrap();
    }
    redis.kill();
    let down = wait_up(&*broker, false, Duration::from_secs(3)).await;
    assert!(
        broker
            .publish("c0", Bytes::from_static(b"lost"))
            .await
            .is_err(),
        "publish while Redis is down is refused"
    );
    redis.restart().await;
    let up = wait_up(&*broker, true, Duration::from_secs(15)).await;
    println!("broker down after {down:?}; up {up:?} after the restart");
    for c in &channels {
        assert_eq!(
            redis.numsub(&format!("{prefix}{c}")).await,
            1,
            "{c} resubscribed before is_up() turned true"
        );
    }
    for c in &channels {
        broker
            .publish(c, Bytes::from(format!("again {c}")))
            .await
            .unwrap();
    }
    sink.wait_for_count(channels.len(), WAIT).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = sink.snapshot();
    assert_eq!(got.len(), channels.len(), "{got:?}");
    assert!(
        !got.iter().any(|(_, p)| p == b"lost"),
        "a refused publish is never delivered"
    );
    broker.shutdown().await;
}
