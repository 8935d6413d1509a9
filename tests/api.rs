//! The HTTP server API (contract v1.2): `/api/publish`, `/api/disconnect`, `/api/presence`
//! behind `PUBGATE_API_KEY`, on the embedded broker and on two nodes sharing one real Redis.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pubgate::Config;
use serde_json::{json, Value};

use common::redis::RedisServer;
use common::{close_code, http_get, http_request, rand_u32, start_node, test_config, TestNode};

const KEY: &str = "test-api-key-0123456789";

fn api_config() -> Config {
    Config {
        api_key: Some(KEY.to_owned()),
        ..test_config()
    }
}

async fn wait_ready(addr: SocketAddr) {
    let start = Instant::now();
    while http_get(addr, "/readyz").await.0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{addr} not ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One API call; `key` None sends no Authorization header.
async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let auth = key
        .map(|k| format!("Authorization: apikey {k}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let (status, text) = http_request(addr, &request).await;
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    call(addr, "POST", path, Some(KEY), body).await
}

#[tokio::test]
async fn without_a_key_the_api_does_not_exist() {
    let node = start_node(test_config()).await;
    for path in ["/api/publish", "/api/presence?channel=a", "/api/nothing"] {
        let (status, _) = call(node.addr, "POST", path, Some(KEY), "{}").await;
        assert_eq!(status, 404, "{path}");
    }
}

#[tokio::test]
async fn a_wrong_or_missing_key_is_401() {
    let node = start_node(api_config()).await;
    for key in [
        None,
        Some("wrong"),
        Some("test-api-key-012345678"),
        Some(""),
    ] {
        let (status, body) = call(
            node.addr,
            "POST",
            "/api/publish",
            key,
            r#"{"channel":"a","data":1}"#,
        )
        .await;
        assert_eq!(status, 401, "{key:?}");
        assert_eq!(body["error"], "unauthorized");
    }
    // The scheme is case-insensitive, the key is not.
    let request = format!(
        "GET /api/presence?channel=a HTTP/1.1\r\nHost: x\r\nAuthorization: APIKEY {KEY}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(http_request(node.addr, &request).await.0, 200);
    assert_eq!(
        node.metric("pubgate_api_requests_total{route=\"publish\",status=\"401\"}")
            .await,
        Some(4.0)
    );
}

async fn publish_presence_disconnect(a: &TestNode, b: &TestNode, history: bool) {
    let channel = format!("api{}", rand_u32());
    let mut sub = b.client().await;
    let reply = sub
        .request(json!({"type":"subscribe","channel":channel}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    let (status, body) = post(
        a.addr,
        "/api/publish",
        &json!({"channel":channel,"data":{"x":1}}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = sub.recv().await;
    assert_eq!(got["data"], json!({"x":1}));
    if history {
        assert_eq!(body, json!({"offset":1}));
        assert_eq!(got["offset"], 1);
    } else {
        assert_eq!(body, json!({}));
        assert!(got.get("offset").is_none());
    }

    // `null` is a JSON value like any other: published, delivered as `null`.
    let (status, body) = post(
        a.addr,
        "/api/publish",
        &json!({"channel":channel,"data":null}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let got = sub.recv().await;
    assert_eq!(got["type"], "message");
    assert_eq!(got["data"], Value::Null);
    assert!(got.as_object().unwrap().contains_key("data"));

    let (status, body) = call(
        a.addr,
        "GET",
        &format!("/api/presence?channel={channel}"),
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body["count"], 1);
    assert_eq!(body["members"][0]["conn_id"], sub.conn_id());
    assert!(body.get("truncated").is_none(), "{body}");
    let (status, body) = call(
        a.addr,
        "GET",
        &format!("/api/presence?channel={channel}&count_only=true"),
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"channel":channel,"count":1}));
    let (status, _) = call(
        a.addr,
        "GET",
        &format!("/api/presence?channel={channel}&count_only=maybe"),
        Some(KEY),
        "",
    )
    .await;
    assert_eq!(status, 400);

    // 400s: bad bodies and channels, reserved names included.
    for bad in [
        "not json",
        "[1]",
        r#"{"data":1}"#,
        r#"{"channel":5,"data":1}"#,
        r#"{"channel":"a"}"#,
    ] {
        let (status, body) = post(a.addr, "/api/publish", bad).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("bad_request")),
            "{bad}"
        );
    }
    for bad in ["", "a b", "__control"] {
        let (status, body) = post(
            a.addr,
            "/api/publish",
            &json!({"channel":bad,"data":1}).to_string(),
        )
        .await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_channel")),
            "{bad}"
        );
    }
    let (status, _) = call(a.addr, "GET", "/api/presence", Some(KEY), "").await;
    assert_eq!(status, 400);
    let (status, _) = call(a.addr, "GET", "/api/publish", Some(KEY), "").await;
    assert_eq!(status, 405);
    let (status, _) = post(a.addr, "/api/disconnect", r#"{"user":5}"#).await;
    assert_eq!(status, 400);
    let big = format!(r#"{{"channel":"a","data":"{}"}}"#, "x".repeat(70_000));
    let (status, _) = post(a.addr, "/api/publish", &big).await;
    assert_eq!(status, 413);
}

#[tokio::test]
async fn embedded_broker_api() {
    let node = start_node(api_config()).await;
    publish_presence_disconnect(&node, &node, false).await;
    let node = start_node(Config {
        history_size: 10,
        ..api_config()
    })
    .await;
    publish_presence_disconnect(&node, &node, true).await;
}

#[tokio::test]
async fn two_nodes_on_redis_publish_disconnect_and_503() {
    let mut redis = RedisServer::start().await;
    let prefix = format!("a{:08x}:", rand_u32());
    let secret = "api-test-secret";
    let config = || Config {
        redis_url: Some(redis.url()),
        channel_prefix: prefix.clone(),
        history_size: 10,
        jwt_secret: Some(secret.to_owned()),
        ..api_config()
    };
    let a = start_node(config()).await;
    let b = start_node(config()).await;
    wait_ready(a.addr).await;
    wait_ready(b.addr).await;
    // Publish and presence, with the user's own channel (tokens are on for the disconnect).
    let token = common::tokens::hs256_with(secret, &json!({"sub":"alice","exp": 4_000_000_000u64}));
    let mut alice = common::Client::connect_bearer(&b.ws_url(), &token).await;
    let reply = alice
        .request(json!({"type":"subscribe","channel":"user:alice"}))
        .await;
    assert_eq!(reply["type"], "subscribed");
    let (status, body) = post(
        a.addr,
        "/api/publish",
        r#"{"channel":"user:alice","data":"hi"}"#,
    )
    .await;
    assert_eq!((status, body), (200, json!({"offset":1})));
    assert_eq!(alice.recv().await["offset"], 1);
    // Disconnect through node A closes alice on node B.
    let (status, _) = post(a.addr, "/api/disconnect", r#"{"user":"alice"}"#).await;
    assert_eq!(status, 200);
    let frame = alice.expect_close().await;
    assert_eq!(close_code(&frame), Some(1008));
    // Redis down: 503 unavailable, never a hang.
    redis.kill();
    let start = Instant::now();
    loop {
        let (status, body) = post(a.addr, "/api/publish", r#"{"channel":"n","data":1}"#).await;
        if status == 503 {
            assert_eq!(body["error"], "unavailable");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = call(a.addr, "GET", "/api/presence?channel=n", Some(KEY), "").await;
    assert!(status == 503 || status == 504, "{status}");
    let (status, _) = post(a.addr, "/api/disconnect", r#"{"user":"x"}"#).await;
    assert_eq!(status, 503);
}
