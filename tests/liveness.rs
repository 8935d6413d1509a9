//! Server pings and the dead-peer close: a Ping every ping interval; a client that sends nothing
//! within ping interval + pong timeout is closed; a client that answers (or sends anything) stays.

mod common;

use std::time::Duration;

use common::raw::{End, RawClient, OP_CLOSE, OP_PING, OP_PONG, OP_TEXT};
use common::{start_node, test_config};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

const PING: Duration = Duration::from_millis(250);
const PONG: Duration = Duration::from_millis(500);

fn config() -> pubgate::Config {
    pubgate::Config {
        ping_interval: PING,
        pong_timeout: PONG,
        ..test_config()
    }
}

#[tokio::test]
async fn the_server_pings_every_interval() {
    let node = start_node(pubgate::Config {
        ping_interval: Duration::from_millis(200),
        pong_timeout: Duration::from_secs(5),
        ..test_config()
    })
    .await;
    let mut c = node.client().await;
    assert_eq!(c.welcome["ping_interval_ms"], 200);
    let listen = Duration::from_millis(1_300);
    let deadline = Instant::now() + listen;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    // 1.3 s / 200 ms = 6.5 intervals; timers only run late, never early.
    assert!(
        (4..=7).contains(&pings),
        "{pings} pings in {listen:?} with a 200 ms interval"
    );
    // tungstenite answered each with a pong: still connected.
    assert_eq!(
        c.request(json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
}

#[tokio::test]
async fn a_client_that_never_answers_is_closed_after_ping_interval_plus_pong_timeout() {
    let node = start_node(config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    let connected = Instant::now();
    let mut pings = 0;
    let limit = PING + PONG + Duration::from_secs(2);
    let (end, code) = loop {
        match raw
            .next_frame_within(limit.saturating_sub(connected.elapsed()))
            .await
        {
            Err(End::Timeout) => panic!("still open after {limit:?} without answering pings"),
            Err(End::Closed(_)) => break (connected.elapsed(), None),
            Ok(f) if f.opcode == OP_PING => pings += 1,
            Ok(f) if f.opcode == OP_CLOSE => break (connected.elapsed(), Some(f.close_code())),
            Ok(f) => panic!("unexpected {f:?}"),
        }
    };
    eprintln!("silent client closed after {end:?} with {code:?}, {pings} pings seen");
    assert!(pings >= 1, "the server pinged before giving up");
    // Not before the client had its ping interval + pong timeout to answer (a little slack for
    // the time between the server's accept and the welcome reaching the client).
    assert!(
        end >= PING + PONG - Duration::from_millis(100),
        "closed after {end:?}, before ping interval + pong timeout"
    );
    if code.is_some() {
        // A close frame, then the end of the TCP connection.
        raw.expect_eof_within(common::WAIT).await;
    }
    let mut other = node.client().await;
    assert_eq!(
        other.request(json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
}

#[tokio::test]
async fn a_client_that_answers_pings_stays_connected() {
    let node = start_node(config()).await;
    let mut c = node.client().await;
    c.subscribe("alive").await;
    // Keep reading (tungstenite answers each Ping) for 5 times ping interval + pong timeout.
    let stay = (PING + PONG) * 5;
    let deadline = Instant::now() + stay;
    let mut pings = 0;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Err(_) => break,
            Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
            Ok(other) => panic!("unexpected {other:?} while answering pings"),
        }
    }
    assert!(pings >= 5, "{pings} pings in {stay:?}");
    let mut p = node.client().await;
    p.publish("alive", json!("still here")).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"alive","data":"still here"})
    );
}

#[tokio::test]
async fn a_client_that_sends_messages_but_no_pongs_stays_connected() {
    // The contract closes a client that sends nothing (no pong, no frame): any frame counts.
    let node = start_node(config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    let stay = (PING + PONG) * 4;
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < stay {
        raw.send_json(&json!({"type":"ping","id":n})).await;
        // Read until our pong, ignoring (not answering) the server's pings.
        loop {
            let f = match raw.next_frame_within(common::WAIT).await {
                Ok(f) => f,
                Err(e) => panic!("closed while sending a message every 150 ms: {e:?}"),
            };
            match f.opcode {
                OP_PING | OP_PONG => continue,
                OP_TEXT => {
                    let v: Value = serde_json::from_slice(&f.payload).unwrap();
                    assert_eq!(v, json!({"type":"pong","id":n}));
                    break;
                }
                _ => panic!(
                    "closed while sending a message every 150 ms: {f:?} ({:?})",
                    f.close_code()
                ),
            }
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

#[tokio::test]
async fn a_raw_client_that_answers_pings_stays_connected() {
    let node = start_node(config()).await;
    let mut raw = RawClient::connect(node.addr).await;
    let stay = (PING + PONG) * 4;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < stay {
        match raw.next_frame_within(Duration::from_millis(100)).await {
            Err(End::Timeout) => continue,
            Err(e) => panic!("closed although it answered every ping: {e:?}"),
            Ok(f) if f.opcode == OP_PING => {
                pings += 1;
                raw.send_frame(true, OP_PONG, &f.payload).await;
            }
            Ok(f) => panic!("unexpected {f:?}"),
        }
    }
    assert!(pings >= 4, "{pings} pings in {stay:?}");
    assert_eq!(
        raw.request(&json!({"type":"ping","id":"end"})).await,
        json!({"type":"pong","id":"end"})
    );
}
