//! One behaviour suite for the History seam, run against `MemoryHistory` and `RedisHistory`:
//! offsets 1, 2, 3 per channel, a stable epoch, the three reads, trimming, and (memory) the
//! positioned deliveries in offset order. The Redis fixture starts its own redis-server.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use pubgate::broker::{MessageSink, Position};
use pubgate::history::{History, MemoryHistory, Read, RedisHistory, RedisHistoryOptions};
use pubgate::redis_commands::RedisCommands;

use common::rand_u32;
use common::redis::RedisServer;

const SIZE: usize = 3;

#[derive(Default)]
struct Collector(Mutex<Vec<Delivered>>);

/// (channel, payload, offset)
type Delivered = (String, Vec<u8>, Option<u64>);

impl MessageSink for Collector {
    fn deliver(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>) {
        self.0
            .lock()
            .unwrap()
            .push((channel.into(), payload.into(), position.map(|p| p.offset)));
    }
}

struct Fixture {
    history: Arc<dyn History>,
    _redis: Option<RedisServer>,
}

fn memory(sink: Arc<Collector>) -> Fixture {
    Fixture {
        history: Arc::new(MemoryHistory::new(sink, SIZE, Duration::from_secs(60))),
        _redis: None,
    }
}

async fn redis() -> Fixture {
    let server = RedisServer::start().await;
    let commands =
        Arc::new(RedisCommands::new(&server.url(), Duration::from_secs(2)).expect("commands"));
    let options = RedisHistoryOptions {
        prefix: format!("c{:08x}:", rand_u32()),
        size: SIZE,
        ttl: Duration::from_secs(60),
    };
    Fixture {
        history: Arc::new(RedisHistory::new(commands, options)),
        _redis: Some(server),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn offsets_epochs_reads_and_trimming(f: Fixture) {
    let h = &f.history;
    let fresh = h.read("a", Read::State).await.unwrap();
    assert_eq!(fresh.offset, 0);
    assert!(!fresh.epoch.is_empty());
    for i in 1..=5u64 {
        assert_eq!(h.publish("a", b(&format!("m{i}"))).await.unwrap(), i);
    }
    assert_eq!(h.publish("b", b("other")).await.unwrap(), 1, "per channel");
    let state = h.read("a", Read::State).await.unwrap();
    assert_eq!(state.epoch, fresh.epoch, "the epoch read first is kept");
    assert_eq!(state.offset, 5);
    assert!(state.messages.is_empty());

    let latest = h.read("a", Read::Latest { limit: 2 }).await.unwrap();
    assert_eq!(latest.messages, vec![(4, b("m4")), (5, b("m5"))]);
    let all = h.read("a", Read::Latest { limit: 100 }).await.unwrap();
    assert_eq!(all.messages.len(), SIZE, "trimmed to the size");
    assert_eq!(all.messages[0].0, 3);

    let epoch = &state.epoch[..];
    let since = h.read("a", Read::Since { epoch, offset: 3 }).await.unwrap();
    assert_eq!(since.messages, vec![(4, b("m4")), (5, b("m5"))]);
    assert!(since.recovers(epoch, 3));
    let trimmed = h.read("a", Read::Since { epoch, offset: 1 }).await.unwrap();
    assert!(!trimmed.recovers(epoch, 1), "message 2 is gone");
    let other = h
        .read(
            "a",
            Read::Since {
                epoch: "x",
                offset: 3,
            },
        )
        .await
        .unwrap();
    assert!(other.messages.is_empty());
    assert!(!other.recovers("x", 3));
    let future = h
        .read(
            "a",
            Read::Since {
                epoch,
                offset: u64::MAX,
            },
        )
        .await
        .unwrap();
    assert!(!future.recovers(epoch, u64::MAX));
    let current = h.read("a", Read::Since { epoch, offset: 5 }).await.unwrap();
    assert!(current.recovers(epoch, 5));
}

#[tokio::test]
async fn memory_history() {
    let sink = Arc::new(Collector::default());
    offsets_epochs_reads_and_trimming(memory(sink.clone())).await;
    let delivered = sink.0.lock().unwrap().clone();
    let offsets: Vec<_> = delivered
        .iter()
        .filter(|d| d.0 == "a")
        .map(|d| d.2)
        .collect();
    assert_eq!(offsets, (1..=5).map(Some).collect::<Vec<_>>());
}

#[tokio::test]
async fn redis_history() {
    offsets_epochs_reads_and_trimming(redis().await).await;
}
