//! Cluster mode (`PUBGATE_REDIS_CLUSTER_URLS`): real pubgate nodes on a real local Redis Cluster
//! (3 masters + 3 replicas, tests/common/cluster.rs), real WebSocket clients. Sharded pub/sub
//! across every master, one pub/sub connection per master, presence, the control channel,
//! ordering, a master SIGKILLed under publishing, and a live slot migration.
//!
//! Figures are printed (`--nocapture`).

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ::redis::AsyncCommands;
use pubgate::redis_client::slots::slot_of;
use pubgate::Config;
use serde_json::{json, Value};

use common::cluster::RedisCluster;
use common::tokens::{hs256, now, SECRET};
use common::{close_code, http_get, rand_u32, start_node, test_config, Client, TestNode};

fn node_config(cluster: &RedisCluster, prefix: &str) -> Config {
    Config {
        redis_cluster_urls: Some(cluster.seeds()),
        channel_prefix: prefix.to_owned(),
        jwt_secret: Some(SECRET.into()),
        broker_probe_interval: Duration::from_millis(300),
        redis_timeout: Duration::from_secs(1),
        ..test_config()
    }
}

async fn wait_status(addr: SocketAddr, status: u16, bound: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (got, body) = http_get(addr, "/readyz").await;
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < bound,
            "{addr} /readyz never {status} within {bound:?} (last {got} {body})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready_node(cluster: &RedisCluster, prefix: &str) -> TestNode {
    let node = start_node(node_config(cluster, prefix)).await;
    wait_status(node.addr, 200, Duration::from_secs(15)).await;
    node
}

async fn login(node: &TestNode, user: &str) -> Client {
    let token =
        hs256(&json!({"sub": user, "exp": now() + 300, "subscribe": ["*"], "publish": ["*"]}));
    Client::connect_bearer(&node.ws_url(), &token).await
}

/// Channel names whose slots (with the prefix) are owned by each master: `per` per master.
async fn channels_on_every_master(
    cluster: &RedisCluster,
    prefix: &str,
    per: usize,
) -> BTreeMap<u16, Vec<String>> {
    let ranges = cluster.slot_ranges().await;
    let mut out: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0.. {
        let name = format!("ch{i}");
        let slot = slot_of(format!("{prefix}{name}").as_bytes());
        let owner = ranges
            .iter()
            .find(|(a, b, _)| *a <= slot && slot <= *b)
            .unwrap()
            .2;
        let list = out.entry(owner).or_default();
        if list.len() < per {
            list.push(name);
        }
        if out.len() == 3 && out.values().all(|l| l.len() == per) {
            return out;
        }
    }
    unreachable!()
}

/// Sends a publish and returns the reply's type (`published` or `error`) and code.
async fn try_publish(client: &mut Client, channel: &str, data: Value) -> Result<(), String> {
    let reply = client
        .request(json!({"type":"publish","channel":channel,"data":data,"id":"p"}))
        .await;
    if reply["type"] == "published" {
        Ok(())
    } else {
        Err(reply["code"].as_str().unwrap_or("?").to_owned())
    }
}

/// Reads deliveries until `data.n == last` or the bound passes; returns the `n`s seen.
async fn collect_until(client: &mut Client, last: u64, bound: Duration) -> Vec<u64> {
    let deadline = Instant::now() + bound;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let Some(msg) = client.recv_within(Duration::from_millis(200)).await else {
            continue;
        };
        if msg["type"] == "message" {
            let n = msg["data"]["n"].as_u64().unwrap();
            seen.push(n);
            if n == last {
                break;
            }
        }
    }
    seen
}

