//! Limits (contract v1.1) and hostile clients over real sockets: the per-connection rate limit
//! and the flood close, the connection cap under concurrency, the `Origin` allowlist, a
//! slowloris upgrade, and subscribe/unsubscribe toggling, each with another client's latency
//! watched where it matters.

mod common;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pubgate::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use common::raw::{read_response, upgrade_request, Response};
use common::{start_node, test_config, Client, TestNode, WAIT};

fn rate_config(rate: u32, burst: u32) -> Config {
    Config {
        rate_limit: rate,
        rate_burst: burst,
        ..test_config()
    }
}

/// Sends every message at once, then reads one reply per message.
async fn burst(client: &mut Client, messages: &[Message]) -> Vec<Value> {
    for m in messages {
        client.ws.feed(m.clone()).await.unwrap();
    }
    client.ws.flush().await.unwrap();
    let mut replies = Vec::new();
    for _ in messages {
        replies.push(client.recv().await);
    }
    replies
}

#[tokio::test]
async fn messages_over_the_rate_are_answered_rate_limited_and_not_executed() {
    let node = start_node(rate_config(10, 20)).await;
    let mut c = node.client().await;
    let pings: Vec<Message> = (0..30)
        .map(|i| Message::text(json!({"type":"ping","id":i}).to_string()))
        .collect();
    let replies = burst(&mut c, &pings).await;
    let pongs = replies.iter().filter(|r| r["type"] == "pong").count();
    // The bucket holds 20; at 10/s at most one more token refills while 30 tiny frames arrive.
    assert!((20..=21).contains(&pongs), "{pongs} pongs: {replies:?}");
    for (i, reply) in replies.iter().enumerate() {
        if i < 20 {
            assert_eq!(reply, &json!({"type":"pong","id":i}));
        } else if reply["type"] == "error" {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            assert_eq!(reply["id"], i, "the id is echoed: {reply}");
        }
    }
    let limited = (30 - pongs) as f64;
    // Every data message counts while limited: binary, invalid JSON, a subscribe (not executed).
    let others = [
        Message::binary(vec![1u8, 2, 3]),
        Message::text("not json"),
        Message::text(json!({"type":"subscribe","channel":"news","id":"s"}).to_string()),
    ];
    let replies = burst(&mut c, &others).await;
    assert_eq!(replies[0]["code"], "rate_limited", "binary: {}", replies[0]);
    assert!(replies[0].get("id").is_none());
    assert_eq!(
        replies[1]["code"], "rate_limited",
        "bad json: {}",
        replies[1]
    );
    assert_eq!(
        replies[2],
        json!({"type":"error","id":"s","code":"rate_limited","message":replies[2]["message"]})
    );
    assert_eq!(node.metric("pubgate_subscriptions").await, Some(0.0));
    assert_eq!(
        node.metric("pubgate_requests_rejected_total{reason=\"rate_limited\"}")
            .await,
        Some(limited + 3.0)
    );
    // Control frames do not count: pings answered by the library side are free.
    for _ in 0..50 {
        c.ws.send(Message::Ping(vec![1].into())).await.unwrap();
    }
    // Tokens come back at the configured rate.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let replies = burst(&mut c, &pings[..5]).await;
    assert!(replies.iter().all(|r| r["type"] == "pong"), "{replies:?}");
    // A connection without a limit is never limited.
    let unlimited = start_node(rate_config(0, 0)).await;
    let mut u = unlimited.client().await;
    let many: Vec<Message> = (0..500)
        .map(|i| Message::text(json!({"type":"ping","id":i}).to_string()))
        .collect();
    let replies = burst(&mut u, &many).await;
    assert!(replies.iter().all(|r| r["type"] == "pong"));
}

