//! Budgets for slow and stalled clients (contract v1.2): nothing a client does or fails to do
//! holds a node's memory or a socket for longer than ping interval + pong timeout, or more bytes
//! than its send budget plus a bounded read side.
//!
//! The memory tests run the release binary as a child process and read its RSS from
//! `/proc/<pid>/status`; they print the figures they measure (run with `--nocapture`).

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::raw::{masked, RawClient, OP_CONT, OP_PONG, OP_TEXT};
use common::redis::{RedisServer, TcpProxy};
use common::{http_get, metric_value, start_node, test_config, Client, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};
use tokio_tungstenite::tungstenite::Message;

const SLOW: &str = "pubgate_disconnects_total{reason=\"slow_consumer\"}";
const PONG_TIMEOUT: &str = "pubgate_disconnects_total{reason=\"pong_timeout\"}";
const DROPPED_SLOW: &str = "pubgate_messages_dropped_total{reason=\"slow_consumer\"}";
const TOO_BIG: &str = "pubgate_messages_dropped_total{reason=\"too_big\"}";
const QUEUED: &str = "pubgate_send_queued_bytes";
const MIB: u64 = 1 << 20;
/// A client receive buffer small enough that the node's frames pile up at once.
const SMALL_RCVBUF: u32 = 4096;

/// The release binary, started for one test.
struct Binary {
    addr: SocketAddr,
    child: Child,
}

