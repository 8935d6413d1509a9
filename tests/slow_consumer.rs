//! A subscriber that stops reading: its send queue overflows, it is closed with 1008 or 1013 and
//! counted in `pubgate_messages_dropped_total{reason="slow_consumer"}`, while a normal subscriber
//! of the same channel receives every message in order and the publisher is never held up.

mod common;

use std::time::Duration;

use common::raw::{Closed, End, RawClient, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use common::{start_node, test_config};
use serde_json::{json, Value};
use tokio::time::Instant;

const DROPPED: &str = "pubgate_messages_dropped_total{reason=\"slow_consumer\"}";
const PAD: usize = 60_000;
/// Far more than the socket buffers and the queue can hold; the test stops long before.
const MAX_PUBLISHES: usize = 2_000;

#[tokio::test]
async fn a_subscriber_that_stops_reading_is_closed_and_others_get_everything() {
    tokio::time::timeout(Duration::from_secs(120), scenario())
        .await
        .expect("the scenario finishes within 2 minutes");
}

async fn scenario() {
    let pong_timeout = Duration::from_secs(10);
    let node = start_node(pubgate::Config {
        send_queue: 8,
        max_message_size: 256 * 1024,
        pong_timeout,
        ..test_config()
    })
    .await;

    // The slow one: a tiny receive buffer, subscribed, then it never reads.
    let mut slow = RawClient::connect_small_buffer(node.addr, 4096).await;
    slow.send_json(&json!({"type":"subscribe","channel":"firehose","id":1}))
        .await;
    assert_eq!(
        slow.recv_json().await,
        json!({"type":"subscribed","channel":"firehose","id":1})
    );

    // The normal one reads everything in its own task until the end marker.
    let mut normal = node.client().await;
    normal.subscribe("firehose").await;
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        loop {
            let m = normal
                .recv_within(Duration::from_secs(30))
                .await
                .expect("deliveries keep coming");
            assert_eq!(m["type"], "message", "{}", short(&m));
            assert_eq!(m["channel"], "firehose");
            if m["data"]["end"] == true {
                return (seqs, m["data"]["i"].as_u64().unwrap() as usize, normal);
            }
            assert_eq!(m["data"]["pad"].as_str().map(str::len), Some(PAD));
            seqs.push(m["data"]["i"].as_u64().unwrap() as usize);
        }
    });

    let mut publisher = node.client().await;
    let pad = "x".repeat(PAD);
    let mut sent = 0;
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    loop {
        assert!(
            sent < MAX_PUBLISHES,
            "{sent} messages of {PAD} bytes published and the slow consumer is still not dropped"
        );
        let t = Instant::now();
        publisher
            .publish("firehose", json!({"i": sent, "pad": pad}))
            .await;
        slowest = slowest.max(t.elapsed());
        sent += 1;
        if sent % 8 == 0 && node.metric(DROPPED).await.unwrap_or(0.0) > 0.0 {
            break;
        }
    }
    let dropped_after = started.elapsed();
    publisher
        .publish("firehose", json!({"i": sent, "end": true}))
        .await;
    eprintln!(
        "slow consumer dropped after {sent} publishes in {dropped_after:?}; slowest publish {slowest:?}"
    );

    // The slow one resumes reading: whatever was buffered, then a close 1008/1013 or the end.
    let resumed = Instant::now();
    let mut received = Vec::new();
    let closed = loop {
        match slow
            .next_frame_within(pong_timeout + Duration::from_secs(5))
            .await
        {
            Err(End::Timeout) => panic!(
                "the slow consumer was not closed ({} messages read after resuming)",
                received.len()
            ),
            Err(End::Closed(_)) => break Closed::NoFrame,
            Ok(f) if f.opcode == OP_TEXT => {
                let m: Value = serde_json::from_slice(&f.payload).expect("JSON");
                if m["type"] == "message" {
                    received.push(m["data"]["i"].as_u64().unwrap() as usize);
                }
            }
            Ok(f) if f.opcode == OP_PING || f.opcode == OP_PONG => {}
            Ok(f) if f.opcode == OP_CLOSE => {
                // Answer like a client would and expect the end of the TCP connection.
                let _ = slow
                    .send_raw(&common::raw::masked(
                        true,
                        OP_CLOSE,
                        &f.payload[..2.min(f.payload.len())],
                    ))
                    .await;
                slow.expect_eof_within(common::WAIT).await;
                break Closed::Frame(f.close_code());
            }
            Ok(f) => panic!("unexpected frame {f:?}"),
        }
    };
    eprintln!(
        "slow consumer: {} messages after resuming, then {closed:?} after {:?}",
        received.len(),
        resumed.elapsed()
    );
    if let Closed::Frame(code) = closed {
        assert!(
            matches!(code, Some(1008 | 1013)),
            "slow consumer close code {code:?}, expected 1008 or 1013"
        );
    }
    // What it did get is in publish order without duplicates, and it never got everything.
    assert!(
        received.windows(2).all(|w| w[0] < w[1]),
        "slow consumer's messages out of order: {received:?}"
    );
    assert!(
        received.len() < sent,
        "the slow consumer cannot have received every message"
    );

    assert!(node.metric(DROPPED).await.unwrap() > 0.0);

    // The normal subscriber got every message, in order, and the end marker.
    let (seqs, end, mut normal) = reader.await.expect("reader task");
    assert_eq!(end, sent);
    assert_eq!(
        seqs,
        (0..sent).collect::<Vec<_>>(),
        "every message in order"
    );
    assert_eq!(
        normal.request(json!({"type":"ping","id":"after"})).await,
        json!({"type":"pong","id":"after"})
    );
    // Only the slow connection went away.
    let deadline = Instant::now() + Duration::from_secs(3);
    while node.metric("pubgate_connections").await != Some(2.0) {
        assert!(
            Instant::now() < deadline,
            "pubgate_connections is {:?}, expected 2",
            node.metric("pubgate_connections").await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The fan-out never waited for the slow socket.
    assert!(
        slowest < Duration::from_secs(2),
        "a publish took {slowest:?} while a subscriber was stalled"
    );
}

/// A message for an assertion text, without its 60 kB pad.
fn short(m: &Value) -> String {
    let mut m = m.clone();
    if let Some(d) = m.get_mut("data").and_then(Value::as_object_mut) {
        d.remove("pad");
    }
    m.to_string()
}
