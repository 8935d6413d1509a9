//! The HTTP side of a single node: health, readiness, metrics (every name of the contract from
//! start-up, and values that move), 404, and refused or malformed upgrades.

mod common;

use std::time::Duration;

use common::raw::{http_exchange, upgrade_request, RawClient, KEY};
use common::{http_request, metric_value, start_node, test_config, TestNode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A request must be answered within this (never a hang).
const PROMPT: Duration = Duration::from_secs(2);

#[tokio::test]
async fn healthz_is_200() {
    let node = start_node(test_config()).await;
    let (status, _) = node.http_get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn readyz_is_200_on_the_memory_broker() {
    let node = start_node(test_config()).await;
    let (status, body) = node.http_get("/readyz").await;
    assert_eq!(status, 200, "body {body:?}");
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let node = start_node(test_config()).await;
    for path in [
        "/",
        "/nope",
        "/healthz/extra",
        "/ws/extra",
        "/metricsx",
        "/WS",
    ] {
        let (status, _) = node.http_get(path).await;
        assert_eq!(status, 404, "path {path}");
    }
}

/// Every metric family of the contract with its Prometheus type.
const FAMILIES: [(&str, &str); 10] = [
    ("pubgate_connections", "gauge"),
    ("pubgate_connections_total", "counter"),
    ("pubgate_subscriptions", "gauge"),
    ("pubgate_channels", "gauge"),
    ("pubgate_messages_published_total", "counter"),
    ("pubgate_messages_delivered_total", "counter"),
    ("pubgate_messages_dropped_total", "counter"),
    ("pubgate_broker_up", "gauge"),
    ("pubgate_broker_reconnects_total", "counter"),
    ("pubgate_publish_duration_seconds", "histogram"),
];

#[tokio::test]
async fn metrics_export_every_contract_name_from_start_up() {
    let node = start_node(test_config()).await;
    let resp = http_exchange(
        node.addr,
        format!(
            "GET /metrics HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            node.addr
        )
        .as_bytes(),
        PROMPT,
    )
    .await;
    assert_eq!(resp.status, 200);
    let content_type = common::raw::header(&resp.head, "content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/plain"),
        "Prometheus text format, got content-type {content_type:?}"
    );
    let body = resp.body;
    for (name, kind) in FAMILIES {
        assert!(
            body.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "`# TYPE {name} {kind}` missing from:\n{body}"
        );
    }
    let zero = [
        "pubgate_connections",
        "pubgate_connections_total",
        "pubgate_subscriptions",
        "pubgate_channels",
        "pubgate_messages_published_total",
        "pubgate_messages_delivered_total",
        "pubgate_messages_dropped_total{reason=\"slow_consumer\"}",
        "pubgate_broker_reconnects_total",
        "pubgate_publish_duration_seconds_count",
        "pubgate_publish_duration_seconds_sum",
        "pubgate_publish_duration_seconds_bucket{le=\"+Inf\"}",
    ];
    for sample in zero {
        assert_eq!(
            metric_value(&body, sample),
            Some(0.0),
            "{sample} is exported at 0 from start-up:\n{body}"
        );
    }
    assert_eq!(metric_value(&body, "pubgate_broker_up"), Some(1.0));
    // The histogram has finite buckets too.
    assert!(
        body.lines()
            .filter(|l| l.starts_with("pubgate_publish_duration_seconds_bucket{le="))
            .count()
            >= 2,
        "histogram buckets:\n{body}"
    );
}

/// Polls one sample until it has the expected value; panics after the wait.
async fn wait_metric(node: &TestNode, sample: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let value = node.metric(sample).await;
        if value == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} is {value:?}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn metric(node: &TestNode, sample: &str) -> f64 {
    node.metric(sample)
        .await
        .unwrap_or_else(|| panic!("{sample} missing"))
}

#[tokio::test]
async fn metrics_follow_connections_subscriptions_and_messages() {
    let node = start_node(test_config()).await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    // Values change before the reply that reports the change, or at the latest right after the
    // welcome; poll briefly to stay independent of that.
    wait_metric(&node, "pubgate_connections", 2.0).await;
    assert_eq!(metric(&node, "pubgate_connections_total").await, 2.0);

    a.subscribe("x").await;
    a.subscribe("y").await;
    b.subscribe("x").await;
    // Subscribing again changes nothing.
    b.subscribe("x").await;
    assert_eq!(metric(&node, "pubgate_subscriptions").await, 3.0);
    assert_eq!(metric(&node, "pubgate_channels").await, 2.0);

    // One publish to a channel with 2 local subscribers.
    let mut p = node.client().await;
    wait_metric(&node, "pubgate_connections", 3.0).await;
    p.publish("x", json!("hello")).await;
    a.recv().await;
    b.recv().await;
    wait_metric(&node, "pubgate_messages_published_total", 1.0).await;
    assert_eq!(
        metric(&node, "pubgate_publish_duration_seconds_count").await,
        1.0
    );
    // A delivery is counted per receiving connection.
    wait_metric(&node, "pubgate_messages_delivered_total", 2.0).await;
    // A publish nobody receives is still a publish, and delivers nothing.
    p.publish("nobody", json!(1)).await;
    wait_metric(&node, "pubgate_messages_published_total", 2.0).await;
    assert_eq!(metric(&node, "pubgate_messages_delivered_total").await, 2.0);
    assert_eq!(
        metric(
            &node,
            "pubgate_messages_dropped_total{reason=\"slow_consumer\"}"
        )
        .await,
        0.0
    );

    // Unsubscribe: a pair goes, the channel stays while b is there.
    a.request(json!({"type":"unsubscribe","channel":"x"})).await;
    assert_eq!(metric(&node, "pubgate_subscriptions").await, 2.0);
    assert_eq!(metric(&node, "pubgate_channels").await, 2.0);
    a.request(json!({"type":"unsubscribe","channel":"y"})).await;
    assert_eq!(metric(&node, "pubgate_subscriptions").await, 1.0);
    assert_eq!(metric(&node, "pubgate_channels").await, 1.0);

    // Disconnects: b's subscription and channel go with it, the gauge follows, the total stays.
    b.ws.close(None).await.unwrap();
    wait_metric(&node, "pubgate_subscriptions", 0.0).await;
    wait_metric(&node, "pubgate_channels", 0.0).await;
    wait_metric(&node, "pubgate_connections", 2.0).await;
    drop(a);
    wait_metric(&node, "pubgate_connections", 1.0).await;
    assert_eq!(metric(&node, "pubgate_connections_total").await, 3.0);
    drop(p);
    wait_metric(&node, "pubgate_connections", 0.0).await;
    assert_eq!(metric(&node, "pubgate_broker_up").await, 1.0);
}

#[tokio::test]
async fn a_plain_get_on_ws_is_refused_at_once() {
    let node = start_node(test_config()).await;
    let started = Instant::now();
    // `Connection: close` and no upgrade headers.
    let (status, _) = node.http_get("/ws").await;
    assert!(status == 426 || status == 400, "status {status}");
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());
    // A keep-alive request: the answer must come without the server closing first.
    let resp = http_exchange(
        node.addr,
        format!("GET /ws HTTP/1.1\r\nHost: {}\r\n\r\n", node.addr).as_bytes(),
        PROMPT,
    )
    .await;
    assert!(resp.status == 426 || resp.status == 400, "{resp:?}");
}