/// Round trips of application pings from `client` every 50 ms until `stop`; returns the slowest.
async fn watch_latency(mut client: Client, stop: tokio::sync::oneshot::Receiver<()>) -> Duration {
    let mut worst = Duration::ZERO;
    tokio::pin!(stop);
    let mut i = 0;
    loop {
        let t = Instant::now();
        let reply = client.request(json!({"type":"ping","id":i})).await;
        assert_eq!(reply, json!({"type":"pong","id":i}));
        worst = worst.max(t.elapsed());
        i += 1;
        tokio::select! {
            _ = &mut stop => return worst,
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

#[tokio::test]
async fn a_flood_of_tiny_frames_is_closed_1008_while_others_stay_fast() {
    let node = start_node(rate_config(20, 20)).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_latency(node.client().await, stop_rx));

    let flooder = node.client().await;
    let (mut sink, mut stream) = flooder.ws.split();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        let mut sent = 0u64;
        // Tiny frames, as fast as the socket takes them, until the server closes.
        while sink.send(Message::text("{}")).await.is_ok() {
            sent += 1;
            if started.elapsed() > Duration::from_secs(15) {
                break;
            }
        }
        sent
    });
    let close = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(msg)) = stream.next().await {
            if let Message::Close(frame) = msg {
                return frame;
            }
        }
        None
    })
    .await
    .expect("the flood is closed within 10 s");
    let elapsed = started.elapsed();
    let sent = sender.await.unwrap();
    let _ = stop_tx.send(());
    let worst = watcher.await.unwrap();
    println!("flood: {sent} frames, closed after {elapsed:?}; other client's worst ping {worst:?}");
    let frame = close.expect("a close frame");
    assert_eq!(u16::from(frame.code), 1008);
    assert_eq!(frame.reason.as_str(), "rate limit exceeded");
    // Five flooded seconds: the close comes during the fifth (the windows start with the
    // connection, a moment before this client saw its welcome).
    assert!(
        elapsed >= Duration::from_millis(3_800) && elapsed < Duration::from_secs(6),
        "closed after {elapsed:?}"
    );
    assert!(worst < Duration::from_millis(500), "worst ping {worst:?}");
    assert_eq!(
        node.metric("pubgate_disconnects_total{reason=\"flood\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_client_just_over_the_rate_is_limited_but_not_closed() {
    // 1.5 x the limit for 6 s: limited all along, never a flood (that is more than 2x).
    let node = start_node(rate_config(20, 20)).await;
    let mut c = node.client().await;
    let started = Instant::now();
    let mut limited = 0;
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let reply = c.request(json!({"type":"ping","id":i})).await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "rate_limited");
            limited += 1;
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(33)).await;
    }
    assert!(limited > 0, "never limited after {i} messages");
    // Still open: a reply (a pong or rate_limited) carrying the id.
    assert_eq!(
        c.request(json!({"type":"ping","id":"last"})).await["id"],
        "last",
        "still open"
    );
    assert_eq!(
        node.metric("pubgate_disconnects_total{reason=\"flood\"}")
            .await,
        Some(0.0)
    );
}

/// A raw upgrade; returns the response and the stream (kept open to hold a 101).
async fn raw_upgrade(node: &TestNode, extra: &str) -> (Response, TcpStream) {
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let request = upgrade_request(node.addr).replace("\r\n\r\n", &format!("\r\n{extra}\r\n"));
    stream.write_all(request.as_bytes()).await.unwrap();
    let response = read_response(&mut stream, WAIT).await;
    (response, stream)
}

async fn wait_metric(node: &TestNode, sample: &str, value: f64) {
    let deadline = Instant::now() + WAIT;
    while node.metric(sample).await != Some(value) {
        assert!(Instant::now() < deadline, "{sample} never reached {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_connection_cap_is_exact_under_concurrency_and_released_on_close() {
    let node = std::sync::Arc::new(
        start_node(Config {
            max_connections: 5,
            ..test_config()
        })
        .await,
    );
    let attempts: Vec<_> = (0..24)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move { raw_upgrade(&node, "").await })
        })
        .collect();
    let mut open = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        let (response, stream) = attempt.await.unwrap();
        match response.status {
            101 => open.push(stream),
            503 => {
                assert_eq!(response.body, "connection limit reached\n");
                refused += 1;
            }
            other => panic!("status {other}: {response:?}"),
        }
    }
    assert_eq!((open.len(), refused), (5, 19));
    assert_eq!(
        node.metric("pubgate_upgrades_rejected_total{reason=\"max_connections\"}")
            .await,
        Some(19.0)
    );
    wait_metric(&node, "pubgate_connections", 5.0).await;
    // Closing releases the slots: five new ones fit again, the sixth does not.
    drop(open);
    wait_metric(&node, "pubgate_connections", 0.0).await;
    let mut again = Vec::new();
    for _ in 0..5 {
        let (response, stream) = raw_upgrade(&node, "").await;
        assert_eq!(response.status, 101, "{response:?}");
        again.push(stream);
    }
    assert_eq!(raw_upgrade(&node, "").await.0.status, 503);
    // A refused upgrade never became a connection.
    assert_eq!(node.metric("pubgate_connections_total").await, Some(10.0));
}

