//! Graceful shutdown: `/readyz` 503 and new upgrades refused with 503 at once, existing clients
//! served for the drain delay, then close 1001 for each and `run` returns Ok within the shutdown
//! timeout, even with a client whose socket does not drain.

mod common;

use std::time::Duration;

use common::raw::{http_exchange, upgrade_request, Closed, RawClient};
use common::{close_code, start_node, test_config};
use serde_json::json;
use tokio::time::Instant;

#[tokio::test]
async fn draining_refuses_new_work_serves_existing_clients_then_closes_1001() {
    let drain = Duration::from_millis(1_500);
    let shutdown_timeout = Duration::from_secs(5);
    let mut node = start_node(pubgate::Config {
        drain_delay: drain,
        shutdown_timeout,
        ..test_config()
    })
    .await;
    let mut sub = node.client().await;
    let mut publisher = node.client().await;
    sub.subscribe("news").await;
    assert_eq!(node.http_get("/readyz").await.0, 200);

    node.signal_stop();
    let stopped = Instant::now();

    // /readyz turns 503 at once (well inside the drain delay), with a short reason.
    let (status, body) = loop {
        let (status, body) = node.http_get("/readyz").await;
        if status == 503 || stopped.elapsed() > Duration::from_millis(500) {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 503, "/readyz after the stop signal");
    assert!(
        !body.trim().is_empty() && body.len() < 200,
        "a short reason in the body: {body:?}"
    );
    // Liveness and metrics keep answering.
    assert_eq!(node.http_get("/healthz").await.0, 200);
    let (status, metrics) = node.http_get("/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(
        common::metric_value(&metrics, "pubgate_connections"),
        Some(2.0)
    );
    // A new upgrade is refused with HTTP 503.
    let resp = http_exchange(
        node.addr,
        upgrade_request(node.addr).as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(resp.status, 503, "upgrade while draining: {resp:?}");
    let refused_at = stopped.elapsed();
    assert!(
        refused_at < drain,
        "the checks took {refused_at:?}, longer than the drain delay: the test proves nothing"
    );

    // Existing clients are still served during the drain.
    publisher.publish("news", json!("during drain")).await;
    assert_eq!(
        sub.recv().await,
        json!({"type":"message","channel":"news","data":"during drain"})
    );
    assert_eq!(
        sub.request(json!({"type":"ping","id":1})).await,
        json!({"type":"pong","id":1})
    );

    // Then every client gets close 1001, not before the drain delay has passed.
    for client in [&mut sub, &mut publisher] {
        let frame = client
            .expect_close_within(drain + Duration::from_secs(3))
            .await;
        assert_eq!(close_code(&frame), Some(1001), "close frame {frame:?}");
    }
    let closed_at = stopped.elapsed();
    assert!(
        closed_at >= drain - Duration::from_millis(50),
        "clients closed after {closed_at:?}, before the drain delay {drain:?}"
    );
    node.stop().await.expect("run returns Ok");
    let total = stopped.elapsed();
    assert!(
        total <= shutdown_timeout + Duration::from_millis(500),
        "stopped after {total:?}, shutdown timeout {shutdown_timeout:?}"
    );
}

#[tokio::test]
async fn without_a_drain_delay_a_node_with_clients_stops_promptly() {
    let node = start_node(pubgate::Config {
        drain_delay: Duration::ZERO,
        shutdown_timeout: Duration::from_secs(5),
        ..test_config()
    })
    .await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut c = node.client().await;
        c.subscribe(&format!("ch{i}")).await;
        c.subscribe("shared").await;
        clients.push(c);
    }
    // A raw client too, which answers the close frame itself.
    let mut raw = RawClient::connect(node.addr).await;
    let addr = node.addr;
    let started = Instant::now();
    let stop = tokio::spawn(node.stop());
    for c in &mut clients {
        let frame = c.expect_close_within(Duration::from_secs(2)).await;
        assert_eq!(close_code(&frame), Some(1001), "close frame {frame:?}");
    }
    assert_eq!(raw.expect_close().await, Closed::Frame(Some(1001)));
    stop.await.unwrap().expect("run returns Ok");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "stopping took {took:?}");
    // The listener is gone.
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the port still accepts connections after run returned"
    );
}

#[tokio::test]
async fn a_client_whose_socket_never_drains_does_not_hold_up_the_shutdown() {
    let shutdown_timeout = Duration::from_secs(3);
    let node = start_node(pubgate::Config {
        drain_delay: Duration::ZERO,
        shutdown_timeout,
        // Longer than the shutdown timeout: only the shutdown timeout may bound the stop.
        pong_timeout: Duration::from_secs(20),
        ping_interval: Duration::from_secs(20),
        max_message_size: 256 * 1024,
        ..test_config()
    })
    .await;
    let mut stuck = RawClient::connect_small_buffer(node.addr, 4096).await;
    stuck
        .send_json(&json!({"type":"subscribe","channel":"big","id":1}))
        .await;
    assert_eq!(
        stuck.recv_json().await,
        json!({"type":"subscribed","channel":"big","id":1})
    );
    // Fill its socket buffers (a few MB) but not its send queue (1024 messages).
    let mut publisher = node.client().await;
    let pad = "y".repeat(60_000);
    for i in 0..150 {
        publisher.publish("big", json!({"i":i,"pad":pad})).await;
    }
    drop(publisher);
    let started = Instant::now();
    tokio::time::timeout(shutdown_timeout + Duration::from_secs(3), node.stop())
        .await
        .expect("the node stops although one socket never drains")
        .expect("run returns Ok");
    let took = started.elapsed();
    assert!(
        took <= shutdown_timeout + Duration::from_millis(500),
        "stopping took {took:?} with shutdown timeout {shutdown_timeout:?}"
    );
    drop(stuck);
}