impl Binary {
    async fn start(env: &[(&str, &str)]) -> Binary {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate"));
        cmd.env_clear()
            .env("PUBGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("PUBGATE_NODE_ID", format!("budgets-{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start target/release/pubgate");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if tokio::net::TcpStream::connect(addr).await.is_ok()
                && http_get(addr, "/readyz").await.0 == 200
            {
                break;
            }
            assert!(Instant::now() < deadline, "the node did not become ready");
            sleep(Duration::from_millis(50)).await;
        }
        Binary { addr, child }
    }

    /// A field of `/proc/<pid>/status` in KiB (`VmRSS`, `VmHWM`).
    fn status_kib(&self, field: &str) -> u64 {
        let pid = self.child.id().expect("running");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
    }

    fn rss(&self) -> u64 {
        self.status_kib("VmRSS") * 1024
    }

    async fn metric(&self, sample: &str) -> f64 {
        let (_, body) = http_get(self.addr, "/metrics").await;
        metric_value(&body, sample).unwrap_or_else(|| panic!("{sample} not exported"))
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

/// Samples the node's RSS and queued-bytes gauge until stopped; returns the peaks.
fn sample_peaks(node: &Binary, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(u64, u64)> {
    let pid = node.child.id().unwrap();
    let addr = node.addr;
    tokio::spawn(async move {
        let (mut rss, mut queued) = (0u64, 0u64);
        while !stop.load(Ordering::Relaxed) {
            if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                let kib: u64 = status
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                rss = rss.max(kib * 1024);
            }
            let (_, body) = http_get(addr, "/metrics").await;
            queued = queued.max(metric_value(&body, QUEUED).unwrap_or(0.0) as u64);
            sleep(Duration::from_millis(20)).await;
        }
        (rss, queued)
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Waits until `sample` reaches `at_least`; returns when, or panics after `limit`.
async fn wait_metric(node_addr: SocketAddr, sample: &str, at_least: f64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let (_, body) = http_get(node_addr, "/metrics").await;
        let v = metric_value(&body, sample).unwrap_or(0.0);
        if v >= at_least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {v} after {limit:?}, expected {at_least}"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

async fn subscribe_raw(raw: &mut RawClient, channel: &str) {
    raw.send_json(&json!({"type":"subscribe","channel":channel,"id":1}))
        .await;
    assert_eq!(
        raw.recv_json().await,
        json!({"type":"subscribed","channel":channel,"id":1})
    );
}

#[tokio::test]
async fn stalled_readers_under_a_64k_flood_hold_at_most_their_budget_and_are_closed() {
    const STALLED: usize = 4;
    let redis = RedisServer::start().await;
    let prefix = format!("budgets{:08x}:", common::rand_u32());
    let node = Binary::start(&[
        ("PUBGATE_REDIS_URL", &redis.url()),
        ("PUBGATE_CHANNEL_PREFIX", &prefix),
        ("PUBGATE_PING_INTERVAL", "1s"),
        ("PUBGATE_PONG_TIMEOUT", "1s"),
        ("PUBGATE_SEND_BUFFER", "1MiB"),
    ])
    .await;
    let limit = Duration::from_secs(2);

    // A healthy subscriber that reads everything, and notes the longest gap between messages.
    let mut healthy = Client::connect(&node.ws_url()).await;
    healthy.subscribe("flood").await;
    let received = Arc::new(AtomicU64::new(0));
    let longest_gap_ms = Arc::new(AtomicU64::new(0));
    let reader = tokio::spawn({
        let (received, longest_gap_ms) = (received.clone(), longest_gap_ms.clone());
        async move {
            let mut last = Instant::now();
            while let Some(Ok(m)) = healthy.ws.next().await {
                if let Message::Text(t) = m {
                    let v: Value = serde_json::from_str(&t).unwrap();
                    assert_eq!(v["type"], "message");
                    if received.fetch_add(1, Ordering::Relaxed) > 0 {
                        let gap = last.elapsed().as_millis() as u64;
                        longest_gap_ms.fetch_max(gap, Ordering::Relaxed);
                    }
                    last = Instant::now();
                }
            }
        }
    });
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut raw = RawClient::connect_small_buffer(node.addr, SMALL_RCVBUF).await;
        subscribe_raw(&mut raw, "flood").await;
        stalled.push(raw);
    }
    sleep(Duration::from_millis(500)).await;
    let before = node.rss();

    let stop = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(&node, stop.clone());
    let flood = tokio::spawn({
        let stop = stop.clone();
        let mut backend = redis.backend().await;
        let prefix = prefix.clone();
        async move {
            let pad = "x".repeat(65_500);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let payload = format!("{{\"i\":{i},\"pad\":\"{pad}\"}}");
                assert!(payload.len() <= 65_536);
                backend.publish(&prefix, "flood", payload).await;
                i += 1;
                sleep(Duration::from_millis(5)).await;
            }
            i
        }
    });
    let started = Instant::now();
    wait_metric(
        node.addr,
        SLOW,
        STALLED as f64,
        limit + Duration::from_secs(8),
    )
    .await;
    let all_closed = started.elapsed();
    let at_close = received.load(Ordering::Relaxed);
    // The flood goes on: the healthy subscriber keeps receiving.
    sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let published = flood.await.unwrap();
    let (peak, peak_queued) = peaks.await.unwrap();
    let hwm = node.status_kib("VmHWM") * 1024;
    let got = received.load(Ordering::Relaxed);
    let gap = Duration::from_millis(longest_gap_ms.load(Ordering::Relaxed));
    let dropped = node.metric(DROPPED_SLOW).await;
    eprintln!(
        "{STALLED} stalled readers (SO_RCVBUF {SMALL_RCVBUF}) under {published} x 64 KiB: RSS \
         {} before, peak {} (VmHWM {}), growth {}; peak queued-bytes gauge {}; all closed and \
         counted {all_closed:?} after the flood started; dropped{{slow_consumer}} {dropped}; \
         healthy client got {got} messages ({at_close} when the last stalled one closed), \
         longest gap {gap:?}",
        mib(before),
        mib(peak),
        mib(hwm),
        mib(peak.saturating_sub(before)),
        mib(peak_queued),
    );
    let budget = STALLED as u64 * MIB;
    let margin = 24 * MIB;
    assert!(
        peak <= before + budget + margin,
        "RSS grew by {} with {STALLED} stalled readers of 1 MiB budget",
        mib(peak - before)
    );
    // The gauge counts what the node holds: the stalled ones' budgets at most, plus the healthy
    // subscriber's few frames in flight.
    assert!(
        peak_queued <= budget + 2 * MIB,
        "queued-bytes peak {peak_queued}"
    );
    assert!(all_closed <= limit + Duration::from_secs(6));
    assert_eq!(node.metric(SLOW).await, STALLED as f64);
    assert!(
        got > at_close,
        "the healthy subscriber kept receiving ({at_close} then {got})"
    );
    assert!(gap < Duration::from_secs(1), "healthy gap {gap:?}");
    assert_eq!(node.metric("pubgate_connections").await, 1.0);
    // The stalled sockets were really ended: each reads its backlog then the end.
    for mut raw in stalled {
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match raw.stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(ended.is_ok(), "a stalled client's connection still open");
    }
    reader.abort();
}

/// A subscriber whose socket stops accepting bytes in the middle of one 8 MiB frame (far more
/// than any kernel buffer here holds), so nothing overflows: only the stall deadline can end it.
async fn stalled_mid_frame(keep_talking: bool) -> (Duration, f64, f64) {
    let ping = Duration::from_millis(500);
    let pong = Duration::from_millis(500);
    let node = start_node(pubgate::Config {
        ping_interval: ping,
        pong_timeout: pong,
        max_message_size: 16 << 20,
        send_buffer: 64 << 20,
        ..test_config()
    })
    .await;
    let mut raw = RawClient::connect_small_buffer(node.addr, SMALL_RCVBUF).await;
    subscribe_raw(&mut raw, "big").await;
    let (mut rd, mut wr) = raw.stream.into_split();
    // Never reads; sends an unsolicited Pong every 100 ms (when `keep_talking`), so the
    // dead-peer rule does not apply and the stall deadline alone must close it.
    let talker = tokio::spawn(async move {
        if keep_talking {
            while wr.write_all(&masked(true, OP_PONG, b"")).await.is_ok() {
                sleep(Duration::from_millis(100)).await;
            }
        }
        // Keeps the write half (and so the socket) open until the test is done.
        std::future::pending::<()>().await;
    });
    let mut publisher = node.client().await;
    // tungstenite's default frame limit is 16 MiB: one 8 MiB text frame is fine.
    publisher.publish("big", json!("y".repeat(8 << 20))).await;
    let published = Instant::now();
    // The publisher would not answer the server's pings while the test waits: let it go.
    drop(publisher);
    let slow_before = node.metric(SLOW).await.unwrap();
    let deadline = published + ping + pong + Duration::from_secs(4);
    let closed = loop {
        let slow = node.metric(SLOW).await.unwrap();
        let silent = node.metric(PONG_TIMEOUT).await.unwrap();
        if slow + silent > slow_before {
            break published.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "a connection stalled mid-frame still open after {:?}",
            published.elapsed()
        );
        sleep(Duration::from_millis(20)).await;
    };
    // The socket is really gone: the client reads what the kernel held, then the end.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    })
    .await
    .expect("the stalled connection ends");
    if keep_talking {
        // Dropped at once without finishing the frame. (A silent client is closed by the
        // dead-peer rule instead, which gives a reader the pong timeout to take the rest.)
        assert!(ended < 8 << 20, "the whole frame went out ({ended} bytes)");
    }
    talker.abort();
    let counts = (
        node.metric(SLOW).await.unwrap(),
        node.metric(PONG_TIMEOUT).await.unwrap(),
    );
    eprintln!(
        "stalled mid-frame (client {}): closed {closed:?} after the publish (ping + pong = \
         {:?}); client had read {ended} of {} bytes; slow_consumer {}, pong_timeout {}",
        if keep_talking {
            "sending pongs"
        } else {
            "silent"
        },
        ping + pong,
        8 << 20,
        counts.0,
        counts.1,
    );
    // Other connections are unaffected.
    let mut other = node.client().await;
    assert_eq!(
        other.request(json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
    (closed, counts.0, counts.1)
}

#[tokio::test]
async fn a_write_stalled_mid_frame_is_closed_after_ping_interval_plus_pong_timeout() {
    let (closed, slow, silent) = stalled_mid_frame(true).await;
    assert_eq!((slow, silent), (1.0, 0.0), "counted as a slow consumer");
    assert!(
        closed >= Duration::from_millis(900),
        "closed early: {closed:?}"
    );
}

#[tokio::test]
async fn a_silent_client_is_closed_on_time_even_while_a_write_to_it_is_blocked() {
    let (closed, slow, silent) = stalled_mid_frame(false).await;
    // Both rules are due at about the same time; either may win.
    assert_eq!(slow + silent, 1.0);
    assert!(
        closed >= Duration::from_millis(500),
        "closed early: {closed:?}"
    );
}

#[tokio::test]
async fn a_ping_flood_against_a_zero_window_is_bounded_and_closed() {
    let node = Binary::start(&[
        ("PUBGATE_PING_INTERVAL", "1s"),
        ("PUBGATE_PONG_TIMEOUT", "1s"),
    ])
    .await;
    let raw = RawClient::connect_small_buffer(node.addr, SMALL_RCVBUF).await;
    sleep(Duration::from_millis(300)).await;
    let before = node.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(&node, stop.clone());
    let (_rd, mut wr) = raw.stream.into_split();
    let pings: Vec<u8> = (0..500)
        .flat_map(|_| masked(true, 0x9, &[b'p'; 125]))
        .collect();
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        while wr.write_all(&pings).await.is_ok() {
            sent += 500;
        }
        sent
    });
    let sent = tokio::time::timeout(Duration::from_secs(20), flood)
        .await
        .expect("the flooding connection is closed within 20 s")
        .unwrap();
    let closed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (peak, peak_queued) = peaks.await.unwrap();
    wait_metric(node.addr, SLOW, 1.0, WAIT).await;
    eprintln!(
        "ping flood against a zero window: {sent} pings sent, closed after {closed:?}; RSS {} \
         before, peak {} (growth {}); peak queued-bytes gauge {peak_queued} B",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
    );
    // Without conn::capped the parser's read buffer grew to 16 MiB here.
    assert!(
        peak <= before + 8 * MIB,
        "RSS grew by {}",
        mib(peak - before)
    );
    assert!(peak_queued < 64 * 1024, "queued-bytes peak {peak_queued}");
    assert_eq!(node.metric("pubgate_connections").await, 0.0);
}

#[tokio::test]
async fn thousands_of_requests_never_read_are_bounded_and_closed() {
    let node = Binary::start(&[
        ("PUBGATE_PING_INTERVAL", "1s"),
        ("PUBGATE_PONG_TIMEOUT", "1s"),
        ("PUBGATE_RATE_LIMIT", "0"),
    ])
    .await;
    let mut raw = RawClient::connect_small_buffer(node.addr, SMALL_RCVBUF).await;
    subscribe_raw(&mut raw, "room").await;
    sleep(Duration::from_millis(300)).await;
    let before = node.rss();
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = sample_peaks(&node, stop.clone());
    let (_rd, mut wr) = raw.stream.into_split();
    // About 25 MB of requests, more than the kernel's buffers on both sides hold.
    const REQUESTS: u64 = 400_000;
    let started = Instant::now();
    let flood = tokio::spawn(async move {
        let mut sent = 0u64;
        let mut chunk = Vec::new();
        for i in 0..REQUESTS {
            let text = format!(r#"{{"type":"presence","channel":"room","id":{i}}}"#);
            chunk.extend_from_slice(&masked(true, OP_TEXT, text.as_bytes()));
            if chunk.len() > 32 * 1024 || i + 1 == REQUESTS {
                if wr.write_all(&chunk).await.is_err() {
                    return (sent, false);
                }
                sent = i + 1;
                chunk.clear();
            }
        }
        // Everything went out: wait for the node to end the connection.
        let _ = wr.shutdown().await;
        (sent, true)
    });
    let closed_within = Duration::from_secs(20);
    let deadline = Instant::now() + closed_within;
    while node.metric("pubgate_connections").await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "a client that never reads its replies still connected"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let closed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (sent, all_sent) = flood.await.unwrap();
    let (peak, peak_queued) = peaks.await.unwrap();
    let slow = node.metric(SLOW).await;
    let silent = node.metric(PONG_TIMEOUT).await;
    eprintln!(
        "{sent} presence requests written (all: {all_sent}) and no reply read: closed after \
         {closed:?} (slow_consumer {slow}, pong_timeout {silent}); RSS {} before, peak {} \
         (growth {}); peak queued-bytes gauge {}",
        mib(before),
        mib(peak),
        mib(peak.saturating_sub(before)),
        mib(peak_queued),
    );
    // What the client wrote past that sits in kernel buffers (the node's receive buffer grows
    // to tcp_rmem's maximum, 32 MiB here), outside the node's heap: the node stopped reading
    // once PUBGATE_SEND_QUEUE replies (1024, about 0.1 MiB here) were waiting.
    assert_eq!(slow + silent, 1.0);
    assert!(
        peak_queued > 0 && peak_queued <= MIB + 4096,
        "queued-bytes peak {peak_queued}"
    );
    assert!(
        peak <= before + MIB + 8 * MIB,
        "RSS grew by {}",
        mib(peak - before)
    );
}

#[tokio::test]
async fn unfinished_fragmented_messages_on_many_connections_are_bounded() {
    const CONNS: usize = 200;
    const MAX: usize = 65_536;
    let node = Binary::start(&[
        ("PUBGATE_PING_INTERVAL", "60s"),
        ("PUBGATE_PONG_TIMEOUT", "60s"),
        ("PUBGATE_MAX_MESSAGE_SIZE", "65536"),
    ])
    .await;
    sleep(Duration::from_millis(300)).await;
    let empty = node.rss();
    let mut conns = Vec::new();
    for _ in 0..CONNS {
        conns.push(RawClient::connect(node.addr).await);
    }
    sleep(Duration::from_millis(500)).await;
    let idle = node.rss();
    // Each starts a text message just under the limit and never finishes it.
    let first = masked(false, OP_TEXT, &vec![b'a'; MAX - 100]);
    for c in conns.iter_mut() {
        c.send_raw(&first).await.unwrap();
    }
    sleep(Duration::from_secs(1)).await;
    let held = node.rss();
    let per_idle = idle.saturating_sub(empty) / CONNS as u64;
    let per_partial = held.saturating_sub(idle) / CONNS as u64;
    eprintln!(
        "{CONNS} connections: RSS {} empty, {} idle ({} B each), {} with an unfinished \
         {} B message each ({} B more each)",
        mib(empty),
        mib(idle),
        per_idle,
        mib(held),
        MAX - 100,
        per_partial,
    );
    // The read side holds at most the message (max size) and the frame buffer it came through.
    assert!(
        per_partial <= 2 * MAX as u64 + 16 * 1024,
        "{per_partial} B per unfinished message"
    );
    assert_eq!(node.metric("pubgate_connections").await, CONNS as f64);
    // One more fragment past the limit: 1009, whatever the fragments' sizes.
    let mut c = conns.pop().unwrap();
    c.send_raw(&masked(false, OP_CONT, &[b'a'; 200]))
        .await
        .unwrap();
    c.expect_close_code(1009).await;
}

#[tokio::test]
async fn an_oversized_backend_payload_is_dropped_and_counted() {
    let redis = RedisServer::start().await;
    let prefix = format!("budgets{:08x}:", common::rand_u32());
    let node = start_node(pubgate::Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.clone(),
        max_message_size: 1000,
        ..test_config()
    })
    .await;
    wait_ready(node.addr).await;
    assert_eq!(node.metric(TOO_BIG).await, Some(0.0));
    let mut c = node.client().await;
    c.subscribe("news").await;
    let mut backend = redis.backend().await;
    let at_limit = format!("\"{}\"", "a".repeat(998));
    let over = format!("\"{}\"", "b".repeat(999));
    backend.publish(&prefix, "news", at_limit.as_str()).await;
    backend.publish(&prefix, "news", over.as_str()).await;
    backend.publish(&prefix, "news", "{\"after\":1}").await;
    let first = c.recv().await;
    assert_eq!(first["data"].as_str().map(str::len), Some(998));
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"news","data":{"after":1}}),
        "the oversized payload was not delivered; the next one was"
    );
    assert_eq!(node.metric(TOO_BIG).await, Some(1.0));
    assert_eq!(
        node.metric("pubgate_messages_dropped_total{reason=\"slow_consumer\"}")
            .await,
        Some(0.0)
    );
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + WAIT;
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "node not ready");
        sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_timed_out_publish_answers_timeout_and_a_refused_one_unavailable() {
    let mut redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.addr()).await;
    let prefix = format!("budgets{:08x}:", common::rand_u32());
    let node = start_node(pubgate::Config {
        redis_url: Some(proxy.url()),
        channel_prefix: prefix.clone(),
        redis_timeout: Duration::from_millis(500),
        // No probe during the test: the broker stays "up" while its commands go unanswered.
        broker_probe_interval: Duration::from_secs(600),
        ..test_config()
    })
    .await;
    wait_ready(node.addr).await;
    let mut c = node.client().await;
    assert_eq!(
        c.request(json!({"type":"publish","channel":"t","data":1,"id":1}))
            .await,
        json!({"type":"published","channel":"t","id":1})
    );
    // Commands reach the proxy and are never answered: the outcome is unknown.
    proxy.set_blackhole(true);
    let asked = Instant::now();
    let reply = c
        .request(json!({"type":"publish","channel":"t","data":2,"id":2}))
        .await;
    let took = asked.elapsed();
    eprintln!("blackholed publish answered after {took:?}: {reply}");
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "timeout", "{reply}");
    assert_eq!(reply["id"], 2);
    assert!(took >= Duration::from_millis(450) && took < Duration::from_secs(3));
    assert_eq!(
        node.metric("pubgate_requests_rejected_total{reason=\"timeout\"}")
            .await,
        Some(1.0)
    );
    // Redis gone: the broker is down and a publish is refused before anything is sent.
    proxy.set_blackhole(false);
    proxy.close_all();
    redis.kill();
    let deadline = Instant::now() + WAIT;
    while http_get(node.addr, "/readyz").await.0 == 200 {
        assert!(
            Instant::now() < deadline,
            "broker still up after redis died"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let reply = c
        .request(json!({"type":"publish","channel":"t","data":3,"id":3}))
        .await;
    assert_eq!(reply["code"], "unavailable", "{reply}");
}
