//! History and recovery (contract v1.2): offsets, epochs, `since`, the `history` request, on the
//! embedded broker and on several nodes sharing one real Redis; the recovery race under load; a
//! SIGKILLed node's clients recovering on another node.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubgate::Config;
use serde_json::{json, Value};

use common::redis::RedisServer;
use common::{http_get, rand_u32, start_node, test_config, Client, TestNode};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

fn random_prefix() -> String {
    format!("h{:08x}:", rand_u32())
}

fn history_config(size: usize) -> Config {
    Config {
        history_size: size,
        ..test_config()
    }
}

fn redis_config(url: &str, prefix: &str, size: usize) -> Config {
    Config {
        redis_url: Some(url.to_owned()),
        channel_prefix: prefix.to_owned(),
        ..history_config(size)
    }
}

async fn wait_ready(addr: SocketAddr) {
    let start = Instant::now();
    loop {
        let listening = tokio::net::TcpStream::connect(addr).await.is_ok();
        if listening && http_get(addr, "/readyz").await.0 == 200 {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{addr} not ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready_node(config: Config) -> TestNode {
    let node = start_node(config).await;
    wait_ready(node.addr).await;
    node
}

/// Subscribes (with `since` when given) and returns the `subscribed` reply.
async fn subscribe(client: &mut Client, channel: &str, since: Option<(&str, u64)>) -> Value {
    let mut msg = json!({"type":"subscribe","channel":channel,"id":"s"});
    if let Some((epoch, offset)) = since {
        msg["since"] = json!({"epoch":epoch,"offset":offset});
    }
    let reply = client.request(msg).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

async fn publish(client: &mut Client, channel: &str, data: Value) -> u64 {
    let reply = client
        .request(json!({"type":"publish","channel":channel,"data":data,"id":"p"}))
        .await;
    assert_eq!(reply["type"], "published", "{reply}");
    reply["offset"]
        .as_u64()
        .expect("published carries the offset")
}

/// The next message must be a delivery of `data` at `offset`.
async fn expect_delivery(client: &mut Client, channel: &str, data: Value, offset: u64) {
    let got = client.recv().await;
    assert_eq!(
        got,
        json!({"type":"message","channel":channel,"data":data,"offset":offset})
    );
}

async fn expect_quiet(client: &mut Client) {
    if let Some(got) = client.recv_within(QUIET).await {
        panic!("unexpected message {got}");
    }
}

fn epoch_of(reply: &Value) -> String {
    reply["epoch"].as_str().expect("an epoch").to_owned()
}

/// FCALL pubgate_publish from a backend; retried while the nodes are still loading the library.
async fn fcall(redis: &RedisServer, prefix: &str, channel: &str, payload: &str) -> u64 {
    let key = format!("{prefix}{channel}");
    let mut conn = redis.connection().await;
    let start = Instant::now();
    loop {
        let result: redis::RedisResult<u64> = redis::cmd("FCALL")
            .arg("pubgate_publish")
            .arg(1)
            .arg(&key)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        match result {
            Ok(offset) => return offset,
            Err(e) if start.elapsed() < WAIT => {
                eprintln!("fcall not yet: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("FCALL failed: {e}"),
        }
    }
}

/// The basic behaviour on any setup: `subscribed` with epoch/offset, positioned deliveries,
/// recovery, trimmed history, the `history` request and bad inputs.
async fn behaviours(a: &TestNode, b: &TestNode, size: usize) {
    let channel = format!("news{}", rand_u32());
    let mut sub_a = a.client().await;
    let mut sub_b = b.client().await;
    let first = subscribe(&mut sub_a, &channel, None).await;
    assert_eq!(first["offset"], 0);
    let epoch = epoch_of(&first);
    let second = subscribe(&mut sub_b, &channel, None).await;
    assert_eq!(epoch_of(&second), epoch, "one epoch for every node");
    assert!(second.get("recovered").is_none());

    let mut publisher = a.client().await;
    for i in 1..=3u64 {
        assert_eq!(publish(&mut publisher, &channel, json!({"n": i})).await, i);
    }
    for sub in [&mut sub_a, &mut sub_b] {
        for i in 1..=3u64 {
            expect_delivery(sub, &channel, json!({"n": i}), i).await;
        }
    }

    // Recovery from offset 1 on the other node: 2 and 3 replayed, then live.
    let mut late = b.client().await;
    let reply = subscribe(&mut late, &channel, Some((&epoch, 1))).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["offset"], 3);
    expect_delivery(&mut late, &channel, json!({"n": 2}), 2).await;
    expect_delivery(&mut late, &channel, json!({"n": 3}), 3).await;
    assert_eq!(publish(&mut publisher, &channel, json!({"n": 4})).await, 4);
    expect_delivery(&mut late, &channel, json!({"n": 4}), 4).await;
    expect_quiet(&mut late).await;

    // Up to date: recovered, nothing replayed.
    let mut current = a.client().await;
    let reply = subscribe(&mut current, &channel, Some((&epoch, 4))).await;
    assert_eq!(reply["recovered"], true);
    expect_quiet(&mut current).await;

    // Another epoch, a future offset, trimmed messages: recovered false, no replay.
    let mut trimmed_from = 0;
    for i in 5..=(size as u64 + 6) {
        publish(&mut publisher, &channel, json!({"n": i})).await;
        trimmed_from = i;
    }
    for since in [("not-the-epoch", 1), (&epoch[..], 1000), (&epoch[..], 1)] {
        let mut c = b.client().await;
        let reply = subscribe(&mut c, &channel, Some(since)).await;
        assert_eq!(reply["recovered"], false, "{since:?}: {reply}");
        assert_eq!(reply["offset"], trimmed_from);
        expect_quiet(&mut c).await;
        publish(&mut publisher, &channel, json!("live")).await;
        let got = c.recv().await;
        assert_eq!(
            got["data"], "live",
            "live delivery starts as for a plain subscribe"
        );
        trimmed_from += 1;
    }

    // history: newest `limit`, oldest first; clamped to the size; 0 gives only the position.
    let reply = publisher
        .request(json!({"type":"history","channel":channel,"limit":2,"id":7}))
        .await;
    assert_eq!(reply["type"], "history");
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["epoch"], epoch.as_str());
    assert_eq!(reply["offset"], trimmed_from);
    let offsets: Vec<u64> = reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![trimmed_from - 1, trimmed_from]);
    assert_eq!(reply["messages"][1]["data"], "live");
    for limit in [json!(null), json!(1_000_000)] {
        let mut msg = json!({"type":"history","channel":channel});
        msg["limit"] = limit;
        let reply = publisher.request(msg).await;
        assert_eq!(reply["messages"].as_array().unwrap().len(), size);
    }
    let reply = publisher
        .request(json!({"type":"history","channel":channel,"limit":0}))
        .await;
    assert_eq!(reply["messages"], json!([]));

    // Bad inputs: a clear bad_request, the connection stays usable.
    for bad in [
        json!({"type":"subscribe","channel":channel,"since":5,"id":1}),
        json!({"type":"subscribe","channel":channel,"since":{"epoch":1,"offset":1},"id":1}),
        json!({"type":"subscribe","channel":channel,"since":{"epoch":"e"},"id":1}),
        json!({"type":"subscribe","channel":channel,"since":{"epoch":"e","offset":-1},"id":1}),
        json!({"type":"subscribe","channel":channel,"since":{"epoch":"e","offset":1.5},"id":1}),
        json!({"type":"subscribe","channel":channel,"since":{"epoch":"e","offset":"1"},"id":1}),
        json!({"type":"history","channel":channel,"limit":-1,"id":1}),
        json!({"type":"history","channel":channel,"limit":"5","id":1}),
    ] {
        let reply = publisher.request(bad.clone()).await;
        assert_eq!(reply["type"], "error", "{bad}: {reply}");
        assert_eq!(reply["code"], "bad_request", "{bad}: {reply}");
        assert_eq!(reply["id"], 1);
    }
    let reply = publisher
        .request(json!({"type":"history","channel":"__control","id":1}))
        .await;
    assert_eq!(reply["code"], "invalid_channel");
}

#[tokio::test]
async fn embedded_broker_offsets_recovery_and_history() {
    let node = ready_node(history_config(5)).await;
    behaviours(&node, &node, 5).await;
    let text = node.http_get("/metrics").await.1;
    assert!(
        text.contains("pubgate_recoveries_total{outcome=\"recovered\"} 2"),
        "{text}"
    );
    assert!(text.contains("pubgate_recoveries_total{outcome=\"not_recovered\"} 3"));
    assert!(text.contains("pubgate_replayed_messages_total 2"));
}

#[tokio::test]
async fn two_nodes_on_redis_share_offsets_and_history() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let a = ready_node(redis_config(&redis.url(), &prefix, 5)).await;
    let b = ready_node(redis_config(&redis.url(), &prefix, 5)).await;
    behaviours(&a, &b, 5).await;
    let keys: Vec<String> = redis.keys(&format!("{prefix}*")).await;
    assert!(
        keys.iter()
            .any(|k| k.starts_with(&format!("{prefix}__history:{{{prefix}news"))),
        "cluster-ready key names: {keys:?}"
    );
}

#[tokio::test]
async fn backends_fcall_and_raw_publish_on_redis() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let a = ready_node(redis_config(&redis.url(), &prefix, 10)).await;
    let b = ready_node(redis_config(&redis.url(), &prefix, 10)).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    subscribe(&mut on_a, "feed", None).await;
    subscribe(&mut on_b, "feed", None).await;
    assert_eq!(fcall(&redis, &prefix, "feed", r#"{"x":1}"#).await, 1);
    assert_eq!(fcall(&redis, &prefix, "feed", "hello").await, 2);
    redis.publish(&prefix, "feed", r#"{"raw":true}"#).await;
    for c in [&mut on_a, &mut on_b] {
        expect_delivery(c, "feed", json!({"x":1}), 1).await;
        expect_delivery(c, "feed", json!("hello"), 2).await;
        assert_eq!(
            c.recv().await,
            json!({"type":"message","channel":"feed","data":{"raw":true}}),
            "a raw PUBLISH passes without an offset"
        );
    }
    // What a backend that SUBSCRIBEs sees: RS <offset> ':' <epoch> LF <payload>.
    let mut raw = redis.subscriber(&format!("{prefix}feed")).await;
    fcall(&redis, &prefix, "feed", "[3]").await;
    let (_, payload) = raw.next_within(WAIT).await.expect("positioned payload");
    let mut asker = a.client().await;
    let epoch = epoch_of(
        &asker
            .request(json!({"type":"history","channel":"feed","limit":0}))
            .await,
    );
    assert_eq!(payload, format!("\x1e3:{epoch}\n[3]").into_bytes());
    // A wrong key is refused by the function, nothing is published.
    let err: redis::RedisResult<u64> = redis::cmd("FCALL")
        .arg("pubgate_publish")
        .arg(1)
        .arg("other:feed")
        .arg("x")
        .query_async(&mut redis.connection().await)
        .await;
    assert!(err.is_err());
}

#[tokio::test]
async fn the_epoch_changes_when_history_expires() {
    for redis in [None, Some(RedisServer::start().await)] {
        let prefix = random_prefix();
        let mut config = match &redis {
            Some(r) => redis_config(&r.url(), &prefix, 10),
            None => history_config(10),
        };
        config.history_ttl = Duration::from_secs(1);
        let node = ready_node(config).await;
        let mut c = node.client().await;
        publish(&mut c, "ttl", json!(1)).await;
        let state = c
            .request(json!({"type":"history","channel":"ttl","limit":0}))
            .await;
        let epoch = epoch_of(&state);
        assert_eq!(state["offset"], 1);
        tokio::time::sleep(Duration::from_millis(2200)).await;
        let mut again = node.client().await;
        let reply = subscribe(&mut again, "ttl", Some((&epoch, 1))).await;
        assert_eq!(reply["recovered"], false, "{reply}");
        assert_ne!(
            epoch_of(&reply),
            epoch,
            "a new epoch after the history expired"
        );
        assert_eq!(reply["offset"], 0);
        assert_eq!(publish(&mut c, "ttl", json!(2)).await, 1, "offsets restart");
        expect_delivery(&mut again, "ttl", json!(2), 1).await;
        if let Some(r) = &redis {
            // Expired on Redis too: no keys linger after the TTL.
            tokio::time::sleep(Duration::from_millis(2200)).await;
            let mut left = r.keys(&format!("{prefix}__history*")).await;
            left.extend(r.keys(&format!("{prefix}__meta*")).await);
            assert!(left.is_empty(), "{left:?}");
        }
    }
}

#[tokio::test]
async fn a_redis_restart_starts_a_new_epoch_and_never_replays_wrongly() {
    let mut redis = RedisServer::start().await;
    let prefix = random_prefix();
    let node = ready_node(redis_config(&redis.url(), &prefix, 10)).await;
    let mut c = node.client().await;
    for i in 1..=3 {
        publish(&mut c, "r", json!(i)).await;
    }
    let epoch = epoch_of(
        &c.request(json!({"type":"history","channel":"r","limit":0}))
            .await,
    );
    redis.restart().await;
    wait_ready(node.addr).await;
    // The restarted Redis has no function library: the node loads it again on first use.
    let mut d = node.client().await;
    let reply = subscribe(&mut d, "r", Some((&epoch, 1))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_ne!(epoch_of(&reply), epoch);
    expect_quiet(&mut d).await;
    assert_eq!(publish(&mut c, "r", json!("after")).await, 1);
    expect_delivery(&mut d, "r", json!("after"), 1).await;
}

#[tokio::test]
async fn history_off_keeps_v1_bytes_and_refuses_history() {
    let node = ready_node(test_config()).await;
    let mut c = node.client().await;
    let reply = c
        .request(json!({"type":"subscribe","channel":"v1","id":1,"since":{"epoch":"e","offset":1}}))
        .await;
    assert_eq!(reply, json!({"type":"subscribed","channel":"v1","id":1}));
    let mut publisher = node.client().await;
    publisher.publish("v1", json!({"a":1})).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"v1","data":{"a":1}})
    );
    let reply = c
        .request(json!({"type":"history","channel":"v1","id":2}))
        .await;
    assert_eq!(reply["code"], "unsupported");
}

/// Several publishers publish continuously while hundreds of clients first follow the channel on
/// one node, drop, and come back with `since` on the other: each client's offsets must be exactly
/// since+1 .. the final one, with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_race_under_continuous_publishing() {
    const CLIENTS: usize = 240;
    const PUBLISHERS: usize = 3;
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let nodes = Arc::new([
        ready_node(redis_config(&redis.url(), &prefix, 20_000)).await,
        ready_node(redis_config(&redis.url(), &prefix, 20_000)).await,
    ]);
    let channel = "race";
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (nodes, stop) = (nodes.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut c = nodes[p % 2].client().await;
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                last = publish(&mut c, channel, json!({"p": p})).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            last
        }));
    }
    let started = Instant::now();
    let mut clients = Vec::new();
    let gate = Arc::new(tokio::sync::Semaphore::new(40));
    for i in 0..CLIENTS {
        let (nodes, gate) = (nodes.clone(), gate.clone());
        clients.push(tokio::spawn(async move {
            // Spread over ~2.4 s so the reconnects overlap continuous publishing.
            tokio::time::sleep(Duration::from_millis(10 * i as u64)).await;
            let _permit = gate.acquire_owned().await.unwrap();
            let mut first = nodes[i % 2].client().await;
            let reply = subscribe(&mut first, channel, None).await;
            let epoch = epoch_of(&reply);
            let mut last = reply["offset"].as_u64().unwrap();
            for _ in 0..(1 + i % 4) {
                let m = first.recv().await;
                last = m["offset"].as_u64().unwrap();
            }
            drop(first);
            let mut second = nodes[(i + 1) % 2].client().await;
            let reply = subscribe(&mut second, channel, Some((&epoch, last))).await;
            assert_eq!(reply["recovered"], true, "client {i}: {reply}");
            (second, last)
        }));
    }
    let mut resumed = Vec::new();
    for c in clients {
        resumed.push(c.await.unwrap());
    }
    let reconnect_time = started.elapsed();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut final_offset = 0;
    for p in publishers {
        final_offset = final_offset.max(p.await.unwrap());
    }
    let mut checks = Vec::new();
    for (i, (mut c, since)) in resumed.into_iter().enumerate() {
        checks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while seen.last().copied().unwrap_or(since) < final_offset {
                let m = c
                    .recv_within(Duration::from_secs(20))
                    .await
                    .unwrap_or_else(|| panic!("client {i}: stalled after {:?}", seen.last()));
                seen.push(m["offset"].as_u64().unwrap());
            }
            let expected: Vec<u64> = (since + 1..=final_offset).collect();
            assert_eq!(seen, expected, "client {i} since {since}");
            seen.len()
        }));
    }
    let mut total = 0;
    for c in checks {
        total += c.await.unwrap();
    }
    println!(
        "recovery race: {CLIENTS} clients resumed on the other node in {reconnect_time:?} while \
         {PUBLISHERS} publishers sent {final_offset} messages; {total} deliveries checked, \
         each client exactly since+1..={final_offset}"
    );
    assert!(
        final_offset > 100,
        "publishing went on during the reconnects"
    );
}

