//! Presence v2 end to end, over real sockets: join/leave events across nodes (Redis) and on an
//! embedded node, their order per member, leaves for a SIGKILLed node (the release binary as a
//! child process) within the presence TTL, a drain's batched leaves, `info` from the token
//! (and 401 for a bad one), capped replies with an exact count, a count-only query on a 20k-member
//! channel, and the reserved `__presence:` names.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pubgate::presence::{Member, Presence, RedisPresence};
use pubgate::redis_commands::RedisCommands;
use pubgate::Config;
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use common::raw::http_exchange;
use common::redis::RedisServer;
use common::tokens::{self, hs256, now};
use common::{http_get, rand_u32, start_node, test_config, Client, TestNode, WAIT};

/// The presence TTL of these tests' nodes.
const TTL: Duration = Duration::from_secs(3);
/// The contract's bound from a `subscribed`/`unsubscribed` reply (or a close) to the event.
const EVENT_BOUND: Duration = Duration::from_secs(1);

fn random_prefix() -> String {
    format!("pe{:08x}:", rand_u32())
}

fn redis_config(url: &str, prefix: &str) -> Config {
    Config {
        redis_url: Some(url.to_owned()),
        channel_prefix: prefix.to_owned(),
        presence_ttl: TTL,
        ..test_config()
    }
}

async fn wait_ready(addr: SocketAddr) {
    let start = Instant::now();
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{addr} not ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn redis_node(redis: &RedisServer, prefix: &str) -> TestNode {
    let node = start_node(redis_config(&redis.url(), prefix)).await;
    wait_ready(node.addr).await;
    node
}

/// Subscribes with presence events on.
async fn watch(client: &mut Client, channel: &str) {
    let reply = client
        .request(json!({"type":"subscribe","channel":channel,"presence_events":true,"id":"w"}))
        .await;
    assert_eq!(
        reply,
        json!({"type":"subscribed","channel":channel,"id":"w"})
    );
}

/// The next event (join or leave) within `wait`, skipping nothing: anything else is a failure.
async fn next_event(client: &mut Client, wait: Duration) -> Option<Value> {
    let msg = client.recv_within(wait).await?;
    assert!(
        msg["type"] == "join" || msg["type"] == "leave",
        "expected an event, got {msg}"
    );
    Some(msg)
}

/// Asserts the next event is `kind` for `conn_id` on `channel`, within the contract's bound
/// (plus margin for a loaded machine); returns it.
async fn expect_event(client: &mut Client, kind: &str, channel: &str, conn_id: &str) -> Value {
    let start = Instant::now();
    let event = next_event(client, EVENT_BOUND * 2)
        .await
        .unwrap_or_else(|| panic!("no {kind} of {conn_id} within {:?}", EVENT_BOUND * 2));
    assert_eq!(
        (
            event["type"].as_str(),
            event["channel"].as_str(),
            event["member"]["conn_id"].as_str()
        ),
        (Some(kind), Some(channel), Some(conn_id)),
        "{event}"
    );
    assert!(
        start.elapsed() <= EVENT_BOUND,
        "{kind} took {:?}",
        start.elapsed()
    );
    event
}

async fn expect_no_event(client: &mut Client, wait: Duration) {
    if let Some(msg) = client.recv_within(wait).await {
        panic!("unexpected message {msg}");
    }
}

async fn presence(client: &mut Client, channel: &str, count_only: bool) -> Value {
    let reply = client
        .request(json!({"type":"presence","channel":channel,"count_only":count_only,"id":"p"}))
        .await;
    assert_eq!(reply["type"], "presence", "{reply}");
    reply
}

// ---------------------------------------------------------------------------------------------

/// Watchers on two nodes see every other connection's joins and leaves, from either node, in
/// order per member (a quick subscribe/unsubscribe churn included), never their own, and nothing
/// after they stop watching.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_watchers_on_every_node_in_order_but_not_their_own() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let (a, b) = (
        redis_node(&redis, &prefix).await,
        redis_node(&redis, &prefix).await,
    );
    let mut watcher_a = a.client().await;
    let mut watcher_b = b.client().await;
    watch(&mut watcher_a, "room").await;
    watch(&mut watcher_b, "room").await;
    // a sees b's join; b never sees its own.
    let joined = expect_event(&mut watcher_a, "join", "room", watcher_b.conn_id()).await;
    assert_eq!(
        joined["member"],
        json!({"conn_id": watcher_b.conn_id(), "node": b.node_id, "user": null})
    );

    // A plain subscriber on b, then on a: both watchers see both, with the node.
    let mut x = b.client().await;
    x.subscribe("room").await;
    for w in [&mut watcher_a, &mut watcher_b] {
        let e = expect_event(w, "join", "room", x.conn_id()).await;
        assert_eq!(e["member"]["node"], b.node_id.as_str());
    }
    let mut y = a.client().await;
    y.subscribe("room").await;
    for w in [&mut watcher_a, &mut watcher_b] {
        expect_event(w, "join", "room", y.conn_id()).await;
    }

    // Churn: 20 subscribe/unsubscribe rounds of x as fast as it can; both watchers see 40
    // events alternating join/leave, in order.
    for _ in 0..20 {
        x.request(json!({"type":"unsubscribe","channel":"room"}))
            .await;
        x.subscribe("room").await;
    }
    for w in [&mut watcher_a, &mut watcher_b] {
        for i in 0..40 {
            let kind = if i % 2 == 0 { "leave" } else { "join" };
            expect_event(w, kind, "room", x.conn_id()).await;
        }
    }

    // Events of other channels never arrive; a leave by close arrives within the bound.
    let mut z = a.client().await;
    z.subscribe("elsewhere").await;
    drop(z);
    drop(y);
    let y_id = {
        let e = next_event(&mut watcher_b, EVENT_BOUND * 2)
            .await
            .expect("y's leave");
        assert_eq!(
            (e["type"].as_str(), e["channel"].as_str()),
            (Some("leave"), Some("room"))
        );
        e["member"]["conn_id"].as_str().unwrap().to_owned()
    };
    expect_event(&mut watcher_a, "leave", "room", &y_id).await;

    // Re-subscribing without the flag stops the events (the last subscribe wins).
    watcher_b.subscribe("room").await;
    x.request(json!({"type":"unsubscribe","channel":"room"}))
        .await;
    expect_event(&mut watcher_a, "leave", "room", x.conn_id()).await;
    expect_no_event(&mut watcher_b, Duration::from_millis(500)).await;

    // A watcher that unsubscribes gets nothing more, and never its own leave.
    let reply = watcher_a
        .request(json!({"type":"unsubscribe","channel":"room","id":1}))
        .await;
    assert_eq!(reply["type"], "unsubscribed", "{reply}");
    x.subscribe("room").await;
    expect_no_event(&mut watcher_a, Duration::from_millis(500)).await;
    assert_eq!(
        a.metric("pubgate_presence_events_published_total{type=\"join\"}")
            .await
            .map(|v| v > 0.0),
        Some(true)
    );
}