#[tokio::test]
async fn an_upgrade_with_a_bad_version_is_400() {
    let node = start_node(test_config()).await;
    for version in ["12", "8", "abc"] {
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: {version}\r\n\r\n",
            addr = node.addr
        );
        let resp = http_exchange(node.addr, request.as_bytes(), PROMPT).await;
        assert_eq!(resp.status, 400, "version {version}: {resp:?}");
        // RFC 6455 section 4.2.2: a version the server does not speak is answered with the
        // versions it does speak.
        assert_eq!(
            common::raw::header(&resp.head, "sec-websocket-version").as_deref(),
            Some("13"),
            "Sec-WebSocket-Version in {resp:?}"
        );
    }
    // A connected client is not disturbed.
    let mut c = node.client().await;
    assert_eq!(
        c.request(json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );
}

#[tokio::test]
async fn an_upgrade_without_a_key_is_refused_with_a_status() {
    let node = start_node(test_config()).await;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n",
        addr = node.addr
    );
    let resp = http_exchange(node.addr, request.as_bytes(), PROMPT).await;
    assert!(resp.status == 400 || resp.status == 426, "{resp:?}");
}

#[tokio::test]
async fn a_valid_upgrade_answers_101_with_the_accept_key() {
    // RawClient::connect checks the 101 and Sec-WebSocket-Accept against RFC 6455's example.
    let node = start_node(test_config()).await;
    let raw = RawClient::connect(node.addr).await;
    assert_eq!(raw.welcome["node"], node.node_id.as_str());
    // The same request parsed by hand: upgrade headers present.
    let mut stream = TcpStream::connect(node.addr).await.unwrap();
    stream
        .write_all(upgrade_request(node.addr).as_bytes())
        .await
        .unwrap();
    let resp = common::raw::read_response(&mut stream, PROMPT).await;
    assert_eq!(resp.status, 101);
    let upgrade = common::raw::header(&resp.head, "upgrade").unwrap_or_default();
    assert!(upgrade.eq_ignore_ascii_case("websocket"), "{resp:?}");
}

