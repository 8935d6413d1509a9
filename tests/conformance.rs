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
use pubgate::presence::{Member, MemoryPresence, Presence, RedisPresence};
use pubgate::redis_commands::RedisCommands;
use tokio::sync::watch;

use common::rand_u32;
use common::redis::RedisServer;

/// Bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);
/// Per-call timeout given to the Redis implementations.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
const PROBE_INTERVAL: Duration = Duration::from_millis(500);
/// The presence TTL of the Redis fixture: short, so expiry is observable.
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
        _position: Option<pubgate::history::Position<'_>>,
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
    /// Members not refreshed expire after this (Redis only).
    ttl: Option<Duration>,
}

impl PresenceUnderTest {
    fn node(&self) -> Arc<dyn Presence> {
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
        ))
    }
}

async fn memory_presence() -> PresenceUnderTest {
    PresenceUnderTest {
        memory: Some(Arc::new(MemoryPresence::new())),
        redis: None,
        ttl: None,
    }
}

async fn redis_presence() -> PresenceUnderTest {
    PresenceUnderTest {
        memory: None,
        redis: Some((RedisServer::start().await, random_prefix())),
        ttl: Some(PRESENCE_TTL),
    }
}

fn member(conn_id: &str, node: &str, user: Option<&str>) -> Member {
    Member {
        conn_id: conn_id.to_owned(),
        node: node.to_owned(),
        user: user.map(str::to_owned),
    }
}

/// `list`, sorted by conn_id, bounded.
async fn list(p: &dyn Presence, channel: &str) -> Vec<Member> {
    let mut members = tokio::time::timeout(WAIT, p.list(channel))
        .await
        .expect("list within the wait")
        .expect("list succeeds");
    members.sort_by(|a, b| a.conn_id.cmp(&b.conn_id));
    members
}

// ---------------------------------------------------------------------------------------------
// Presence behaviours.

async fn presence_add_list_remove(t: PresenceUnderTest) {
    let p = t.node();
    let a = member("c1", "n1", None);
    let b = member("c2", "n1", Some("alice"));
    p.add("room", &a).await.expect("add");
    p.add("room", &b).await.expect("add");
    p.add("room", &a).await.expect("re-adding is accepted");
    assert_eq!(
        list(&*p, "room").await,
        vec![a.clone(), b.clone()],
        "members listed once each, with node and user"
    );
    assert_eq!(
        list(&*p, "other").await,
        vec![],
        "other channels are unaffected"
    );
    p.remove("room", "c1").await.expect("remove");
    assert_eq!(list(&*p, "room").await, vec![b.clone()]);
    p.remove("room", "c1")
        .await
        .expect("removing twice is harmless");
    p.remove("room", "unknown")
        .await
        .expect("removing an unknown member is harmless");
    p.remove("room", "c2").await.unwrap();
    assert_eq!(
        list(&*p, "room").await,
        vec![],
        "empty after removing everyone"
    );
}

async fn presence_remove_all_removes_one_connection_everywhere(t: PresenceUnderTest) {
    let p = t.node();
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
    p.remove_all("leaving", &all).await.expect("remove_all");
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
    let p = t.node();
    assert_eq!(list(&*p, "never-used").await, vec![]);
    p.add("used", &member("c", "n", None)).await.unwrap();
    assert_eq!(list(&*p, "never-used").await, vec![]);
    assert_eq!(list(&*p, "used:sub").await, vec![], "no prefix matching");
}