#[tokio::test]
async fn only_listed_origins_may_upgrade() {
    let node = start_node(Config {
        allowed_origins: Some(" https://app.example.com , http://localhost:3000".into()),
        ..test_config()
    })
    .await;
    for (origin, status) in [
        (None, 101),
        (Some("https://app.example.com"), 101),
        (Some("HTTPS://App.Example.COM"), 101),
        (Some("http://localhost:3000"), 101),
        (Some("https://evil.example.com"), 403),
        (Some("http://app.example.com"), 403),
        (Some("http://localhost:3001"), 403),
        (Some("https://app.example.com.evil.org"), 403),
        (Some("null"), 403),
    ] {
        let extra = origin
            .map(|o| format!("Origin: {o}\r\n"))
            .unwrap_or_default();
        let (response, _stream) = raw_upgrade(&node, &extra).await;
        assert_eq!(response.status, status, "{origin:?}: {response:?}");
        if status == 403 {
            assert_eq!(response.body, "origin not allowed\n");
        }
    }
    assert_eq!(
        node.metric("pubgate_upgrades_rejected_total{reason=\"origin\"}")
            .await,
        Some(5.0)
    );
}

#[tokio::test]
async fn a_slowloris_upgrade_is_cut_off_at_the_handshake_timeout() {
    let timeout = Duration::from_millis(600);
    let node = start_node(Config {
        handshake_timeout: timeout,
        ..test_config()
    })
    .await;
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    let request = upgrade_request(node.addr);
    let started = Instant::now();
    // One byte every 50 ms: the whole head would take several seconds.
    let mut cut_after = None;
    for byte in request.as_bytes() {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_after = Some(started.elapsed());
            break;
        }
        // A closed socket shows as EOF (or a 408) on the read side.
        let mut buf = [0u8; 256];
        if let Ok(read) =
            tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf)).await
        {
            match read {
                Ok(0) | Err(_) => {
                    cut_after = Some(started.elapsed());
                    break;
                }
                Ok(n) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    assert!(!text.contains(" 101 "), "upgraded: {text}");
                }
            }
        }
        assert!(started.elapsed() < Duration::from_secs(5), "never cut off");
    }
    let cut = cut_after.expect("the server cut the trickle off");
    println!("slowloris cut off after {cut:?}");
    assert!(
        cut >= timeout.saturating_sub(Duration::from_millis(100)) && cut < timeout * 3,
        "cut off after {cut:?} with a {timeout:?} timeout"
    );
    // Everyone else is served.
    let mut c = node.client().await;
    assert_eq!(
        c.request(json!({"type":"ping","id":1})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn thousands_of_subscribe_toggles_are_bounded_and_leave_a_consistent_state() {
    // The default limits: 100/s with a bucket of 200.
    let node = start_node(Config {
        rate_limit: 100,
        rate_burst: 200,
        ..test_config()
    })
    .await;
    let mut toggler = node.client().await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_latency(node.client().await, stop_rx));
    let toggles: Vec<Message> = (0..3000)
        .map(|i| {
            let kind = if i % 2 == 0 {
                "subscribe"
            } else {
                "unsubscribe"
            };
            Message::text(json!({"type":kind,"channel":"toggle","id":i}).to_string())
        })
        .collect();
    let started = Instant::now();
    let replies = burst(&mut toggler, &toggles).await;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(());
    let worst = watcher.await.unwrap();
    let executed: Vec<&Value> = replies
        .iter()
        .filter(|r| r["type"] == "subscribed" || r["type"] == "unsubscribed")
        .collect();
    let limited = replies
        .iter()
        .filter(|r| r["code"] == "rate_limited")
        .count();
    let other: Vec<&Value> = replies
        .iter()
        .filter(|r| !(r["type"] == "subscribed" || r["type"] == "unsubscribed"))
        .filter(|r| !(r["code"] == "rate_limited" || r["code"] == "not_subscribed"))
        .collect();
    println!(
        "toggles: {} executed, {limited} limited in {elapsed:?}; worst ping {worst:?}",
        executed.len()
    );
    assert!(other.is_empty(), "unexpected replies: {other:?}");
    let bound = 200.0 + 100.0 * elapsed.as_secs_f64() + 5.0;
    assert!(
        (executed.len() as f64) <= bound,
        "{} executed, bound {bound}",
        executed.len()
    );
    assert!(executed.len() >= 200, "the burst is executed");
    assert!(worst < Duration::from_millis(500), "worst ping {worst:?}");
    // The node's state matches the last executed toggle.
    let subscribed = replies
        .iter()
        .rev()
        .find(|r| r["type"] == "subscribed" || r["type"] == "unsubscribed")
        .map(|r| r["type"] == "subscribed")
        .unwrap();
    let expected = if subscribed { 1.0 } else { 0.0 };
    assert_eq!(node.metric("pubgate_subscriptions").await, Some(expected));
    assert_eq!(node.metric("pubgate_channels").await, Some(expected));
    // Still open, and not closed as a flood (one second of excess is not five).
    assert_eq!(
        toggler.request(json!({"type":"ping","id":"p"})).await["id"],
        "p"
    );
}