#[tokio::test]
async fn garbage_instead_of_http_is_answered_or_closed_never_hung() {
    let node = start_node(test_config()).await;
    for garbage in [
        &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
        b"NONSENSE\r\n\r\n",
        b"GET\r\n\r\n",
    ] {
        let mut stream = TcpStream::connect(node.addr).await.unwrap();
        stream.write_all(garbage).await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(PROMPT, stream.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "no answer and no close for {garbage:?}");
        let text = String::from_utf8_lossy(&buf);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 400"),
            "{garbage:?} answered {text:?}"
        );
    }
    let (status, _) = http_request(
        node.addr,
        &format!(
            "GET /healthz HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            node.addr
        ),
    )
    .await;
    assert_eq!(status, 200);
}

/// `PUBGATE_INTERNAL_LISTEN` splits the routes: the client address serves the WebSocket and
/// health only, the internal one metrics, the API and health only; each answers 404 for the
/// other's routes, like an unknown path.
#[tokio::test]
async fn an_internal_listener_takes_metrics_and_api_off_the_client_address() {
    let node = start_node(pubgate::Config {
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let internal = node.internal.expect("internal address bound");
    assert_ne!(internal, node.addr);
    for (path, status) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 404),
        ("/api/publish", 404),
        ("/api", 404),
    ] {
        let (got, body) = node.http_get(path).await;
        assert_eq!(got, status, "client {path}: {body:?}");
        assert!(!body.contains("pubgate_connections"), "{body}");
    }
    for (path, status) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/ws", 404),
        ("/api/publish", 404),
        ("/nope", 404),
    ] {
        let (got, body) = common::http_get(internal, path).await;
        assert_eq!(got, status, "internal {path}: {body:?}");
    }
    let (_, metrics) = common::http_get(internal, "/metrics").await;
    assert!(metrics.contains("pubgate_connections "), "{metrics}");
    // A WebSocket upgrade on the internal address is not served.
    let resp = http_exchange(internal, upgrade_request(internal).as_bytes(), PROMPT).await;
    assert_eq!(resp.status, 404, "{}", resp.head);
    // The client address still upgrades, and the internal metrics see the connection.
    let mut client = node.client().await;
    client.subscribe("news").await;
    wait_metric(&node, "pubgate_connections", 1.0).await;
    drop(client);
}

/// Without `PUBGATE_INTERNAL_LISTEN` everything stays on one address, as in v1; `/api/*` is a
/// 404 until the server API is configured.
#[tokio::test]
async fn without_an_internal_listener_one_address_serves_everything() {
    let node = start_node(test_config()).await;
    assert!(node.internal.is_none());
    assert_eq!(node.http_get("/metrics").await.0, 200);
    assert_eq!(node.http_get("/api/publish").await.0, 404);
    let _client = node.client().await;
}

/// The internal listener answers health and metrics through the drain delay and is closed once
/// the node has stopped.
#[tokio::test]
async fn the_internal_listener_drains_and_stops_with_the_node() {
    let mut node = start_node(pubgate::Config {
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        drain_delay: Duration::from_millis(1500),
        ..test_config()
    })
    .await;
    let internal = node.internal.unwrap();
    node.signal_stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(common::http_get(internal, "/readyz").await.0, 503);
    assert_eq!(common::http_get(internal, "/metrics").await.0, 200);
    node.stop().await.unwrap();
    assert!(
        TcpStream::connect(internal).await.is_err(),
        "internal listener still accepting after the node stopped"
    );
}
