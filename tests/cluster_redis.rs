//! Several real nodes on one real Redis, real WebSocket clients: the contract across nodes,
//! "Guarantees" included, and Redis faults (kill, restart, a silent pub/sub connection).
//!
//! Each test starts its own redis-server on a free loopback port (tests/common/redis.rs) and
//! uses a random channel prefix. Every wait is bounded; figures are printed (`--nocapture`).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pubgate::presence::{Member, Presence, RedisPresence};
use pubgate::redis_commands::RedisCommands;
use pubgate::{Config, Server};
use serde_json::{json, Value};
use tokio::sync::{oneshot, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use common::redis::{RedisServer, TcpProxy};
use common::{http_get, metric_value, rand_u32, start_node, test_config, Client, TestNode};

/// Bound for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);
/// How long to listen to be sure nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);

fn random_prefix() -> String {
    format!("t{:08x}:", rand_u32())
}

fn redis_config(redis_url: &str, prefix: &str) -> Config {
    Config {
        redis_url: Some(redis_url.to_owned()),
        channel_prefix: prefix.to_owned(),
        ..test_config()
    }
}

struct Cluster {
    redis: RedisServer,
    prefix: String,
    nodes: Vec<TestNode>,
}

/// One Redis and `n` ready nodes on it.
async fn cluster(n: usize) -> Cluster {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let mut nodes = Vec::new();
    for _ in 0..n {
        let node = start_node(redis_config(&redis.url(), &prefix)).await;
        wait_ready(node.addr, 200, Duration::from_secs(10)).await;
        nodes.push(node);
    }
    Cluster {
        redis,
        prefix,
        nodes,
    }
}

impl Cluster {
    fn full(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }
}

/// Polls `/readyz` until it answers `status`; returns how long that took and the last body.
async fn wait_ready(addr: SocketAddr, status: u16, bound: Duration) -> (Duration, String) {
    let start = Instant::now();
    loop {
        let (got, body) = http_get(addr, "/readyz").await;
        if got == status {
            return (start.elapsed(), body);
        }
        assert!(
            start.elapsed() < bound,
            "/readyz of {addr} did not answer {status} within {bound:?} (last: {got} {body:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(addr: SocketAddr, sample: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    metric_value(&body, sample)
}

fn delivery(channel: &str, data: Value) -> Value {
    json!({"type":"message","channel":channel,"data":data})
}

/// The next message must be exactly `expected`.
async fn expect_next(client: &mut Client, expected: &Value, what: &str) {
    let got = client
        .recv_within(WAIT)
        .await
        .unwrap_or_else(|| panic!("{what}: nothing within {WAIT:?}, expected {expected}"));
    assert_eq!(&got, expected, "{what}");
}

/// Nothing arrives within `QUIET`.
async fn expect_quiet(client: &mut Client, what: &str) {
    if let Some(got) = client.recv_within(QUIET).await {
        panic!("{what}: unexpected message {got}");
    }
}

/// Reads until a message with `"id": id` arrives; returns it and everything read before it.
async fn reply_to(client: &mut Client, id: &Value) -> (Value, Vec<Value>) {
    let mut before = Vec::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let msg = client
            .recv_within(left)
            .await
            .unwrap_or_else(|| panic!("no reply with id {id} within {WAIT:?}; got {before:?}"));
        if &msg["id"] == id {
            return (msg, before);
        }
        before.push(msg);
    }
}

/// Publishes from a client that may itself be subscribed: its own delivery may come before or
/// after the `published` reply. Returns the messages read before the reply.
async fn publish_interleaved(client: &mut Client, channel: &str, data: Value) -> Vec<Value> {
    client
        .send(json!({"type":"publish","channel":channel,"data":data,"id":"pi"}))
        .await;
    let (reply, before) = reply_to(client, &json!("pi")).await;
    assert_eq!(
        reply,
        json!({"type":"published","channel":channel,"id":"pi"})
    );
    before
}

/// The publisher's own delivery: already read before the reply, or the next message.
async fn expect_own(client: &mut Client, before: Vec<Value>, expected: &Value, what: &str) {
    match before.as_slice() {
        [] => expect_next(client, expected, what).await,
        [got] => assert_eq!(got, expected, "{what}"),
        more => panic!("{what}: several messages before the reply: {more:?}"),
    }
}

/// A presence query; returns (conn_id, node) pairs, sorted, after checking the reply's shape.
async fn presence(client: &mut Client, channel: &str) -> Vec<(String, String)> {
    let id = json!("presence-q");
    client
        .send(json!({"type":"presence","channel":channel,"id":"presence-q"}))
        .await;
    let (reply, _) = reply_to(client, &id).await;
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["channel"], channel);
    let members = reply["members"].as_array().expect("members array");
    assert_eq!(
        reply["count"].as_u64(),
        Some(members.len() as u64),
        "count matches members: {reply}"
    );
    let mut out: Vec<(String, String)> = members
        .iter()
        .map(|m| {
            assert!(m["user"].is_null(), "anonymous members have user null: {m}");
            (
                m["conn_id"].as_str().expect("conn_id").to_owned(),
                m["node"].as_str().expect("node").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn ids(clients: &[&Client]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = clients
        .iter()
        .map(|c| (c.conn_id().to_owned(), c.node().to_owned()))
        .collect();
    out.sort();
    out
}

/// Polls a presence query until `pred` holds; returns how long it took.
async fn wait_presence(
    observer: &mut Client,
    channel: &str,
    bound: Duration,
    what: &str,
    pred: impl Fn(&[(String, String)]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let members = presence(observer, channel).await;
        if pred(&members) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{what}: not within {bound:?}; members {members:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls PUBSUB NUMSUB until it equals `want`; returns how long it took.
async fn wait_numsub(redis: &RedisServer, full: &str, want: i64, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let n = redis.numsub(full).await;
        if n == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "NUMSUB {full} is {n}, expected {want} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ping_pong(client: &mut Client, what: &str) {
    let reply = tokio::time::timeout(WAIT, client.request(json!({"type":"ping","id":"alive"})))
        .await
        .unwrap_or_else(|_| panic!("{what}: no pong"));
    assert_eq!(reply, json!({"type":"pong","id":"alive"}), "{what}");
}

// ---------------------------------------------------------------------------------------------
// Delivery across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_delivery_both_ways() {
    let c = cluster(2).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    let mut bystander = a.client().await;
    assert_eq!(ca.node(), a.node_id, "welcome names the node");
    assert_eq!(cb.node(), b.node_id);
    ca.subscribe("news").await;
    cb.subscribe("news").await;
    bystander.subscribe("sports").await;

    let before = publish_interleaved(&mut ca, "news", json!({"from":"a"})).await;
    expect_own(
        &mut ca,
        before,
        &delivery("news", json!({"from":"a"})),
        "a gets its own",
    )
    .await;
    expect_next(&mut cb, &delivery("news", json!({"from":"a"})), "a -> b").await;

    let before = publish_interleaved(&mut cb, "news", json!({"from":"b"})).await;
    expect_next(&mut ca, &delivery("news", json!({"from":"b"})), "b -> a").await;
    expect_own(
        &mut cb,
        before,
        &delivery("news", json!({"from":"b"})),
        "b gets its own",
    )
    .await;

    // A publisher needs no subscription, on either node.
    let mut pa = a.client().await;
    pa.publish("news", json!([1, 2, 3])).await;
    expect_next(
        &mut ca,
        &delivery("news", json!([1, 2, 3])),
        "a-publisher -> a",
    )
    .await;
    expect_next(
        &mut cb,
        &delivery("news", json!([1, 2, 3])),
        "a-publisher -> b",
    )
    .await;
    expect_quiet(&mut pa, "an unsubscribed publisher gets no delivery").await;
    expect_quiet(&mut bystander, "another channel's subscriber gets nothing").await;
    expect_quiet(&mut ca, "exactly once").await;
    expect_quiet(&mut cb, "exactly once").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_publish_reaches_clients_json_or_string() {
    let c = cluster(2).await;
    let mut a1 = c.nodes[0].client().await;
    let mut a2 = c.nodes[0].client().await;
    let mut b1 = c.nodes[1].client().await;
    for client in [&mut a1, &mut a2, &mut b1] {
        client.subscribe("news").await;
    }
    let mut backend = c.redis.backend().await;
    let receivers = backend.publish(&c.prefix, "news", r#"{"x":1}"#).await;
    assert_eq!(
        receivers, 2,
        "one Redis subscription per node, not per client (3 clients on 2 nodes)"
    );
    for client in [&mut a1, &mut a2, &mut b1] {
        expect_next(client, &delivery("news", json!({"x":1})), "JSON as JSON").await;
    }

    let cases: Vec<(&[u8], Value)> = vec![
        (b"hello", json!("hello")),
        (b"42", json!(42)),
        (b"\"quoted\"", json!("quoted")),
        (b"[1,{\"a\":null}]", json!([1, {"a": null}])),
        (b"{not json", json!("{not json")),
        (b"", json!("")),
        (
            "h\u{e9}llo \u{2603}".as_bytes(),
            json!("h\u{e9}llo \u{2603}"),
        ),
    ];
    for (payload, data) in &cases {
        backend.publish(&c.prefix, "news", *payload).await;
        for client in [&mut a1, &mut a2, &mut b1] {
            expect_next(
                client,
                &delivery("news", data.clone()),
                &format!("payload {:?}", String::from_utf8_lossy(payload)),
            )
            .await;
        }
    }

    // Bytes that are not UTF-8 cannot be a JSON string as they are: whatever the node does with
    // them, every connection stays open and the next message arrives.
    backend
        .publish(&c.prefix, "news", &[0xffu8, 0xfe, 0x00][..])
        .await;
    backend.publish(&c.prefix, "news", r#"{"after":1}"#).await;
    for client in [&mut a1, &mut a2, &mut b1] {
        let first = client.recv().await;
        if first != delivery("news", json!({"after":1})) {
            assert_eq!(first["type"], "message", "{first}");
            assert!(
                first["data"].is_string(),
                "non-UTF-8 becomes a string: {first}"
            );
            expect_next(client, &delivery("news", json!({"after":1})), "after").await;
        }
    }
    // A backend publish on another prefix or an unprefixed name reaches nobody.
    assert_eq!(backend.publish("other:", "news", "x").await, 0);
    assert_eq!(backend.publish("", "news", "x").await, 0);
    for client in [&mut a1, &mut a2, &mut b1] {
        expect_quiet(client, "nothing else").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_publish_puts_the_exact_json_text_of_data_on_redis() {
    let c = cluster(2).await;
    let mut sub = c.redis.subscriber(&c.full("news")).await;
    let mut ws_sub = c.nodes[1].client().await;
    ws_sub.subscribe("news").await;
    let mut publisher = c.nodes[0].client().await;
    let samples = [
        r#"{"x":1}"#,
        r#"{"b": 2, "a": [1, 2.50, "x"]}"#,
        r#""text""#,
        r#""h\u00e9llo \n""#,
        "12",
        "-0.5e3",
        "null",
        "true",
        r#"[{"deep":{"k":[{}]}}]"#,
        "\"h\u{e9}llo \u{2603}\"",
    ];
    for (i, data_text) in samples.iter().enumerate() {
        let request =
            format!(r#"{{"type":"publish","channel":"news","data":{data_text},"id":{i}}}"#);
        publisher.send_text(&request).await;
        let (reply, _) = reply_to(&mut publisher, &json!(i)).await;
        assert_eq!(reply, json!({"type":"published","channel":"news","id":i}));
        let (channel, payload) = sub
            .next_within(WAIT)
            .await
            .unwrap_or_else(|| panic!("{data_text} not seen on Redis"));
        assert_eq!(channel, c.full("news"), "published on <prefix><channel>");
        let sent: Value = serde_json::from_str(data_text).unwrap();
        let on_redis: Value = serde_json::from_slice(&payload).unwrap_or_else(|e| {
            panic!(
                "payload on Redis is JSON ({e}): {:?}",
                String::from_utf8_lossy(&payload)
            )
        });
        assert_eq!(on_redis, sent, "same JSON value on Redis");
        assert_eq!(
            String::from_utf8_lossy(&payload),
            *data_text,
            "backends read exactly the text the client sent as data"
        );
        expect_next(&mut ws_sub, &delivery("news", sent), "WebSocket subscriber").await;
    }
    assert!(
        sub.next_within(QUIET).await.is_none(),
        "one PUBLISH per publish"
    );
}

/// 3 nodes x 10 subscribers, one publisher pipelining 2000 messages: every subscriber gets all
/// of them, in order, no duplicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_ten_subscribers_each_get_2000_ordered_messages() {
    const N: u64 = 2000;
    let c = cluster(3).await;
    let mut subscribers = Vec::new();
    for node in &c.nodes {
        for _ in 0..10 {
            let mut client = node.client().await;
            client.subscribe("stream").await;
            subscribers.push(client);
        }
    }
    assert_eq!(c.redis.numsub(&c.full("stream")).await, 3);
    let start = Instant::now();
    let mut readers = Vec::new();
    for (k, mut client) in subscribers.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            for expected in 0..N {
                let msg = client
                    .recv_within(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|| {
                        panic!("subscriber {k}: message {expected} missing (stalled 20 s)")
                    });
                assert_eq!(
                    msg,
                    delivery("stream", json!({"seq": expected})),
                    "subscriber {k}: in order, no loss, no duplicate"
                );
            }
            if let Some(extra) = client.recv_within(QUIET).await {
                panic!("subscriber {k}: extra message {extra}");
            }
        }));
    }

    let publisher = c.nodes[0].client().await;
    let (mut tx, mut rx) = publisher.ws.split();
    let window = Arc::new(Semaphore::new(100));
    let writer_window = window.clone();
    let writer = tokio::spawn(async move {
        for seq in 0..N {
            writer_window.acquire().await.unwrap().forget();
            let msg = json!({"type":"publish","channel":"stream","data":{"seq":seq},"id":seq});
            tx.send(Message::text(msg.to_string())).await.unwrap();
        }
        tx
    });
    let acks = tokio::spawn(async move {
        let mut acked = HashSet::new();
        while (acked.len() as u64) < N {
            let frame = tokio::time::timeout(Duration::from_secs(20), rx.next())
                .await
                .expect("publish replies keep coming")
                .expect("publisher connection open")
                .unwrap();
            let Message::Text(text) = frame else { continue };
            let reply: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(reply["type"], "published", "{reply}");
            assert!(
                acked.insert(reply["id"].as_u64().unwrap()),
                "one reply per publish"
            );
            window.add_permits(1);
        }
    });
    tokio::time::timeout(Duration::from_secs(90), async {
        let _tx = writer.await.unwrap();
        acks.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
    })
    .await
    .expect("2000 messages to 30 subscribers within 90 s");
    let took = start.elapsed();
    println!(
        "2000 messages x 30 subscribers on 3 nodes in {took:?} ({:.0} deliveries/s)",
        (N * 30) as f64 / took.as_secs_f64()
    );
    let publishing = c.nodes[0].addr;
    assert_eq!(
        metric(publishing, "pubgate_messages_published_total").await,
        Some(N as f64)
    );
    assert_eq!(
        metric(publishing, "pubgate_publish_duration_seconds_count").await,
        Some(N as f64),
        "every publish timed"
    );
    for node in &c.nodes {
        assert_eq!(
            metric(node.addr, "pubgate_messages_delivered_total").await,
            Some((N * 10) as f64),
            "each node delivered 2000 messages to each of its 10 subscribers"
        );
    }
}

/// `subscribed` means live on Redis: a message published right after it arrives, whether
/// a backend publishes it or a client on another (or the same) node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_published_right_after_subscribed_arrives() {
    let c = cluster(2).await;
    let mut backend = c.redis.backend().await;
    let mut x = c.nodes[0].client().await;
    let mut y_other = c.nodes[1].client().await;
    let mut y_same = c.nodes[0].client().await;
    for i in 0..50 {
        let channel = format!("fresh{i}");
        x.send(json!({"type":"subscribe","channel":channel,"id":i}))
            .await;
        let reply = x.recv().await;
        assert_eq!(reply, json!({"type":"subscribed","channel":channel,"id":i}));
        // Immediately, from the backend and from a client.
        let receivers = backend
            .publish(
                &c.prefix,
                &channel,
                format!(r#"{{"i":{i},"src":"backend"}}"#),
            )
            .await;
        assert_eq!(
            receivers, 1,
            "iteration {i}: node subscribed on Redis before `subscribed`"
        );
        let y = if i % 2 == 0 {
            &mut y_other
        } else {
            &mut y_same
        };
        y.publish(&channel, json!({"i": i, "src": "client"})).await;
        let mut got = vec![x.recv().await, x.recv().await];
        got.sort_by_key(|m| m["data"]["src"].as_str().map(str::to_owned));
        assert_eq!(
            got,
            vec![
                delivery(&channel, json!({"i": i, "src": "backend"})),
                delivery(&channel, json!({"i": i, "src": "client"})),
            ],
            "iteration {i}"
        );
        x.send(json!({"type":"unsubscribe","channel":channel,"id":i}))
            .await;
        assert_eq!(
            x.recv().await,
            json!({"type":"unsubscribed","channel":channel,"id":i})
        );
    }
    expect_quiet(&mut x, "nothing after unsubscribing").await;
}

// ---------------------------------------------------------------------------------------------
// The node's Redis subscription follows its local subscribers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_is_subscribed_on_redis_exactly_when_it_has_local_subscribers() {
    let c = cluster(2).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let full = c.full("news");
    let settle = Duration::from_secs(2);
    assert_eq!(c.redis.numsub(&full).await, 0);

    let mut c1 = a.client().await;
    let mut c2 = a.client().await;
    c1.subscribe("news").await;
    assert_eq!(c.redis.numsub(&full).await, 1, "first local subscriber");
    c2.subscribe("news").await;
    c1.subscribe("news").await; // idempotent
    assert_eq!(
        c.redis.numsub(&full).await,
        1,
        "one Redis subscription per node"
    );
    let mut d1 = b.client().await;
    d1.subscribe("news").await;
    assert_eq!(
        c.redis.numsub(&full).await,
        2,
        "one per node with subscribers"
    );

    // Only the channel itself: no global bus that every node receives everything on. The
    // control channel carries only backends' rare disconnects (contract v1.1).
    let control = c.full("__control");
    let ours: Vec<String> = c
        .redis
        .channels(&format!("{}*", c.prefix))
        .await
        .into_iter()
        .filter(|ch| !ch.contains(&a.node_id) && !ch.contains(&b.node_id) && *ch != control)
        .collect();
    assert_eq!(
        ours,
        vec![full.clone()],
        "Redis channels under the prefix (probes and control aside)"
    );

    c1.send(json!({"type":"unsubscribe","channel":"news","id":1}))
        .await;
    assert_eq!(
        c1.recv().await,
        json!({"type":"unsubscribed","channel":"news","id":1})
    );
    assert_eq!(c.redis.numsub(&full).await, 2, "node a still has c2");

    drop(c2); // disconnect without unsubscribing
    let t = wait_numsub(&c.redis, &full, 1, settle).await;
    println!("node unsubscribed {t:?} after its last subscriber disconnected");
    assert_eq!(metric(a.addr, "pubgate_channels").await, Some(0.0));
    assert_eq!(metric(a.addr, "pubgate_subscriptions").await, Some(0.0));

    d1.send(json!({"type":"unsubscribe","channel":"news","id":2}))
        .await;
    assert_eq!(
        d1.recv().await,
        json!({"type":"unsubscribed","channel":"news","id":2})
    );
    wait_numsub(&c.redis, &full, 0, settle).await;

    // And again on the same channel: subscribe after the node unsubscribed is live.
    let mut backend = c.redis.backend().await;
    c1.subscribe("news").await;
    assert_eq!(backend.publish(&c.prefix, "news", "1").await, 1);
    expect_next(&mut c1, &delivery("news", json!(1)), "resubscribed").await;
    drop(c1);
    wait_numsub(&c.redis, &full, 0, settle).await;
}

/// Many clients racing subscribe/unsubscribe (and disconnects) on one channel: afterwards the
/// node is subscribed on Redis exactly when a client is still subscribed, presence and metrics
/// agree, and delivery reaches exactly the subscribed clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_unsubscribe_races_leave_redis_and_presence_consistent() {
    const CLIENTS: usize = 16;
    const ROUNDS: usize = 25;
    let c = cluster(2).await;
    let node = &c.nodes[0];
    let full = c.full("race");
    let mut observer = c.nodes[1].client().await;

    /// Sends ROUNDS subscribe/unsubscribe pairs without waiting (plus a final subscribe when
    /// `stay`), then checks every reply by id.
    async fn churn(mut client: Client, stay: bool) -> Client {
        let mut expected = HashMap::new();
        for r in 0..ROUNDS {
            client
                .send(json!({"type":"subscribe","channel":"race","id":format!("s{r}")}))
                .await;
            client
                .send(json!({"type":"unsubscribe","channel":"race","id":format!("u{r}")}))
                .await;
            expected.insert(format!("s{r}"), "subscribed");
            expected.insert(format!("u{r}"), "unsubscribed");
        }
        if stay {
            client
                .send(json!({"type":"subscribe","channel":"race","id":"final"}))
                .await;
            expected.insert("final".to_owned(), "subscribed");
        }
        while !expected.is_empty() {
            let reply = client.recv().await;
            let id = reply["id"].as_str().unwrap_or_default().to_owned();
            let want = expected
                .remove(&id)
                .unwrap_or_else(|| panic!("unexpected message {reply}"));
            assert_eq!(
                reply["type"], want,
                "requests of one connection run in order: {reply}"
            );
        }
        client
    }

    async fn run_all(node: &TestNode, stay: impl Fn(usize) -> bool) -> Vec<(Client, bool)> {
        let mut tasks = Vec::new();
        for i in 0..CLIENTS {
            let client = node.client().await;
            let s = stay(i);
            tasks.push(tokio::spawn(async move { (churn(client, s).await, s) }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(
                tokio::time::timeout(Duration::from_secs(30), t)
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        out
    }

    // Round 1: everyone ends unsubscribed.
    let clients = run_all(node, |_| false).await;
    let t = wait_numsub(&c.redis, &full, 0, Duration::from_secs(3)).await;
    println!("round 1 settled at NUMSUB 0 after {t:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.redis.numsub(&full).await, 0, "stays unsubscribed");
    assert_eq!(presence(&mut observer, "race").await, vec![]);
    assert_eq!(metric(node.addr, "pubgate_channels").await, Some(0.0));
    assert_eq!(metric(node.addr, "pubgate_subscriptions").await, Some(0.0));
    drop(clients);

    // Round 2: odd clients end subscribed.
    let clients = run_all(node, |i| i % 2 == 1).await;
    assert_eq!(
        c.redis.numsub(&full).await,
        1,
        "subscribed right after the last `subscribed` reply"
    );
    let staying: Vec<&Client> = clients.iter().filter(|(_, s)| *s).map(|(c, _)| c).collect();
    let expected_members = ids(&staying);
    assert_eq!(presence(&mut observer, "race").await, expected_members);
    assert_eq!(metric(node.addr, "pubgate_channels").await, Some(1.0));
    assert_eq!(
        metric(node.addr, "pubgate_subscriptions").await,
        Some((CLIENTS / 2) as f64)
    );
    // Still so after a presence refresh tick or two.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.redis.numsub(&full).await, 1);
    assert_eq!(
        presence(&mut observer, "race").await,
        expected_members,
        "no removed member comes back with a refresh"
    );
    let mut backend = c.redis.backend().await;
    assert_eq!(backend.publish(&c.prefix, "race", r#"{"r":2}"#).await, 1);
    let mut clients = clients;
    for (client, stay) in clients.iter_mut() {
        if *stay {
            expect_next(
                client,
                &delivery("race", json!({"r":2})),
                "subscribed client",
            )
            .await;
        }
    }
    for (client, stay) in clients.iter_mut() {
        if *stay {
            expect_quiet(client, "exactly once").await;
        } else {
            expect_quiet(client, "an unsubscribed client gets nothing").await;
        }
    }

    // Round 3: the subscribed clients disconnect while others churn and more subscribe and
    // vanish without reading their reply.
    let (staying, others): (Vec<_>, Vec<_>) = clients.into_iter().partition(|(_, s)| *s);
    let churners = tokio::spawn({
        let url = node.ws_url();
        async move {
            let mut tasks = Vec::new();
            for (client, _) in others {
                tasks.push(tokio::spawn(churn(client, false)));
            }
            for _ in 0..8 {
                let mut c = Client::connect(&url).await;
                c.send(json!({"type":"subscribe","channel":"race","id":"x"}))
                    .await;
                drop(c);
            }
            for t in tasks {
                t.await.unwrap();
            }
        }
    });
    drop(staying);
    tokio::time::timeout(Duration::from_secs(30), churners)
        .await
        .unwrap()
        .unwrap();
    let t = wait_numsub(&c.redis, &full, 0, Duration::from_secs(3)).await;
    println!("round 3 settled at NUMSUB 0 after {t:?}");
    wait_presence(
        &mut observer,
        "race",
        Duration::from_secs(2),
        "presence empties",
        |m| m.is_empty(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(c.redis.numsub(&full).await, 0);
    assert_eq!(
        presence(&mut observer, "race").await,
        vec![],
        "nobody comes back"
    );
    assert_eq!(metric(node.addr, "pubgate_channels").await, Some(0.0));
    assert_eq!(metric(node.addr, "pubgate_subscriptions").await, Some(0.0));
}

// ---------------------------------------------------------------------------------------------
// Presence across nodes.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_members_of_every_node_with_node_ids() {
    let c = cluster(2).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut a1 = a.client().await;
    let mut a2 = a.client().await;
    let mut b1 = b.client().await;
    for client in [&mut a1, &mut a2, &mut b1] {
        client.subscribe("room").await;
    }
    assert_eq!(a1.node(), a.node_id);
    assert_eq!(b1.node(), b.node_id);
    let expected = ids(&[&a1, &a2, &b1]);
    let mut qa = a.client().await;
    let mut qb = b.client().await;
    assert_eq!(
        presence(&mut qa, "room").await,
        expected,
        "seen from node a"
    );
    assert_eq!(
        presence(&mut qb, "room").await,
        expected,
        "seen from node b"
    );
    assert_eq!(presence(&mut qa, "empty-room").await, vec![]);

    // A member appears before its `subscribed` and disappears before its `unsubscribed`, as seen
    // from the other node.
    let mut x = a.client().await;
    for i in 0..20 {
        let channel = format!("p{i}");
        x.subscribe(&channel).await;
        let members = presence(&mut qb, &channel).await;
        assert_eq!(
            members,
            ids(&[&x]),
            "iteration {i}: present once subscribed"
        );
        x.send(json!({"type":"unsubscribe","channel":channel,"id":"u"}))
            .await;
        assert_eq!(x.recv().await["type"], "unsubscribed");
        assert_eq!(
            presence(&mut qb, &channel).await,
            vec![],
            "iteration {i}: gone once unsubscribed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_forgets_a_closed_connection_within_1s() {
    let c = cluster(2).await;
    let (a, b) = (&c.nodes[0], &c.nodes[1]);
    let mut closing = b.client().await;
    let dropping = b.client().await;
    let mut staying = b.client().await;
    let mut observer = a.client().await;
    let mut dropping = dropping;
    for client in [&mut closing, &mut dropping, &mut staying] {
        client.subscribe("room").await;
        client.subscribe("lobby").await;
    }
    assert_eq!(
        presence(&mut observer, "room").await,
        ids(&[&closing, &dropping, &staying])
    );
    let closing_id = closing.conn_id().to_owned();
    let dropping_id = dropping.conn_id().to_owned();

    // A clean close handshake.
    closing.ws.close(None).await.unwrap();
    let t = wait_presence(
        &mut observer,
        "room",
        Duration::from_secs(3),
        "closed",
        |m| !m.iter().any(|(id, _)| *id == closing_id),
    )
    .await;
    println!("closed connection left presence after {t:?}");
    assert!(t <= Duration::from_secs(1), "within 1 s after close: {t:?}");

    // A TCP connection dropped without a close frame.
    drop(dropping);
    let t = wait_presence(
        &mut observer,
        "room",
        Duration::from_secs(3),
        "dropped",
        |m| !m.iter().any(|(id, _)| *id == dropping_id),
    )
    .await;
    println!("dropped connection left presence after {t:?}");
    assert!(
        t <= Duration::from_secs(1),
        "within 1 s after the drop: {t:?}"
    );

    for channel in ["room", "lobby"] {
        assert_eq!(
            presence(&mut observer, channel).await,
            ids(&[&staying]),
            "every channel of the closed connections is cleaned, others stay"
        );
    }
}

/// The figure the issue asks for: presence query latency with 1000 members (another node's,
/// written straight into Redis through RedisPresence), end to end over a WebSocket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_query_with_1000_members() {
    let c = cluster(1).await;
    let commands = Arc::new(
        RedisCommands::new(&c.redis.url(), Duration::from_secs(2)).expect("redis commands"),
    );
    let other_node = RedisPresence::new(
        commands,
        c.prefix.clone(),
        Duration::from_secs(60),
        "bench-node".into(),
    );
    let members: Vec<(String, Member)> = (0..1000)
        .map(|i| {
            (
                "big".to_owned(),
                Member {
                    conn_id: format!("conn-{i:04}"),
                    node: "bench-node".to_owned(),
                    user: Some(format!("user-{i}")),
                    info: None,
                },
            )
        })
        .collect();
    other_node
        .restore(&members)
        .await
        .expect("restore 1000 members");
    let mut client = c.nodes[0].client().await;
    let mut took = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        client
            .send(json!({"type":"presence","channel":"big","id":"q"}))
            .await;
        let reply = client.recv().await;
        took.push(start.elapsed());
        assert_eq!(reply["count"], 1000, "all members listed");
        assert_eq!(reply["members"].as_array().map(Vec::len), Some(1000));
    }
    took.sort();
    let (p50, p99) = (took[took.len() / 2], took[took.len() * 99 / 100]);
    let build = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!("presence query with 1000 members: p50 {p50:?}, p99 {p99:?} ({build} build)");
    assert!(p50 < Duration::from_secs(1), "p50 {p50:?}");
    let mut direct = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let listed = other_node.list("big", 1000).await.expect("list");
        direct.push(start.elapsed());
        assert_eq!(listed.count, 1000);
        assert_eq!(listed.members.len(), 1000);
    }
    direct.sort();
    println!(
        "RedisPresence::list with 1000 members: p50 {:?}, p99 {:?}",
        direct[direct.len() / 2],
        direct[direct.len() * 99 / 100]
    );
    let histogram = metric(
        c.nodes[0].addr,
        "pubgate_presence_query_duration_seconds_count",
    )
    .await;
    assert!(
        histogram.is_some_and(|n| n >= 50.0),
        "presence queries counted: {histogram:?}"
    );
}

/// A node that runs in its own runtime, so a test can kill it as a crash would: every task and
/// socket dropped at once, nothing graceful runs (no presence cleanup, no close frames).
struct CrashableNode {
    addr: SocketAddr,
    node_id: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl CrashableNode {
    async fn start(config: Config) -> CrashableNode {
        let node_id = config.node_id.clone().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = oneshot::channel();
        runtime.spawn(async move {
            let server = Server::bind(config).await.expect("node binds");
            let _ = tx.send(server.local_addr());
            let _ = server.run(std::future::pending::<()>()).await;
        });
        let addr = rx.await.expect("node started");
        CrashableNode {
            addr,
            node_id,
            runtime: Some(runtime),
        }
    }

    fn crash(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for CrashableNode {
    fn drop(&mut self) {
        self.crash();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_node_members_vanish_within_presence_ttl() {
    let c = cluster(1).await;
    let config = redis_config(&c.redis.url(), &c.prefix);
    let ttl = config.presence_ttl;
    let mut crashing = CrashableNode::start(config).await;
    wait_ready(crashing.addr, 200, Duration::from_secs(10)).await;
    let url = format!("ws://{}/ws", crashing.addr);
    let mut m1 = Client::connect(&url).await;
    let mut m2 = Client::connect(&url).await;
    assert_eq!(m1.node(), crashing.node_id);
    m1.subscribe("room").await;
    m2.subscribe("room").await;
    m2.subscribe("lobby").await;
    let mut survivor = c.nodes[0].client().await;
    survivor.subscribe("room").await;
    let mut observer = c.nodes[0].client().await;
    assert_eq!(
        presence(&mut observer, "room").await,
        ids(&[&m1, &m2, &survivor])
    );
    // Outlive at least one refresh period, so expiry is not just the first add's TTL.
    tokio::time::sleep(ttl).await;
    assert_eq!(
        presence(&mut observer, "room").await,
        ids(&[&m1, &m2, &survivor]),
        "a live node keeps its members past the TTL"
    );

    crashing.crash();
    let t = wait_presence(
        &mut observer,
        "room",
        ttl + Duration::from_secs(3),
        "crashed node's members vanish",
        |m| m.iter().all(|(_, node)| *node != crashing.node_id),
    )
    .await;
    wait_presence(
        &mut observer,
        "lobby",
        Duration::from_secs(1),
        "lobby too",
        |m| m.is_empty(),
    )
    .await;
    println!("crashed node's members gone after {t:?} (presence TTL {ttl:?})");
    assert!(
        t <= ttl + Duration::from_secs(1),
        "within the presence TTL (+1 s slack): {t:?}"
    );
    assert_eq!(presence(&mut observer, "room").await, ids(&[&survivor]));
    // The crashed node's Redis subscription went with its connection.
    wait_numsub(&c.redis, &c.full("lobby"), 0, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_removes_the_nodes_members_at_once() {
    let c = cluster(1).await;
    let stopping = start_node(redis_config(&c.redis.url(), &c.prefix)).await;
    wait_ready(stopping.addr, 200, Duration::from_secs(10)).await;
    let mut members = Vec::new();
    for _ in 0..5 {
        let mut m = stopping.client().await;
        m.subscribe("room").await;
        members.push(m);
    }
    let mut survivor = c.nodes[0].client().await;
    survivor.subscribe("room").await;
    let mut observer = c.nodes[0].client().await;
    assert_eq!(presence(&mut observer, "room").await.len(), 6);
    let start = Instant::now();
    stopping.stop().await.expect("graceful stop");
    println!("graceful stop took {:?}", start.elapsed());
    assert_eq!(
        presence(&mut observer, "room").await,
        ids(&[&survivor]),
        "members of a gracefully stopped node are gone when it has stopped"
    );
    assert_eq!(c.redis.numsub(&c.full("room")).await, 1);
}

// ---------------------------------------------------------------------------------------------
// Redis faults.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted_on_the_same_port() {
    let mut c = cluster(2).await;
    let (a_addr, b_addr) = (c.nodes[0].addr, c.nodes[1].addr);
    let mut sa = c.nodes[0].client().await;
    let mut sb = c.nodes[1].client().await;
    sa.subscribe("news").await;
    sb.subscribe("news").await;
    let mut publisher = c.nodes[1].client().await;
    publisher.publish("news", json!({"n":1})).await;
    expect_next(
        &mut sa,
        &delivery("news", json!({"n":1})),
        "before the fault",
    )
    .await;
    expect_next(
        &mut sb,
        &delivery("news", json!({"n":1})),
        "before the fault",
    )
    .await;
    assert_eq!(metric(a_addr, "pubgate_broker_up").await, Some(1.0));

    // Redis dies.
    c.redis.kill();
    let killed = Instant::now();
    for addr in [a_addr, b_addr] {
        let (_, reason) = wait_ready(addr, 503, Duration::from_secs(5)).await;
        assert!(!reason.trim().is_empty(), "503 says why");
        println!(
            "{addr}: /readyz 503 {:?} after the kill: {reason:?}",
            killed.elapsed()
        );
        assert_eq!(metric(addr, "pubgate_broker_up").await, Some(0.0));
        assert_eq!(http_get(addr, "/healthz").await.0, 200, "still healthy");
    }
    publisher
        .send(json!({"type":"publish","channel":"news","data":{"lost":true},"id":7}))
        .await;
    let reply = tokio::time::timeout(WAIT, publisher.recv())
        .await
        .expect("publish answered while Redis is down");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "unavailable", "{reply}");
    assert_eq!(reply["id"], 7, "{reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{reply}"
    );
    ping_pong(&mut sa, "subscriber on a stays connected").await;
    ping_pong(&mut sb, "subscriber on b stays connected").await;
    ping_pong(&mut publisher, "publisher stays connected").await;
    // A subscribe while down: either refused as unavailable or accepted, and then it must
    // be live once Redis is back.
    sa.send(json!({"type":"subscribe","channel":"late","id":"late"}))
        .await;
    let (late, _) = reply_to(&mut sa, &json!("late")).await;
    let late_accepted = match late["type"].as_str() {
        Some("subscribed") => true,
        Some("error") => {
            assert_eq!(late["code"], "unavailable", "{late}");
            false
        }
        _ => panic!("unexpected reply {late}"),
    };
    println!("subscribe while Redis is down: {late}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Redis comes back on the same port, empty.
    c.redis.restart().await;
    let restarted = Instant::now();
    let full = c.full("news");
    let resubscribed = wait_numsub(&c.redis, &full, 2, Duration::from_secs(15)).await;
    for addr in [a_addr, b_addr] {
        wait_ready(addr, 200, Duration::from_secs(15)).await;
    }
    let ready = restarted.elapsed();
    println!(
        "Redis restart recovery: both nodes resubscribed after {resubscribed:?}, /readyz 200 \
         after {ready:?}"
    );
    for addr in [a_addr, b_addr] {
        assert_eq!(metric(addr, "pubgate_broker_up").await, Some(1.0));
        let reconnects = metric(addr, "pubgate_broker_reconnects_total")
            .await
            .unwrap();
        assert!(
            reconnects >= 1.0,
            "{addr}: reconnects counted ({reconnects})"
        );
    }

    // Old subscriptions deliver again without any client action.
    publisher.publish("news", json!({"n":2})).await;
    expect_next(&mut sa, &delivery("news", json!({"n":2})), "after recovery").await;
    expect_next(&mut sb, &delivery("news", json!({"n":2})), "after recovery").await;
    let mut backend = c.redis.backend().await;
    assert_eq!(backend.publish(&c.prefix, "news", r#"{"n":3}"#).await, 2);
    expect_next(
        &mut sa,
        &delivery("news", json!({"n":3})),
        "backend after recovery",
    )
    .await;
    expect_next(
        &mut sb,
        &delivery("news", json!({"n":3})),
        "backend after recovery",
    )
    .await;
    if late_accepted {
        assert_eq!(backend.publish(&c.prefix, "late", "1").await, 1);
        expect_next(&mut sa, &delivery("late", json!(1)), "accepted while down").await;
    }
    // The refused publish never shows up.
    expect_quiet(&mut sa, "the unavailable publish is never delivered").await;
    expect_quiet(&mut sb, "the unavailable publish is never delivered").await;

    // Presence comes back too (Redis lost it): the nodes re-add their members.
    let mut observer = c.nodes[0].client().await;
    let ttl = test_config().presence_ttl;
    let t = wait_presence(
        &mut observer,
        "news",
        ttl + Duration::from_secs(2),
        "presence restored after the Redis restart",
        |m| m.len() == 2,
    )
    .await;
    println!("presence restored {t:?} after the nodes were ready");
    assert_eq!(presence(&mut observer, "news").await, ids(&[&sa, &sb]));
}

/// The node's Redis URL points at a proxy that goes silent (forwards nothing, closes nothing):
/// the probe finds it within 2 probe intervals, the node stays not-ready while it lasts, and
/// recovers by itself afterwards.
async fn silent_connection_detected(pubsub_only: bool) {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.addr()).await;
    let prefix = random_prefix();
    let config = redis_config(&proxy.url(), &prefix);
    let probe = config.broker_probe_interval;
    let node = start_node(config).await;
    wait_ready(node.addr, 200, Duration::from_secs(10)).await;
    let mut client = node.client().await;
    client.subscribe("news").await;
    let mut backend = redis.backend().await;
    assert_eq!(backend.publish(&prefix, "news", "1").await, 1);
    expect_next(
        &mut client,
        &delivery("news", json!(1)),
        "through the proxy",
    )
    .await;

    let mut publisher = node.client().await;

    if pubsub_only {
        proxy.set_blackhole_pubsub(true);
    } else {
        proxy.set_blackhole(true);
    }
    // A publish sent as the connection goes silent, before the node can know: answered in
    // bounded time (by the Redis timeout at worst), and never delivered later if refused.
    let redis_timeout = test_config().redis_timeout;
    let during = tokio::spawn(async move {
        let sent = Instant::now();
        publisher
            .send(json!({"type":"publish","channel":"news","data":{"during":true},"id":"during"}))
            .await;
        let reply = tokio::time::timeout(redis_timeout + Duration::from_secs(3), publisher.recv())
            .await
            .expect("a publish during the silence is answered within the Redis timeout");
        (reply, sent.elapsed())
    });
    let (detected, reason) = wait_ready(node.addr, 503, Duration::from_secs(10)).await;
    println!(
        "silent {} detected after {detected:?} (probe interval {probe:?}): {reason:?}",
        if pubsub_only {
            "pub/sub connection"
        } else {
            "route"
        }
    );
    assert!(
        detected <= probe * 2 + Duration::from_secs(1),
        "found within 2 probe intervals (+1 s slack): {detected:?}"
    );
    assert_eq!(metric(node.addr, "pubgate_broker_up").await, Some(0.0));
    let (during_reply, during_took) = during.await.unwrap();
    println!("publish during the silence answered after {during_took:?}: {during_reply}");
    // v1.2: `timeout` (the PUBLISH went out, no answer: outcome unknown, it may arrive later)
    // or `unavailable` (refused before anything was sent: never delivered).
    let during_refused = match (during_reply["type"].as_str(), during_reply["code"].as_str()) {
        (Some("published"), _) | (Some("error"), Some("timeout")) => false,
        (Some("error"), Some("unavailable")) => true,
        _ => panic!("unexpected reply {during_reply}"),
    };
    // While the silence lasts the node must not claim to be ready.
    let until = Instant::now() + probe * 4;
    while Instant::now() < until {
        assert_eq!(
            http_get(node.addr, "/readyz").await.0,
            503,
            "not ready while the pub/sub connection is silent"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ping_pong(&mut client, "client stays connected").await;

    if pubsub_only {
        proxy.set_blackhole_pubsub(false);
    } else {
        proxy.set_blackhole(false);
    }
    let (recovered, _) = wait_ready(node.addr, 200, Duration::from_secs(20)).await;
    println!("recovered after {recovered:?} once the proxy forwarded again");
    // Resubscribed before ready: a publish right now reaches the client, exactly once.
    assert!(backend.publish(&prefix, "news", "2").await >= 1);
    let (_, before) = {
        let mut before = Vec::new();
        loop {
            let msg = client.recv().await;
            if msg == delivery("news", json!(2)) {
                break (msg, before);
            }
            before.push(msg);
        }
    };
    for msg in &before {
        assert_eq!(
            msg,
            &delivery("news", json!({"during":true})),
            "only the publish sent during the silence may arrive late"
        );
        assert!(
            !during_refused,
            "a publish answered `unavailable` is never delivered later"
        );
    }
    expect_quiet(&mut client, "exactly once").await;
    assert_eq!(metric(node.addr, "pubgate_broker_up").await, Some(1.0));
    let reconnects = metric(node.addr, "pubgate_broker_reconnects_total")
        .await
        .unwrap();
    assert!(reconnects >= 1.0, "reconnect counted ({reconnects})");
    assert!(proxy.accepted() >= 2, "the node opened a new connection");
    let mut publisher = node.client().await;
    publisher.publish("news", json!(3)).await;
    expect_next(
        &mut client,
        &delivery("news", json!(3)),
        "client publish after recovery",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blackholed_redis_route_is_detected_by_the_probe() {
    silent_connection_detected(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_pubsub_connection_is_detected_by_the_probe_while_commands_work() {
    silent_connection_detected(true).await;
}

/// Every Redis connection of the node dropped at once (a proxy or load balancer restart) while
/// Redis itself keeps its data: the node reconnects by itself, resubscribes, and publishes and
/// presence work again; a publish caught in the drop is answered, never left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_redis_connections_are_reestablished() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.addr()).await;
    let prefix = random_prefix();
    let node = start_node(redis_config(&proxy.url(), &prefix)).await;
    wait_ready(node.addr, 200, Duration::from_secs(10)).await;
    let mut client = node.client().await;
    client.subscribe("news").await;
    let mut publisher = node.client().await;
    publisher.publish("news", json!(1)).await;
    expect_next(&mut client, &delivery("news", json!(1)), "before the drop").await;
    let accepted_before = proxy.accepted();

    proxy.close_all();
    publisher
        .send(json!({"type":"publish","channel":"news","data":{"caught":true},"id":"caught"}))
        .await;
    let reply = tokio::time::timeout(Duration::from_secs(5), publisher.recv())
        .await
        .expect("a publish caught in the drop is answered");
    let caught_refused = match reply["type"].as_str() {
        Some("published") => false,
        Some("error") => {
            assert_eq!(reply["code"], "unavailable", "{reply}");
            true
        }
        _ => panic!("unexpected reply {reply}"),
    };
    println!("publish caught in the drop: {reply}");

    let start = Instant::now();
    let full = format!("{prefix}news");
    wait_numsub(&redis, &full, 1, Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(node.addr, "pubgate_broker_reconnects_total").await < Some(1.0) {
        assert!(Instant::now() < deadline, "the node reconnected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_ready(node.addr, 200, Duration::from_secs(10)).await;
    println!("ready again {:?} after the drop", start.elapsed());
    assert!(
        proxy.accepted() > accepted_before,
        "new connections through the proxy"
    );

    publisher.publish("news", json!(2)).await;
    let mut got = client.recv().await;
    if got == delivery("news", json!({"caught":true})) {
        assert!(
            !caught_refused,
            "a publish answered `unavailable` is never delivered"
        );
        got = client.recv().await;
    }
    assert_eq!(
        got,
        delivery("news", json!(2)),
        "delivery after the reconnect"
    );
    expect_quiet(&mut client, "exactly once").await;
    let mut observer = node.client().await;
    assert_eq!(presence(&mut observer, "news").await, ids(&[&client]));
}