/// The embedded node: the same events through the memory broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_node_delivers_events_too() {
    let node = start_node(test_config()).await;
    let mut watcher = node.client().await;
    watch(&mut watcher, "room").await;
    let mut x = node.client().await;
    x.subscribe("room").await;
    expect_event(&mut watcher, "join", "room", x.conn_id()).await;
    x.request(json!({"type":"unsubscribe","channel":"room"}))
        .await;
    expect_event(&mut watcher, "leave", "room", x.conn_id()).await;
    x.subscribe("room").await;
    expect_event(&mut watcher, "join", "room", x.conn_id()).await;
    let id = x.conn_id().to_owned();
    drop(x);
    expect_event(&mut watcher, "leave", "room", &id).await;
    assert_eq!(node.metric("pubgate_presence_members").await, Some(1.0));
    assert_eq!(
        node.metric("pubgate_presence_events_published_total{type=\"leave\"}")
            .await,
        Some(2.0)
    );
    // Event watching is not a subscription of its own.
    assert_eq!(node.metric("pubgate_subscriptions").await, Some(1.0));
    assert_eq!(node.metric("pubgate_channels").await, Some(1.0));
}

/// A node killed with SIGKILL announces nothing; a survivor reaps its members and every watcher
/// gets their leaves within the presence TTL, and presence no longer lists them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_a_node_yields_leaves_within_the_ttl() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let survivor = redis_node(&redis, &prefix).await;
    let mut victim = Gateway::start(&redis.url(), &prefix).await;
    let mut watcher = survivor.client().await;
    watch(&mut watcher, "room").await;
    let url = format!("ws://{}/ws", victim.addr);
    let mut doomed = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect(&url).await;
        c.subscribe("room").await;
        expect_event(&mut watcher, "join", "room", c.conn_id()).await;
        doomed.push(c);
    }
    assert_eq!(presence(&mut watcher, "room", true).await["count"], 4);
    let killed = Instant::now();
    victim.kill();
    let mut left = std::collections::HashSet::new();
    while left.len() < 3 {
        let e = next_event(&mut watcher, TTL * 2)
            .await
            .expect("leaves of the killed node's members");
        assert_eq!(e["type"], "leave", "{e}");
        left.insert(e["member"]["conn_id"].as_str().unwrap().to_owned());
    }
    let took = killed.elapsed();
    println!("leaves of a SIGKILLed node's members after {took:?} (ttl {TTL:?})");
    let expected: std::collections::HashSet<_> =
        doomed.iter().map(|c| c.conn_id().to_owned()).collect();
    assert_eq!(left, expected);
    assert!(took <= TTL, "leaves within the TTL: {took:?}");
    assert_eq!(presence(&mut watcher, "room", true).await["count"], 1);
}