async fn presence_conn_ids(client: &mut Client, channel: &str) -> Vec<String> {
    let reply = client
        .request(json!({"type":"presence","channel":channel,"id":"q"}))
        .await;
    assert_eq!(reply["type"], "presence", "{reply}");
    let mut ids: Vec<String> = reply["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["conn_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// `ssub=N` clients on one Redis node (sharded pub/sub connections), from CLIENT LIST.
async fn sharded_clients(cluster: &RedisCluster, port: u16) -> usize {
    let list: String = cluster
        .nodes
        .iter()
        .find(|n| n.port == port)
        .unwrap()
        .cmd(&["CLIENT", "LIST"])
        .await
        .unwrap();
    list.lines()
        .filter(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("ssub="))
                .is_some_and(|n| n != "0")
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_delivery_on_every_master_with_presence_control_and_order() {
    let cluster = RedisCluster::start().await;
    let prefix = format!("t{:08x}:", rand_u32());
    let a = ready_node(&cluster, &prefix).await;
    let b = ready_node(&cluster, &prefix).await;
    let by_master = channels_on_every_master(&cluster, &prefix, 2).await;
    let channels: Vec<String> = by_master.values().flatten().cloned().collect();

    let mut alice = login(&a, "alice").await;
    let mut bob = login(&b, "bob").await;
    for ch in &channels {
        alice.subscribe(ch).await;
        bob.subscribe(ch).await;
    }

    // One sharded pub/sub connection per gateway node on every master (not one per channel).
    for master in by_master.keys() {
        assert_eq!(
            sharded_clients(&cluster, *master).await,
            2,
            "master {master}: one pub/sub connection per gateway node"
        );
    }

    // Cross-node delivery on channels of every master.
    let mut carol = login(&b, "carol").await;
    for (i, ch) in channels.iter().enumerate() {
        try_publish(&mut carol, ch, json!({"n": i})).await.unwrap();
        for (who, client) in [("alice", &mut alice), ("bob", &mut bob)] {
            let msg = client.recv().await;
            assert_eq!(
                msg,
                json!({"type":"message","channel":ch,"data":{"n":i}}),
                "{who} on {ch}"
            );
        }
    }

    // A backend's SPUBLISH reaches both nodes.
    let mut backend = cluster.connection().await;
    let full = format!("{prefix}{}", channels[0]);
    let receivers: i64 = ::redis::cmd("SPUBLISH")
        .arg(&full)
        .arg(r#"{"from":"backend"}"#)
        .query_async(&mut backend)
        .await
        .unwrap();
    assert_eq!(receivers, 2, "one receiving connection per gateway node");
    for client in [&mut alice, &mut bob] {
        assert_eq!(client.recv().await["data"], json!({"from":"backend"}));
    }

    // Ordering per publisher: 300 publishes from one connection arrive in order on the other node.
    let ordered = &channels[channels.len() - 1];
    let started = Instant::now();
    for n in 0..300u64 {
        carol
            .send(json!({"type":"publish","channel":ordered,"data":{"n":n}}))
            .await;
    }
    let seen = collect_until(&mut alice, 299, Duration::from_secs(20)).await;
    assert_eq!(seen, (0..300).collect::<Vec<_>>(), "in order, none lost");
    println!(
        "ordering: 300 publishes delivered in order across nodes in {:?}",
        started.elapsed()
    );
    let _ = collect_until(&mut bob, 299, Duration::from_secs(20)).await;
    for _ in 0..300 {
        assert_eq!(carol.recv().await["type"], "published");
    }

    // Presence: both nodes' members, stored in the channel's slot.
    let mut expected = vec![alice.conn_id().to_owned(), bob.conn_id().to_owned()];
    expected.sort();
    for ch in &channels {
        assert_eq!(presence_conn_ids(&mut carol, ch).await, expected, "{ch}");
    }
    bob.send(json!({"type":"unsubscribe","channel":channels[0],"id":"u"}))
        .await;
    assert_eq!(bob.recv().await["type"], "unsubscribed");
    assert_eq!(
        presence_conn_ids(&mut carol, &channels[0]).await,
        vec![alice.conn_id().to_owned()]
    );

    // Presence events cross nodes on the sharded `__presence:<channel>` (the scripts SPUBLISH
    // in the channel's slot): carol on node B watches, dave joins and leaves on node A.
    let watched = &channels[2];
    let reply = carol
        .request(json!({"type":"subscribe","channel":watched,"presence_events":true,"id":"w"}))
        .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let mut dave = login(&a, "dave").await;
    dave.subscribe(watched).await;
    let join = carol.recv().await;
    assert_eq!(join["type"], "join", "{join}");
    assert_eq!(join["member"]["conn_id"], dave.conn_id());
    dave.send(json!({"type":"unsubscribe","channel":watched,"id":"u"}))
        .await;
    let leave = carol.recv().await;
    assert_eq!(leave["type"], "leave", "{leave}");
    assert_eq!(leave["member"]["conn_id"], dave.conn_id());
    carol
        .send(json!({"type":"unsubscribe","channel":watched,"id":"u2"}))
        .await;
    assert_eq!(carol.recv().await["type"], "unsubscribed");

    // The control channel: SPUBLISH <prefix>__control closes alice's connections only.
    let receivers: i64 = backend
        .spublish(
            format!("{prefix}__control"),
            r#"{"type":"disconnect","user":"alice"}"#,
        )
        .await
        .unwrap();
    assert_eq!(receivers, 2, "both nodes listen on __control");
    let frame = alice.expect_close().await;
    assert_eq!(close_code(&frame), Some(1008));
    let reply = bob.request(json!({"type":"ping","id":"x"})).await;
    assert_eq!(reply, json!({"type":"pong","id":"x"}));

    // The last local subscriber leaving SUNSUBSCRIBEs on the owner.
    bob.send(json!({"type":"unsubscribe","channel":channels[1],"id":"u"}))
        .await;
    assert_eq!(bob.recv().await["type"], "unsubscribed");
    let owner = cluster
        .owner(slot_of(format!("{prefix}{}", channels[1]).as_bytes()))
        .await;
    let node = cluster.nodes.iter().find(|n| n.port == owner).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let counts: Vec<(String, i64)> = node
            .cmd(&["PUBSUB", "SHARDNUMSUB", &format!("{prefix}{}", channels[1])])
            .await
            .unwrap();
        if counts[0].1 == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alice gone and bob left: 0 expected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_sigkill_under_publishing_resumes_after_failover() {
    let mut cluster = RedisCluster::start().await;
    let prefix = format!("t{:08x}:", rand_u32());
    let a = ready_node(&cluster, &prefix).await;
    let b = ready_node(&cluster, &prefix).await;
    let by_master = channels_on_every_master(&cluster, &prefix, 1).await;
    let (&victim, victim_channels) = by_master.iter().next().unwrap();
    let channel = victim_channels[0].clone();
    let mut sub = login(&a, "sub").await;
    sub.subscribe(&channel).await;
    let mut publisher = login(&b, "pub").await;

    // Publish every 20 ms, numbered, before, during and after the failover.
    let kill_after = Duration::from_millis(500);
    let started = Instant::now();
    let mut killed_at: Option<(Instant, u64)> = None;
    let mut accepted = Vec::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut n = 0u64;
    let mut resumed_after = None;
    let mut received = Vec::new();
    let mut was_unready = false;
    let deadline = Instant::now() + Duration::from_secs(40);
    while Instant::now() < deadline {
        if killed_at.is_none() && started.elapsed() >= kill_after {
            cluster.node(victim).kill();
            killed_at = Some((Instant::now(), n));
            println!("failover: master {victim} SIGKILLed after publish {n}");
        }
        match try_publish(&mut publisher, &channel, json!({"n": n})).await {
            Ok(()) => accepted.push(n),
            Err(code) => *refused.entry(code).or_default() += 1,
        }
        n += 1;
        while let Some(msg) = sub.recv_within(Duration::from_millis(1)).await {
            received.push(msg["data"]["n"].as_u64().unwrap());
        }
        if let Some((at, first_after)) = killed_at {
            if !was_unready {
                was_unready = http_get(a.addr, "/readyz").await.0 == 503;
            }
            // Published after the kill and delivered: only possible through the new master.
            if resumed_after.is_none() && received.iter().any(|&m| m >= first_after) {
                resumed_after = Some(at.elapsed());
            }
            if resumed_after.is_some_and(|r| at.elapsed() > r + Duration::from_secs(1)) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resumed_after = resumed_after.expect("delivery resumed after the failover");
    // Let the last ones arrive.
    while let Some(msg) = sub.recv_within(Duration::from_millis(500)).await {
        received.push(msg["data"]["n"].as_u64().unwrap());
    }
    let lost: Vec<u64> = accepted
        .iter()
        .copied()
        .filter(|m| !received.contains(m))
        .collect();
    println!(
        "failover: delivery resumed {resumed_after:?} after the kill; {} publishes, {} accepted, \
         refused {refused:?}; accepted but not delivered: {} {:?}; node A unready during it: {was_unready}",
        n,
        accepted.len(),
        lost.len(),
        lost
    );
    let in_order = received.windows(2).all(|w| w[0] < w[1]);
    assert!(in_order, "deliveries stay in publish order: {received:?}");
    assert!(
        was_unready,
        "a shard with subscriptions was unreachable: /readyz 503"
    );
    wait_status(a.addr, 200, Duration::from_secs(15)).await;
    // After the failover a fresh publish is delivered.
    try_publish(&mut publisher, &channel, json!({"n": 1_000_000}))
        .await
        .unwrap();
    let msg = sub.recv().await;
    assert_eq!(msg["data"]["n"], 1_000_000);
    let new_owner = cluster
        .owner(slot_of(format!("{prefix}{channel}").as_bytes()))
        .await;
    assert_ne!(new_owner, victim, "a replica took over");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_slot_migration_moves_the_subscription() {
    let cluster = RedisCluster::start().await;
    let prefix = format!("t{:08x}:", rand_u32());
    let a = ready_node(&cluster, &prefix).await;
    let b = ready_node(&cluster, &prefix).await;
    let by_master = channels_on_every_master(&cluster, &prefix, 1).await;
    let mut masters = by_master.keys().copied();
    let (source, target) = (masters.next().unwrap(), masters.next().unwrap());
    let channel = by_master[&source][0].clone();
    let full = format!("{prefix}{channel}");
    let slot = slot_of(full.as_bytes());
    let mut sub = login(&a, "sub").await;
    sub.subscribe(&channel).await;
    let mut publisher = login(&b, "pub").await;
    try_publish(&mut publisher, &channel, json!({"n": 0}))
        .await
        .unwrap();
    assert_eq!(sub.recv().await["data"]["n"], 0);

    let node = |port: u16| cluster.nodes.iter().find(|n| n.port == port).unwrap();
    let source_id: String = node(source).cmd(&["CLUSTER", "MYID"]).await.unwrap();
    let target_id: String = node(target).cmd(&["CLUSTER", "MYID"]).await.unwrap();
    let s = slot.to_string();
    let started = Instant::now();
    node(target)
        .cmd::<()>(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &source_id])
        .await
        .unwrap();
    node(source)
        .cmd::<()>(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &target_id])
        .await
        .unwrap();
    let keys: Vec<String> = node(source)
        .cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "1000"])
        .await
        .unwrap();
    println!(
        "migration: slot {slot} holds {} keys (presence of the channel)",
        keys.len()
    );
    if !keys.is_empty() {
        let port = target.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        node(source).cmd::<()>(&args).await.unwrap();
    }
    for port in [target, source] {
        node(port)
            .cmd::<()>(&["CLUSTER", "SETSLOT", &s, "NODE", &target_id])
            .await
            .unwrap();
    }
    for other in cluster
        .nodes
        .iter()
        .filter(|n| n.port != source && n.port != target)
    {
        let _ = other
            .cmd::<()>(&["CLUSTER", "SETSLOT", &s, "NODE", &target_id])
            .await;
    }

    // Keep publishing until deliveries come from the new owner.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 1u64;
    let moved_after = loop {
        assert!(
            Instant::now() < deadline,
            "delivery never resumed after the migration"
        );
        let _ = try_publish(&mut publisher, &channel, json!({"n": n})).await;
        if let Some(msg) = sub.recv_within(Duration::from_millis(100)).await {
            if msg["data"]["n"] == n {
                let counts: Vec<(String, i64)> = node(target)
                    .cmd(&["PUBSUB", "SHARDNUMSUB", &full])
                    .await
                    .unwrap();
                if counts[0].1 == 1 {
                    break started.elapsed();
                }
            }
        }
        n += 1;
    };
    println!("migration: the subscription moved to the new owner {moved_after:?} after the migration began ({n} publishes)");
    // The presence member moved with the slot.
    let ids = presence_conn_ids(&mut publisher, &channel).await;
    assert_eq!(ids, vec![sub.conn_id().to_owned()]);
    assert_eq!(http_get(a.addr, "/readyz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_shard_is_found_within_two_probe_intervals() {
    let cluster = RedisCluster::start().await;
    let prefix = format!("t{:08x}:", rand_u32());
    let a = ready_node(&cluster, &prefix).await;
    let by_master = channels_on_every_master(&cluster, &prefix, 1).await;
    let (&master, channels) = by_master.iter().next().unwrap();
    let mut sub = login(&a, "sub").await;
    sub.subscribe(&channels[0]).await;
    // Let a probe round trip settle on the shard.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(http_get(a.addr, "/readyz").await.0, 200);

    // CLIENT PAUSE ALL: the master keeps its sockets and its cluster bus (no failover) but
    // answers no client: a silent shard.
    let node = cluster.nodes.iter().find(|n| n.port == master).unwrap();
    node.cmd::<()>(&["CLIENT", "PAUSE", "3000", "ALL"])
        .await
        .unwrap();
    let paused = Instant::now();
    let found = wait_status(a.addr, 503, Duration::from_secs(3)).await;
    let probe = node_config(&cluster, &prefix).broker_probe_interval;
    println!("silent shard: /readyz 503 after {found:?} (probe interval {probe:?})");
    // Two intervals, plus scheduling slack on a loaded 2-core machine.
    assert!(
        found <= 2 * probe + Duration::from_millis(400),
        "found after {found:?}"
    );
    let back = wait_status(a.addr, 200, Duration::from_secs(15)).await;
    println!(
        "silent shard: ready again {:?} after the pause began",
        paused.elapsed()
    );
    let _ = back;
    let mut publisher = login(&a, "pub").await;
    try_publish(&mut publisher, &channels[0], json!({"n": 1}))
        .await
        .unwrap();
    assert_eq!(sub.recv().await["data"]["n"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_on_every_master_with_offsets_and_fcall() {
    let cluster = RedisCluster::start().await;
    let prefix = format!("t{:08x}:", rand_u32());
    let history = |c: &RedisCluster| Config {
        history_size: 50,
        ..node_config(c, &prefix)
    };
    let a = start_node(history(&cluster)).await;
    let b = start_node(history(&cluster)).await;
    wait_status(a.addr, 200, Duration::from_secs(15)).await;
    wait_status(b.addr, 200, Duration::from_secs(15)).await;
    let by_master = channels_on_every_master(&cluster, &prefix, 1).await;
    let mut sub = login(&a, "sub").await;
    let mut publisher = login(&b, "pub").await;
    let mut backend = cluster.connection().await;
    for ch in by_master.values().flatten() {
        let reply = sub
            .request(json!({"type":"subscribe","channel":ch,"id":"s"}))
            .await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["offset"], 0, "{reply}");
        // Client publishes go through the function library on the channel's master (SPUBLISH
        // inside it): offsets 1 and 2 arrive live on the other node.
        for n in 1..=2u64 {
            try_publish(&mut publisher, ch, json!({"n": n}))
                .await
                .unwrap();
            let msg = sub.recv().await;
            assert_eq!(msg["data"]["n"], n, "{msg}");
            assert_eq!(msg["offset"], n, "{msg}");
        }
        // A backend's FCALL on the cluster (routed by the key's slot) gives offset 3; retried
        // while the library is being loaded on every master.
        let deadline = Instant::now() + Duration::from_secs(10);
        let offset: u64 = loop {
            let r: ::redis::RedisResult<u64> = ::redis::cmd("FCALL")
                .arg("pubgate_publish")
                .arg(1)
                .arg(format!("{prefix}{ch}"))
                .arg(r#"{"n":3}"#)
                .query_async(&mut backend)
                .await;
            match r {
                Ok(o) => break o,
                Err(e) => {
                    assert!(Instant::now() < deadline, "FCALL on {ch}: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        assert_eq!(offset, 3);
        assert_eq!(sub.recv().await["offset"], 3);
        let reply = publisher
            .request(json!({"type":"history","channel":ch,"limit":10,"id":"h"}))
            .await;
        assert_eq!(reply["type"], "history", "{reply}");
        let offsets: Vec<u64> = reply["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, vec![1, 2, 3], "{ch}: {reply}");
    }
}
