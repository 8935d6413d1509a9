//! Where the v1.2 features meet (history and recovery, presence events, budgets, refresh):
//! a failed subscribe undoes everything, a replay larger than the send budget is bounded, and
//! every gauge returns to zero in a mixed scenario.

mod common;

use std::time::{Duration, Instant};

use pubgate::Config;
use serde_json::{json, Value};

use common::redis::RedisServer;
use common::tokens::{self, hs256, now};
use common::{http_get, rand_u32, start_node, test_config, Client, TestNode};

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(300);

async fn ready_node(config: Config) -> TestNode {
    let node = start_node(config).await;
    let start = Instant::now();
    while http_get(node.addr, "/readyz").await.0 != 200 {
        assert!(start.elapsed() < Duration::from_secs(15), "node not ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node
}

/// Waits until `sample` reads `want` (gauges settle after closes).
async fn settle(node: &TestNode, sample: &str, want: f64) {
    let start = Instant::now();
    loop {
        let got = node.metric(sample).await;
        if got == Some(want) {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{sample} is {got:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn gauges_zero(node: &TestNode) {
    for g in [
        "pubgate_subscriptions",
        "pubgate_channels",
        "pubgate_presence_members",
        "pubgate_send_queued_bytes",
    ] {
        settle(node, g, 0.0).await;
    }
}

#[tokio::test]
async fn a_subscribe_whose_history_read_fails_changes_nothing() {
    let redis = RedisServer::start().await;
    let prefix = format!("x{:08x}:", rand_u32());
    let node = ready_node(Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.clone(),
        history_size: 10,
        ..test_config()
    })
    .await;
    let mut c = node.client().await;
    // A channel whose history cannot be read: its meta key has the wrong type.
    let meta = format!("{prefix}__meta:{{{prefix}news}}");
    let _: () = redis.cmd(&["SET", &meta, "x"]).await;
    let reply = c
        .request(json!({"type":"subscribe","channel":"news","id":1,
            "since":{"epoch":"e","offset":0},"presence_events":true}))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    gauges_zero(&node).await;
    assert_eq!(redis.numsub(&format!("{prefix}news")).await, 0);
    assert_eq!(redis.numsub(&format!("{prefix}__presence:news")).await, 0);
    let p = c
        .request(json!({"type":"presence","channel":"news","id":2}))
        .await;
    assert_eq!(p["count"], 0, "{p}");
    let u = c
        .request(json!({"type":"unsubscribe","channel":"news","id":3}))
        .await;
    assert_eq!(u["code"], "not_subscribed", "{u}");

    // Subscribed while the history reads; a re-subscribe asking for events fails: the events
    // stay off (a failed request changes nothing).
    let _: () = redis.cmd(&["DEL", &meta]).await;
    let s = c
        .request(json!({"type":"subscribe","channel":"news","id":4}))
        .await;
    assert_eq!(s["type"], "subscribed", "{s}");
    let _: () = redis.cmd(&["SET", &meta, "x"]).await;
    let reply = c
        .request(json!({"type":"subscribe","channel":"news","id":5,"presence_events":true}))
        .await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(
        redis.numsub(&format!("{prefix}__presence:news")).await,
        0,
        "a failed subscribe left the presence events watched"
    );
    let _: () = redis.cmd(&["DEL", &meta]).await;
    drop(c);
    gauges_zero(&node).await;
    assert_eq!(redis.numsub(&format!("{prefix}news")).await, 0);
}

fn budget_config() -> Config {
    Config {
        history_size: 4000,
        send_buffer: 16 * 1024,
        ping_interval: Duration::from_millis(1000),
        pong_timeout: Duration::from_millis(1000),
        ..test_config()
    }
}

/// Publishes `n` messages of about `size` bytes through the HTTP-free path (a client).
async fn fill(node: &TestNode, channel: &str, n: usize, size: usize) -> String {
    let mut p = node.client().await;
    let blob = "x".repeat(size);
    let mut last = Value::Null;
    for i in 0..n {
        p.send(json!({"type":"publish","channel":channel,"data":{"i":i,"b":blob},"id":i}))
            .await;
    }
    for _ in 0..n {
        last = p.recv().await;
        assert_eq!(last["type"], "published", "{last}");
    }
    let s = p
        .request(json!({"type":"subscribe","channel":channel,"id":"s"}))
        .await;
    assert_eq!(s["offset"], n as u64, "{s} {last}");
    s["epoch"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_replay_larger_than_the_send_budget_reaches_a_reading_client() {
    let node = ready_node(budget_config()).await;
    let n = 3000;
    let epoch = fill(&node, "big", n, 2000).await;
    let mut c = node.client().await;
    c.send(json!({"type":"subscribe","channel":"big","id":1,"since":{"epoch":epoch,"offset":0}}))
        .await;
    let s = c.recv().await;
    assert_eq!(s["recovered"], true, "{s}");
    for i in 1..=n as u64 {
        let m = c.recv().await;
        assert_eq!(m["offset"], i, "{m}");
    }
    let p = c.request(json!({"type":"ping","id":2})).await;
    assert_eq!(p["type"], "pong");
}

#[tokio::test]
async fn a_client_that_never_reads_a_large_replay_is_closed_in_time() {
    let node = ready_node(budget_config()).await;
    let epoch = fill(&node, "big", 3000, 2000).await;
    let mut c = node.client().await;
    settle(&node, "pubgate_connections", 1.0).await;
    let started = Instant::now();
    c.send(json!({"type":"subscribe","channel":"big","id":1,"since":{"epoch":epoch,"offset":0}}))
        .await;
    // Never reads: the node must let go within ping interval + pong timeout (plus margin).
    settle(&node, "pubgate_connections", 0.0).await;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    gauges_zero(&node).await;
    drop(c);
}

fn token(subscribe: Value) -> String {
    hs256(&json!({"sub":"alice","exp":now()+600,"subscribe":subscribe,"publish":["*"]}))
}

/// The next message of `kind`, skipping presence events and deliveries.
async fn next_of(client: &mut Client, kind: &str) -> Value {
    loop {
        let m = client.recv().await;
        if m["type"] == kind || m["type"] == "error" {
            return m;
        }
    }
}

#[tokio::test]
async fn every_gauge_returns_to_zero_after_a_mixed_session() {
    let node = ready_node(Config {
        history_size: 50,
        jwt_secret: Some(tokens::SECRET.into()),
        send_queue: 8,
        ..test_config()
    })
    .await;
    let url = node.ws_url();
    let all = token(json!(["*"]));
    let mut a = Client::connect_bearer(&url, &all).await;
    let mut b = Client::connect_bearer(&url, &all).await;
    for ch in ["a", "b"] {
        a.send(json!({"type":"subscribe","channel":ch,"id":ch,"presence_events":true}))
            .await;
        let r = next_of(&mut a, "subscribed").await;
        assert_eq!(r["type"], "subscribed", "{r}");
    }
    b.send(
        json!({"type":"subscribe","channel":"a","id":1,"presence_events":true,
        "since":{"epoch":"nope","offset":0}}),
    )
    .await;
    let r = next_of(&mut b, "subscribed").await;
    assert_eq!(r["recovered"], false, "{r}");
    // Refresh revokes `a` on connection a (events watched, gated subscription).
    a.send(json!({"type":"refresh","token":token(json!(["b"])),"id":"r"}))
        .await;
    let r = next_of(&mut a, "unsubscribed").await;
    assert_eq!(r["reason"], "forbidden", "{r}");
    let r = next_of(&mut a, "refreshed").await;
    assert_eq!(r["type"], "refreshed", "{r}");
    settle(&node, "pubgate_subscriptions", 2.0).await;
    // b sees a's leave of `a`.
    let l = next_of(&mut b, "leave").await;
    assert_eq!(l["member"]["conn_id"], a.conn_id(), "{l}");
    // Nothing of `a` reaches a any more: neither messages nor events.
    let r = b
        .request(json!({"type":"publish","channel":"a","data":"after","id":"p"}))
        .await;
    assert_eq!(r["offset"], 1, "{r}");
    let mut d = Client::connect_bearer(&url, &all).await;
    d.send(json!({"type":"subscribe","channel":"a","id":"d"}))
        .await;
    assert_eq!(next_of(&mut d, "subscribed").await["type"], "subscribed");
    assert_eq!(
        next_of(&mut b, "join").await["member"]["conn_id"],
        d.conn_id()
    );
    assert_eq!(a.recv_within(QUIET).await, None);
    // A slow consumer: c never reads while b floods `b` with large messages.
    let mut c = Client::connect_bearer(&url, &all).await;
    c.send(json!({"type":"subscribe","channel":"b","id":"s","presence_events":true}))
        .await;
    let r = next_of(&mut c, "subscribed").await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let blob = "y".repeat(50_000);
    for i in 0..400 {
        b.send(json!({"type":"publish","channel":"b","data":{"i":i,"b":blob}}))
            .await;
    }
    let start = Instant::now();
    while node
        .metric("pubgate_disconnects_total{reason=\"slow_consumer\"}")
        .await
        < Some(1.0)
    {
        assert!(start.elapsed() < WAIT, "no slow consumer closed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(QUIET).await;
    drop((a, b, c, d));
    settle(&node, "pubgate_connections", 0.0).await;
    gauges_zero(&node).await;
}

#[tokio::test]
async fn a_slow_but_reading_client_gets_a_replay_longer_than_the_pong_deadline() {
    let node = ready_node(Config {
        history_size: 6000,
        ping_interval: Duration::from_millis(1000),
        pong_timeout: Duration::from_millis(1500),
        ..budget_config()
    })
    .await;
    let n = 6000;
    let epoch = fill(&node, "big", n, 4000).await;
    let mut c = node.client().await;
    c.send(json!({"type":"subscribe","channel":"big","id":1,"since":{"epoch":epoch,"offset":0}}))
        .await;
    let s = c.recv().await;
    assert_eq!(s["recovered"], true, "{s}");
    // Reads on (answering pings) at about 3 MB/s, slower than the node could send: the replay
    // (24 MB, more than the kernel's socket buffers hold) keeps the node's reader waiting for
    // room longer than ping interval + pong timeout, while the socket keeps accepting bytes.
    let started = Instant::now();
    for i in 1..=n as u64 {
        let m = c.recv().await;
        assert_eq!(m["offset"], i, "{m}");
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
    }
    assert!(
        started.elapsed() > Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let p = c.request(json!({"type":"ping","id":2})).await;
    assert_eq!(p["type"], "pong");
    assert_eq!(
        node.metric("pubgate_disconnects_total{reason=\"pong_timeout\"}")
            .await,
        Some(0.0)
    );
}

const API_KEY: &str = "crossing-api-key-0123456789";

async fn api_post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, String) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: apikey {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    common::http_request(addr, &request).await
}

#[tokio::test]
async fn the_api_on_the_internal_listener_publishes_with_offsets_and_disconnects_on_two_nodes() {
    let redis = RedisServer::start().await;
    let prefix = format!("x{:08x}:", rand_u32());
    let config = || Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.clone(),
        history_size: 10,
        jwt_secret: Some(tokens::SECRET.into()),
        api_key: Some(API_KEY.into()),
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    };
    let a = ready_node(config()).await;
    let b = ready_node(config()).await;
    let ia = a.internal.unwrap();
    let alice = token(json!(["news"]));
    let mut on_a = Client::connect_bearer(&a.ws_url(), &alice).await;
    let mut on_b = Client::connect_bearer(&b.ws_url(), &alice).await;
    for c in [&mut on_a, &mut on_b] {
        let r = c
            .request(json!({"type":"subscribe","channel":"news","presence_events":true}))
            .await;
        assert_eq!(r["type"], "subscribed", "{r}");
    }
    // The client address knows nothing of the API, key or not.
    let (status, _) = api_post(a.addr, "/api/publish", r#"{"channel":"news","data":1}"#).await;
    assert_eq!(status, 404);
    let (status, body) = api_post(ia, "/api/publish", r#"{"channel":"news","data":1}"#).await;
    assert_eq!((status, body.as_str()), (200, r#"{"offset":1}"#));
    for c in [&mut on_a, &mut on_b] {
        let m = next_of(c, "message").await;
        assert_eq!(m["offset"], 1, "{m}");
    }
    let (status, _) = api_post(ia, "/api/disconnect", r#"{"user":"alice"}"#).await;
    assert_eq!(status, 200);
    for c in [&mut on_a, &mut on_b] {
        let frame = c.expect_close().await;
        assert_eq!(common::close_code(&frame), Some(1008));
    }
    for node in [&a, &b] {
        settle(node, "pubgate_connections", 0.0).await;
        gauges_zero(node).await;
    }
    assert_eq!(redis.numsub(&format!("{prefix}news")).await, 0);
    assert_eq!(redis.numsub(&format!("{prefix}__presence:news")).await, 0);
}

#[tokio::test]
async fn a_recovery_larger_than_the_send_budget_survives_live_traffic() {
    let node = ready_node(Config {
        history_size: 4000,
        send_buffer: 64 * 1024,
        ..test_config()
    })
    .await;
    let n = 3000;
    let epoch = fill(&node, "big", n, 2000).await;
    let mut live = node.client().await;
    let mut c = node.client().await;
    c.send(json!({"type":"subscribe","channel":"big","id":1,"since":{"epoch":epoch,"offset":0}}))
        .await;
    // Live messages keep coming while the replay is sent (a few, far fewer than the budget holds).
    let publisher = tokio::spawn(async move {
        let blob = "z".repeat(2000);
        for i in 0..20 {
            live.send(json!({"type":"publish","channel":"big","data":{"live":i,"b":blob}}))
                .await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        live
    });
    let s = c.recv().await;
    assert_eq!(s["recovered"], true, "{s}");
    for i in 1..=(n + 20) as u64 {
        let m = c.recv().await;
        assert_eq!(m["offset"], i, "{m}");
    }
    drop(publisher.await.unwrap());
    assert_eq!(
        node.metric("pubgate_disconnects_total{reason=\"slow_consumer\"}")
            .await,
        Some(0.0)
    );
}

#[tokio::test]
async fn recovery_and_presence_events_together_and_the_events_toggle() {
    let node = ready_node(Config {
        history_size: 10,
        ..test_config()
    })
    .await;
    let mut p = node.client().await;
    let r = p
        .request(json!({"type":"publish","channel":"t","data":1,"id":1}))
        .await;
    let offset = r["offset"].as_u64().unwrap();
    let s = p
        .request(json!({"type":"history","channel":"t","id":2}))
        .await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    p.request(json!({"type":"publish","channel":"t","data":2,"id":3}))
        .await;
    let mut a = node.client().await;
    a.send(
        json!({"type":"subscribe","channel":"t","id":1,"presence_events":true,
        "since":{"epoch":epoch,"offset":offset}}),
    )
    .await;
    let s = a.recv().await;
    assert_eq!(
        (s["type"].as_str(), s["recovered"].as_bool()),
        (Some("subscribed"), Some(true)),
        "{s}"
    );
    let m = a.recv().await;
    assert_eq!(
        (m["offset"].as_u64(), &m["data"]),
        (Some(offset + 1), &json!(2)),
        "{m}"
    );
    let mut b = node.client().await;
    let r = b
        .request(json!({"type":"subscribe","channel":"t","id":9}))
        .await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let j = a.recv().await;
    assert_eq!(
        (j["type"].as_str(), j["member"]["conn_id"].as_str()),
        (Some("join"), Some(b.conn_id())),
        "{j}"
    );
    // Toggle the events off with a re-subscribe (position reported, nothing replayed).
    let s = a
        .request(json!({"type":"subscribe","channel":"t","id":2,
            "since":{"epoch":epoch,"offset":0}}))
        .await;
    assert_eq!(
        (s["type"].as_str(), s["recovered"].as_bool()),
        (Some("subscribed"), Some(false)),
        "{s}"
    );
    assert_eq!(s["offset"], offset + 1);
    drop(b);
    assert_eq!(a.recv_within(QUIET).await, None);
    drop((a, p));
    settle(&node, "pubgate_connections", 0.0).await;
    gauges_zero(&node).await;
}