/// A draining node removes its members in one batch: a watcher elsewhere gets every leave long
/// before the TTL, and the node still stops within its shutdown timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_sends_its_leaves_in_one_batch() {
    const N: usize = 300;
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let a = redis_node(&redis, &prefix).await;
    let b = redis_node(&redis, &prefix).await;
    let mut watcher = a.client().await;
    watch(&mut watcher, "room").await;
    let mut clients = Vec::new();
    for i in 0..N {
        let mut c = b.client().await;
        c.subscribe("room").await;
        c.subscribe(&format!("own:{i}")).await;
        clients.push(c);
    }
    for _ in 0..N {
        next_event(&mut watcher, WAIT).await.expect("joins");
    }
    let started = Instant::now();
    let stopped = tokio::spawn(b.stop());
    let mut leaves = 0;
    while leaves < N {
        let e = next_event(&mut watcher, TTL).await.expect("every leave");
        assert_eq!(e["type"], "leave");
        leaves += 1;
    }
    let took = started.elapsed();
    println!("{N} leaves of a draining node within {took:?}");
    assert!(took < TTL / 2, "well before any reaper could: {took:?}");
    tokio::time::timeout(Duration::from_secs(6), stopped)
        .await
        .expect("stops within its shutdown timeout")
        .unwrap()
        .expect("clean stop");
    assert_eq!(presence(&mut watcher, "room", true).await["count"], 1);
}

