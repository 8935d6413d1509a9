//! Fan-out runs off the Redis reader (issue 17): the reader only routes messages to a fixed set of
//! workers, so a fan-out that cannot keep up drops (and counts) what does not fit in its worker's
//! queue, while the pub/sub round-trip probe keeps measuring Redis and never misses; and each
//! channel's messages stay in order across several workers.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::redis::RedisServer;
use common::{start_node, test_config, TestNode};
use serde_json::json;
use tokio::time::Instant;

const OVERFLOW: &str = "pubgate_messages_dropped_total{reason=\"fanout_overflow\"}";
const RECONNECTS: &str = "pubgate_broker_reconnects_total";
const UP: &str = "pubgate_broker_up";

fn redis_config(redis: &RedisServer, prefix: &str) -> pubgate::Config {
    pubgate::Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.into(),
        ..test_config()
    }
}

async fn wait_ready(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.http_get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "node ready within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 400 subscribers of one channel and one fan-out worker with a queue of 16: a backend
/// publishing 20,000 messages/s asks for 8 M deliveries/s, far beyond this machine, so the
/// worker's queue overflows the whole time. The reader only copies 20,000 messages/s, so the
/// probe (every 250 ms, a miss would mark the broker down and reconnect) must keep coming back.
/// With the fan-out inline on the reader, the probe would wait behind seconds of fan-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_probe_never_misses_under_a_saturating_fan_out() {
    tokio::time::timeout(Duration::from_secs(120), saturate())
        .await
        .expect("the scenario finishes within 2 minutes");
}

async fn saturate() {
    const SUBSCRIBERS: usize = 400;
    const RATE: u64 = 20_000;
    const FLOOD: Duration = Duration::from_secs(4);
    let redis = RedisServer::start().await;
    let prefix = format!("fo{:08x}:", common::rand_u32());
    let node = start_node(pubgate::Config {
        broker_probe_interval: Duration::from_millis(250),
        fanout_workers: 1,
        fanout_queue: 16,
        // Subscribers that read as fast as they can are never slow consumers here: the fan-out,
        // not their queues, is what cannot keep up.
        send_queue: 1 << 20,
        send_buffer: 1 << 30,
        ..redis_config(&redis, &prefix)
    })
    .await;
    wait_ready(&node).await;

    let received = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut client = node.client().await;
        client.subscribe("hot").await;
        let received = received.clone();
        readers.push(tokio::spawn(async move {
            while client.recv_within(Duration::from_secs(30)).await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let reconnects_before = node.metric(RECONNECTS).await.unwrap_or(0.0);

    // The backend: batches of 200 pipelined PUBLISHes, 100 batches a second.
    let mut backend = redis.connection().await;
    let channel = format!("{prefix}hot");
    let publisher = tokio::spawn(async move {
        let start = Instant::now();
        let mut batches = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0u64;
        while start.elapsed() < FLOOD {
            batches.tick().await;
            let mut pipe = ::redis::pipe();
            for _ in 0..RATE / 100 {
                pipe.cmd("PUBLISH")
                    .arg(&channel)
                    .arg(format!(r#"{{"seq":{sent}}}"#))
                    .ignore();
                sent += 1;
            }
            let _: () = pipe.query_async(&mut backend).await.expect("PUBLISH batch");
        }
        sent
    });

    // Sampled every 50 ms while the flood lasts, and for two probe intervals after it.
    let mut samples = 0;
    while !publisher.is_finished() {
        assert_eq!(
            node.metric(UP).await,
            Some(1.0),
            "the broker stays up during the flood (sample {samples})"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sent = publisher.await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(node.metric(UP).await, Some(1.0), "up after the flood");
    assert_eq!(
        node.metric(RECONNECTS).await.unwrap_or(0.0),
        reconnects_before,
        "no probe missed, no reconnect"
    );
    let overflow = node.metric(OVERFLOW).await.unwrap_or(0.0);
    let delivered = received.load(Ordering::Relaxed);
    println!(
        "published {sent}, {samples} samples all up, dropped at the worker {overflow}, \
         deliveries {delivered}"
    );
    assert!(samples >= 40, "the flood was sampled: {samples}");
    assert!(
        overflow > 0.0,
        "the fan-out was saturated (nothing dropped)"
    );
    assert!(delivered > 0, "deliveries kept flowing");
    for reader in readers {
        reader.abort();
    }
}

/// Twelve channels hashed onto three workers; one client subscribed to all of them receives every
/// message of every channel, each channel in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_channel_keeps_its_order_across_workers() {
    const CHANNELS: usize = 12;
    const PER_CHANNEL: usize = 150;
    let redis = RedisServer::start().await;
    let prefix = format!("fo{:08x}:", common::rand_u32());
    let node = start_node(pubgate::Config {
        fanout_workers: 3,
        ..redis_config(&redis, &prefix)
    })
    .await;
    wait_ready(&node).await;
    let mut client = node.client().await;
    for c in 0..CHANNELS {
        client.subscribe(&format!("c{c}")).await;
    }

    let mut backend = redis.connection().await;
    let mut pipe = ::redis::pipe();
    for seq in 0..PER_CHANNEL {
        for c in 0..CHANNELS {
            pipe.cmd("PUBLISH")
                .arg(format!("{prefix}c{c}"))
                .arg(json!({ "seq": seq }).to_string())
                .ignore();
        }
    }
    let _: () = pipe.query_async(&mut backend).await.expect("PUBLISH all");

    let mut next = [0u64; CHANNELS];
    for _ in 0..CHANNELS * PER_CHANNEL {
        let m = client.recv().await;
        assert_eq!(m["type"], "message", "{m}");
        let c: usize = m["channel"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(m["data"]["seq"], next[c], "channel c{c} in order");
        next[c] += 1;
    }
    assert!(next.iter().all(|&n| n == PER_CHANNEL as u64), "{next:?}");
    assert_eq!(node.metric(OVERFLOW).await.unwrap_or(0.0), 0.0);
}
