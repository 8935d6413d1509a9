//! The backend's `__control` disconnect across nodes on one real Redis: every connection of the
//! user on every node is closed 1008 "disconnected", nobody else is touched, other control
//! messages are ignored, and the control channel survives a Redis restart like any channel.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use pubgate::Config;
use serde_json::json;
use tokio::time::Instant;

use common::redis::RedisServer;
use common::tokens::{hs256, now, SECRET};
use common::{close_code, http_get, rand_u32, start_node, test_config, Client, TestNode, WAIT};

fn node_config(redis: &RedisServer, prefix: &str) -> Config {
    Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.to_owned(),
        jwt_secret: Some(SECRET.into()),
        ..test_config()
    }
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "{addr} never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `n` nodes listen on the control channel.
async fn wait_control_subscribers(redis: &RedisServer, channel: &str, n: i64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.numsub(channel).await != n {
        assert!(
            Instant::now() < deadline,
            "{channel} never reached {n} subscribers"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn login(node: &TestNode, user: &str) -> Client {
    let token = hs256(&json!({"sub": user, "exp": now() + 300, "subscribe": ["*"]}));
    Client::connect_bearer(&node.ws_url(), &token).await
}

async fn expect_disconnected(client: &mut Client, who: &str) {
    let frame = client.expect_close().await;
    assert_eq!(close_code(&frame), Some(1008), "{who}: {frame:?}");
    assert_eq!(frame.unwrap().reason.as_str(), "disconnected", "{who}");
}

async fn still_open(client: &mut Client, who: &str) {
    let reply = client.request(json!({"type":"ping","id":who})).await;
    assert_eq!(reply, json!({"type":"pong","id":who}), "{who}");
}

/// A node is not ready before it can obey a disconnect: when `/readyz` first answers 200, Redis
/// already counts it on the control channel. Checked at a plain start and at a start while Redis
/// is down (the node keeps retrying until Redis comes up).
#[tokio::test]
async fn a_node_is_ready_only_once_it_listens_on_the_control_channel() {
    let mut redis = RedisServer::start().await;
    let prefix = format!("r{:08x}:", rand_u32());
    let control = format!("{prefix}__control");
    for round in 0..3 {
        let node = start_node(node_config(&redis, &prefix)).await;
        wait_ready(node.addr).await;
        assert_eq!(redis.numsub(&control).await, 1, "round {round}");
        node.stop().await.expect("clean stop");
        wait_control_subscribers(&redis, &control, 0).await;
    }

    redis.kill();
    let node = start_node(node_config(&redis, &prefix)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, body) = http_get(node.addr, "/readyz").await;
    assert_eq!(status, 503, "not ready while Redis is down: {body}");
    redis.restart().await;
    wait_ready(node.addr).await;
    assert_eq!(redis.numsub(&control).await, 1, "after Redis came up");
}

#[tokio::test]
async fn a_control_disconnect_closes_the_user_on_every_node() {
    let mut redis = RedisServer::start().await;
    let prefix = format!("c{:08x}:", rand_u32());
    let control = format!("{prefix}__control");
    let a = start_node(node_config(&redis, &prefix)).await;
    let b = start_node(node_config(&redis, &prefix)).await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    // Ready means listening on the control channel: no wait needed.
    assert_eq!(redis.numsub(&control).await, 2);

    let mut alice_a1 = login(&a, "alice").await;
    let mut alice_a2 = login(&a, "alice").await;
    let mut alice_b = login(&b, "alice").await;
    let mut bob_b = login(&b, "bob").await;
    let mut alice2_a = login(&a, "alice2").await;
    alice_a1.subscribe("room").await;
    alice_b.subscribe("room").await;

    // Ignored: other types, no user, not JSON, not an object.
    for payload in [
        r#"{"type":"kick","user":"alice"}"#,
        r#"{"type":"disconnect"}"#,
        r#"{"type":"disconnect","user":5}"#,
        "disconnect alice",
        r#"["disconnect","alice"]"#,
    ] {
        assert_eq!(redis.publish(&prefix, "__control", payload).await, 2);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (client, who) in [
        (&mut alice_a1, "alice a1"),
        (&mut alice_a2, "alice a2"),
        (&mut alice_b, "alice b"),
        (&mut bob_b, "bob"),
    ] {
        still_open(client, who).await;
    }

    let receivers = redis
        .publish(
            &prefix,
            "__control",
            r#"{"type":"disconnect","user":"alice"}"#,
        )
        .await;
    assert_eq!(receivers, 2, "both nodes listen on {control}");
    expect_disconnected(&mut alice_a1, "alice on a (1)").await;
    expect_disconnected(&mut alice_a2, "alice on a (2)").await;
    expect_disconnected(&mut alice_b, "alice on b").await;
    still_open(&mut bob_b, "bob").await;
    still_open(&mut alice2_a, "alice2 (a user id with alice as prefix)").await;
    let control_closes = |node: &TestNode| {
        let addr = node.addr;
        async move {
            let (_, body) = http_get(addr, "/metrics").await;
            common::metric_value(&body, "pubgate_disconnects_total{reason=\"control\"}")
        }
    };
    assert_eq!(control_closes(&a).await, Some(2.0));
    assert_eq!(control_closes(&b).await, Some(1.0));
    // Alice's presence is gone from her channels, cluster-wide.
    let deadline = Instant::now() + WAIT;
    loop {
        let reply = bob_b
            .request(json!({"type":"presence","channel":"room","id":1}))
            .await;
        if reply["count"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "alice still present: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Redis restarts empty: the nodes resubscribe the control channel with everything else.
    redis.kill();
    redis.restart().await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    wait_control_subscribers(&redis, &control, 2).await;
    let mut alice_again = login(&a, "alice").await;
    // bob's connection lived through the outage; disconnect him now, and alice on a.
    for user in ["bob", "alice"] {
        let msg = json!({"type":"disconnect","user":user}).to_string();
        assert_eq!(redis.publish(&prefix, "__control", msg).await, 2);
    }
    expect_disconnected(&mut bob_b, "bob after the restart").await;
    expect_disconnected(&mut alice_again, "alice after the restart").await;
    still_open(&mut alice2_a, "alice2 after the restart").await;
}