/// Clients follow a channel on node A (the release binary); A is SIGKILLed while publishing goes
/// on through node B; the clients reconnect to B with `since` and get every offset exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_after_sigkill_loses_nothing() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_pubgate"))
        .env("PUBGATE_LISTEN", format!("127.0.0.1:{port}"))
        .env("PUBGATE_REDIS_URL", redis.url())
        .env("PUBGATE_CHANNEL_PREFIX", &prefix)
        .env("PUBGATE_HISTORY_SIZE", "10000")
        .env("PUBGATE_RATE_LIMIT", "0")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the release binary");
    // Killed on every path out of the test, a panic included.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut child = KillOnDrop(child);
    let a_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_ready(a_addr).await;
    let b = ready_node(redis_config(&redis.url(), &prefix, 10_000)).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(&format!("ws://{a_addr}/ws")).await;
        let reply = subscribe(&mut c, "fo", None).await;
        clients.push((c, epoch_of(&reply), 0u64));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, stop) = (b.ws_url(), stop.clone());
        tokio::spawn(async move {
            let mut c = Client::connect(&url).await;
            let mut last = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                last = publish(&mut c, "fo", json!("m")).await;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            last
        })
    };
    // Let the clients receive some, then kill A mid-stream.
    for (c, _, last) in clients.iter_mut() {
        for _ in 0..5 {
            *last = c.recv().await["offset"].as_u64().unwrap();
        }
    }
    child.0.kill().expect("SIGKILL node A");
    let _ = child.0.wait();
    // Each client read what arrived before the socket died.
    for (c, _, last) in clients.iter_mut() {
        use futures_util::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        // Until the reset (or a quiet moment): the socket died with the process.
        while let Ok(Some(Ok(msg))) =
            tokio::time::timeout(Duration::from_millis(200), c.ws.next()).await
        {
            if let Message::Text(t) = msg {
                let m: Value = serde_json::from_str(&t).unwrap();
                *last = m["offset"].as_u64().unwrap();
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut resumed = Vec::new();
    for (old, epoch, last) in clients {
        drop(old);
        let mut c = b.client().await;
        let reply = subscribe(&mut c, "fo", Some((&epoch, last))).await;
        assert_eq!(reply["recovered"], true, "{reply}");
        resumed.push((c, last));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let final_offset = publisher.await.unwrap();
    let mut seen_total = 0;
    for (mut c, since) in resumed {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        while order.last().copied().unwrap_or(since) < final_offset {
            let m = c.recv().await;
            let o = m["offset"].as_u64().unwrap();
            assert!(seen.insert(o), "duplicate {o}");
            order.push(o);
        }
        assert_eq!(order, (since + 1..=final_offset).collect::<Vec<_>>());
        seen_total += order.len();
    }
    println!("failover: 20 clients recovered {seen_total} messages on node B after SIGKILL of A (final offset {final_offset})");
}