async fn presence_members_of_several_nodes(t: PresenceUnderTest) {
    let node_a = t.node();
    let node_b = t.node();
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

/// refresh keeps members alive; with a TTL (Redis), a member that is not refreshed expires
/// within the TTL while the refreshed ones stay.
async fn presence_refresh_keeps_members_and_unrefreshed_expire(t: PresenceUnderTest) {
    let node_a = t.node();
    let node_b = t.node();
    let kept1 = member("kept1", "node-a", None);
    let kept2 = member("kept2", "node-a", Some("u"));
    let kept_elsewhere = member("kept3", "node-a", None);
    let dropped = member("dropped", "node-b", None);
    node_a.add("room", &kept1).await.unwrap();
    node_a.add("room", &kept2).await.unwrap();
    node_a.add("lobby", &kept_elsewhere).await.unwrap();
    node_b.add("room", &dropped).await.unwrap();
    let batch = vec![
        ("room".to_owned(), kept1.clone()),
        ("room".to_owned(), kept2.clone()),
        ("lobby".to_owned(), kept_elsewhere.clone()),
    ];
    node_a.refresh(&batch).await.expect("refresh");
    assert_eq!(
        list(&*node_a, "room").await,
        vec![dropped.clone(), kept1.clone(), kept2.clone()]
    );

    let Some(ttl) = t.ttl else {
        // No expiry in memory: refresh changes nothing visible.
        node_a.refresh(&batch).await.unwrap();
        node_a.refresh(&[]).await.expect("empty refresh");
        assert_eq!(list(&*node_a, "lobby").await, vec![kept_elsewhere]);
        return;
    };

    // Node a refreshes its members every ttl/4 for 3 TTLs; node b never refreshes.
    let start = Instant::now();
    let mut dropped_gone_after = None;
    while start.elapsed() < ttl * 3 {
        node_a.refresh(&batch).await.expect("refresh");
        let members = list(&*node_b, "room").await;
        assert!(
            members.contains(&kept1) && members.contains(&kept2),
            "refreshed members stay past the TTL (at {:?}): {members:?}",
            start.elapsed()
        );
        if dropped_gone_after.is_none() && !members.contains(&dropped) {
            dropped_gone_after = Some(start.elapsed());
        }
        if dropped_gone_after.is_some() {
            assert!(
                !members.contains(&dropped),
                "an expired member does not come back"
            );
        }
        tokio::time::sleep(ttl / 4).await;
    }
    let gone_after = dropped_gone_after.expect("the un-refreshed member expired");
    println!("un-refreshed member gone after {gone_after:?} (ttl {ttl:?})");
    assert!(
        gone_after <= ttl + Duration::from_millis(500),
        "an un-refreshed member expires within the TTL (+ slack): {gone_after:?}"
    );
    assert_eq!(
        list(&*node_b, "lobby").await,
        vec![kept_elsewhere.clone()],
        "refresh covers every channel of the batch"
    );

    // Once node a stops refreshing, everything expires, and nothing is left behind in Redis.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert_eq!(list(&*node_b, "room").await, vec![]);
    assert_eq!(list(&*node_b, "lobby").await, vec![]);
    let (redis, prefix) = t.redis.as_ref().unwrap();
    let deadline = Instant::now() + ttl * 2 + Duration::from_secs(1);
    loop {
        let leftover: Vec<String> = redis
            .keys(&format!("{prefix}*"))
            .await
            .into_iter()
            .filter(|k| k.contains("room") || k.contains("lobby"))
            .collect();
        if leftover.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence keys of expired members are cleaned or expire: {leftover:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A refresh only keeps members that are still stored: one removed while the refresh batch was
/// in flight does not come back as a ghost.
async fn presence_refresh_does_not_bring_back_removed_members(t: PresenceUnderTest) {
    let p = t.node();
    let gone = member("gone", "n1", None);
    let kept = member("kept", "n1", None);
    p.add("room", &gone).await.unwrap();
    p.add("room", &kept).await.unwrap();
    let stale_batch = vec![
        ("room".to_owned(), gone.clone()),
        ("room".to_owned(), kept.clone()),
        ("never-added".to_owned(), gone.clone()),
    ];
    p.remove("room", "gone").await.unwrap();
    p.refresh(&stale_batch).await.expect("refresh");
    assert_eq!(
        list(&*p, "room").await,
        vec![kept.clone()],
        "no ghost after refresh"
    );
    assert_eq!(
        list(&*p, "never-added").await,
        vec![],
        "refresh does not add"
    );
}

/// restore re-adds members the store lost (Redis restarted); restoring present members keeps
/// one entry each.
async fn presence_restore_re_adds_members(t: PresenceUnderTest) {
    let p = t.node();
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
    p.restore(&batch).await.expect("restore");
    p.restore(&batch).await.expect("restore twice");
    assert_eq!(list(&*p, "room").await, vec![m1.clone(), m2.clone()]);
    assert_eq!(list(&*p, "lobby").await, vec![m2.clone()]);
    p.restore(&[]).await.expect("empty restore");
    // Restored members are ordinary members: refresh keeps them, remove removes them.
    p.refresh(&batch).await.unwrap();
    p.remove_all("m2", &["room".to_owned(), "lobby".to_owned()])
        .await
        .unwrap();
    assert_eq!(list(&*p, "room").await, vec![m1]);
    assert_eq!(list(&*p, "lobby").await, vec![]);
}

suite!(memory_presence =>
    presence_add_list_remove,
    presence_refresh_does_not_bring_back_removed_members,
    presence_restore_re_adds_members,
    presence_remove_all_removes_one_connection_everywhere,
    presence_unknown_channel_is_empty,
    presence_members_of_several_nodes,
    presence_refresh_keeps_members_and_unrefreshed_expire,
);

suite!(redis_presence =>
    presence_add_list_remove,
    presence_refresh_does_not_bring_back_removed_members,
    presence_restore_re_adds_members,
    presence_remove_all_removes_one_connection_everywhere,
    presence_unknown_channel_is_empty,
    presence_members_of_several_nodes,
    presence_refresh_keeps_members_and_unrefreshed_expire,
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