/// `info` from the token appears in presence and in events; an oversized or non-object `info`
/// refuses the upgrade with 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_round_trip_and_bad_info_is_401() {
    let node = start_node(Config {
        jwt_secret: Some(tokens::SECRET.into()),
        ..test_config()
    })
    .await;
    let claims = |sub: &str, info: Option<Value>| {
        let mut c = json!({"sub": sub, "exp": now() + 60, "subscribe": ["*"]});
        if let Some(info) = info {
            c["info"] = info;
        }
        c
    };
    let info = json!({"name": "Alice", "avatar": "https://x/a.png", "n": [1, {"deep": true}]});
    let mut watcher = Client::connect_bearer(&node.ws_url(), &hs256(&claims("bob", None))).await;
    watch(&mut watcher, "room").await;
    let mut alice =
        Client::connect_bearer(&node.ws_url(), &hs256(&claims("alice", Some(info.clone())))).await;
    alice.subscribe("room").await;
    let join = expect_event(&mut watcher, "join", "room", alice.conn_id()).await;
    assert_eq!(join["member"]["info"], info);
    assert_eq!(join["member"]["user"], "alice");
    let reply = presence(&mut watcher, "room", false).await;
    let members = reply["members"].as_array().unwrap();
    let of = |id: &str| {
        members
            .iter()
            .find(|m| m["conn_id"] == id)
            .cloned()
            .unwrap()
    };
    assert_eq!(of(alice.conn_id())["info"], info);
    assert!(
        of(watcher.conn_id()).get("info").is_none(),
        "absent without the claim: {reply}"
    );

    // At most 1 KiB of compact JSON.
    let fits = json!({"pad": "x".repeat(1024 - r#"{"pad":""}"#.len())});
    assert_eq!(fits.to_string().len(), 1024);
    Client::connect_bearer(&node.ws_url(), &hs256(&claims("c", Some(fits)))).await;
    let too_big = json!({"pad": "x".repeat(1025 - r#"{"pad":""}"#.len())});
    for (what, info, body) in [
        (
            "1025 bytes",
            too_big,
            "token claim `info` is larger than 1024 bytes\n",
        ),
        (
            "a string",
            json!("Alice"),
            "token claim `info` must be a JSON object\n",
        ),
        (
            "an array",
            json!([1]),
            "token claim `info` must be a JSON object\n",
        ),
    ] {
        let token = hs256(&claims("c", Some(info)));
        let addr = node.addr;
        let request = format!(
            "GET /ws?token={token} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let resp = http_exchange(addr, request.as_bytes(), WAIT).await;
        assert_eq!((resp.status, resp.body.as_str()), (401, body), "{what}");
    }
}

/// Events need subscribe permission, like presence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_need_subscribe_permission() {
    let node = start_node(Config {
        jwt_secret: Some(tokens::SECRET.into()),
        ..test_config()
    })
    .await;
    let token = hs256(&json!({"sub": "eve", "exp": now() + 60, "subscribe": ["open"]}));
    let mut eve = Client::connect_bearer(&node.ws_url(), &token).await;
    let reply = eve
        .request(json!({"type":"subscribe","channel":"room","presence_events":true,"id":1}))
        .await;
    assert_eq!(
        (reply["type"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("forbidden"))
    );
    let token = hs256(&json!({"sub": "ann", "exp": now() + 60, "subscribe": ["room"]}));
    let mut other = Client::connect_bearer(&node.ws_url(), &token).await;
    other.subscribe("room").await;
    expect_no_event(&mut eve, Duration::from_millis(300)).await;
}

/// `members` is capped at PUBGATE_PRESENCE_MAX_MEMBERS with `"truncated":true`; `count` stays
/// exact; `count_only` leaves `members` out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_is_exact_with_a_truncated_list() {
    let node = start_node(Config {
        presence_max_members: 5,
        ..test_config()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = node.client().await;
        c.subscribe("room").await;
        clients.push(c);
    }
    let reply = presence(&mut clients[0], "room", false).await;
    assert_eq!(reply["count"], 8, "{reply}");
    assert_eq!(reply["truncated"], true, "{reply}");
    assert_eq!(reply["members"].as_array().map(Vec::len), Some(5));
    let reply = presence(&mut clients[0], "room", true).await;
    assert_eq!(
        reply,
        json!({"type":"presence","channel":"room","id":"p","count":8})
    );
    let reply = presence(&mut clients[0], "small", false).await;
    assert_eq!(
        reply,
        json!({"type":"presence","channel":"small","id":"p","count":0,"members":[]}),
        "no `truncated` on a complete list"
    );
}

/// A count-only query on a channel of 20k members (another node's, written through the Presence
/// seam) is answered within a few milliseconds: it reads the count, never the members.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_only_on_a_20k_member_channel_is_fast() {
    let redis = RedisServer::start().await;
    let prefix = random_prefix();
    let node = redis_node(&redis, &prefix).await;
    let commands = Arc::new(RedisCommands::new(&redis.url(), Duration::from_secs(5)).unwrap());
    let seeder = RedisPresence::new(
        commands,
        prefix.clone(),
        Duration::from_secs(60),
        "seeder".into(),
    );
    // The seeder beats, so the node does not take it for a dead node.
    seeder.heartbeat().await.unwrap();
    let members: Vec<(String, Member)> = (0..20_000)
        .map(|i| {
            let member = Member {
                conn_id: format!("{i:016x}"),
                node: "seeder".into(),
                user: Some(format!("user-{i}")),
                info: None,
            };
            ("crowd".to_owned(), member)
        })
        .collect();
    for chunk in members.chunks(5000) {
        seeder.restore(chunk).await.expect("seed");
    }
    let mut client = node.client().await;
    let mut took = Vec::new();
    for _ in 0..50 {
        let start = Instant::now();
        let reply = presence(&mut client, "crowd", true).await;
        took.push(start.elapsed());
        assert_eq!(reply["count"], 20_000);
        assert!(reply.get("members").is_none());
    }
    took.sort();
    let (p50, p99) = (took[25], took[49]);
    println!("count-only query, 20k members: p50 {p50:?}, p99 {p99:?}");
    assert!(p50 < Duration::from_millis(10), "p50 {p50:?}");
    // The capped list stays small too.
    let start = Instant::now();
    let reply = presence(&mut client, "crowd", false).await;
    println!("capped list (1000 of 20k): {:?}", start.elapsed());
    assert_eq!(reply["members"].as_array().map(Vec::len), Some(1000));
    assert_eq!(reply["truncated"], true);
}

/// A storm of joins and leaves is absorbed by the send budget like any delivery: a watcher that
/// stops reading is closed as a slow consumer (1008), while a watcher that reads gets every
/// event in order and the churning connection is never held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_storm_closes_a_watcher_that_does_not_read() {
    const DROPPED: &str = "pubgate_messages_dropped_total{reason=\"slow_consumer\"}";
    // A queue that a reading client never fills, even on a loaded machine.
    let node = start_node(Config {
        send_queue: 256,
        ..test_config()
    })
    .await;
    // Long names make big events, so the socket buffers fill sooner.
    let channel = format!("storm:{}", "x".repeat(190));
    let mut slow = common::raw::RawClient::connect_small_buffer(node.addr, 4096).await;
    slow.send_json(&json!({"type":"subscribe","channel":channel,"presence_events":true,"id":1}))
        .await;
    assert_eq!(slow.recv_json().await["type"], "subscribed");
    let mut reader = node.client().await;
    watch(&mut reader, &channel).await;
    let mut churner = node.client().await;
    let churner_id = churner.conn_id().to_owned();
    // How many events the reading watcher must see (0 until the storm is over).
    let expected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reading = tokio::spawn({
        let expected = expected.clone();
        async move {
            let mut seen = 0usize;
            loop {
                let goal = expected.load(std::sync::atomic::Ordering::Acquire);
                if goal != 0 && seen >= goal {
                    return seen;
                }
                let Some(e) = reader.recv_within(Duration::from_millis(200)).await else {
                    continue;
                };
                // The silent watcher is a member too: its leave (when it is closed) comes in
                // between.
                if e["member"]["conn_id"] != churner_id.as_str() {
                    assert_eq!(e["type"], "leave", "{e}");
                    continue;
                }
                let kind = if seen % 2 == 0 { "join" } else { "leave" };
                assert_eq!(e["type"], kind, "event {seen} in order: {e}");
                seen += 1;
            }
        }
    });
    let mut rounds = 0;
    let started = Instant::now();
    while node.metric(DROPPED).await != Some(1.0) {
        assert!(rounds < 40_000, "the silent watcher was never dropped");
        for _ in 0..100 {
            churner.subscribe(&channel).await;
            churner
                .request(json!({"type":"unsubscribe","channel":channel}))
                .await;
        }
        rounds += 100;
    }
    println!(
        "silent watcher dropped after {rounds} join/leave rounds ({:?})",
        started.elapsed()
    );
    assert_eq!(slow.expect_close().await.code(), Some(1008));
    expected.store(2 * rounds, std::sync::atomic::Ordering::Release);
    let seen = tokio::time::timeout(Duration::from_secs(30), reading)
        .await
        .expect("the reading watcher gets every event")
        .unwrap();
    assert_eq!(seen, 2 * rounds);
    assert_eq!(
        node.metric(DROPPED).await,
        Some(1.0),
        "only the silent watcher was dropped"
    );
}

/// `__presence:<channel>` is reserved: no client request may name it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_presence_names_are_refused() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    for msg in [
        json!({"type":"subscribe","channel":"__presence:room","id":1}),
        json!({"type":"subscribe","channel":"__presence:room","presence_events":true,"id":1}),
        json!({"type":"unsubscribe","channel":"__presence:room","id":1}),
        json!({"type":"publish","channel":"__presence:room","data":{},"id":1}),
        json!({"type":"presence","channel":"__presence:room","id":1}),
    ] {
        let reply = c.request(msg.clone()).await;
        assert_eq!(reply["code"], "invalid_channel", "{msg} -> {reply}");
    }
}

// ---------------------------------------------------------------------------------------------
// The release binary as a child process, for SIGKILL.

struct Gateway {
    addr: SocketAddr,
    child: Child,
}

impl Gateway {
    async fn start(redis_url: &str, prefix: &str) -> Gateway {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_pubgate"))
            .env_clear()
            .env("PUBGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("PUBGATE_REDIS_URL", redis_url)
            .env("PUBGATE_CHANNEL_PREFIX", prefix)
            .env("PUBGATE_NODE_ID", format!("victim-{:08x}", rand_u32()))
            .env("PUBGATE_PRESENCE_TTL", format!("{}s", TTL.as_secs()))
            .env("PUBGATE_BROKER_PROBE_INTERVAL", "500ms")
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .spawn()
            .expect("start target/release/pubgate");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "child not ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Gateway { addr, child }
    }

    fn kill(&mut self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}
