//! Authentication (contract v1.1) over real sockets: tokens on the upgrade (HS256, RS256,
//! ES256), the refusal order, permissions on subscribe/publish/presence, reserved names,
//! refresh and expiry. Tokens are minted in the tests (tests/common/tokens.rs).

mod common;

use std::time::Duration;

use pubgate::{Config, Server};
use serde_json::{json, Value};
use tokio::time::Instant;

use common::raw::{http_exchange, Response, KEY};
use common::tokens::{self, alg_none, es256_with, fixture, hs256, hs256_with, now, rs256_with};
use common::{close_code, start_node, test_config, Client, TestNode, WAIT};

fn secret_config() -> Config {
    Config {
        jwt_secret: Some(tokens::SECRET.into()),
        ..test_config()
    }
}

fn key_config(public: &str) -> Config {
    Config {
        jwt_public_key_file: Some(fixture(public)),
        ..test_config()
    }
}

/// A raw upgrade to `path` with extra header lines (each ending in \r\n).
async fn upgrade(node: &TestNode, path: &str, extra: &str) -> Response {
    let addr = node.addr;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    );
    http_exchange(addr, request.as_bytes(), WAIT).await
}

async fn upgrade_token(node: &TestNode, token: &str) -> Response {
    upgrade(node, &format!("/ws?token={token}"), "").await
}

fn claims(sub: &str, exp_in: i64) -> Value {
    json!({"sub": sub, "exp": (now() as i64 + exp_in), "subscribe": ["*"], "publish": ["*"]})
}

fn assert_refused(resp: &Response, status: u16, body: &str, what: &str) {
    assert_eq!(
        (resp.status, resp.body.as_str()),
        (status, body),
        "{what}: {resp:?}"
    );
}

#[tokio::test]
async fn hs256_tokens_are_checked_before_the_upgrade() {
    let node = start_node(secret_config()).await;
    let valid = hs256(&claims("alice", 60));
    let t = now() as i64;
    let cases: Vec<(&str, String, &str)> = vec![
        ("no token", String::new(), "missing token\n"),
        ("garbage", "abc".into(), "malformed token\n"),
        ("three garbage parts", "a.b.c".into(), "malformed token\n"),
        (
            "wrong secret",
            hs256_with("another-secret", &claims("alice", 60)),
            "invalid token signature\n",
        ),
        (
            "alg none",
            alg_none(&claims("alice", 60)),
            "token algorithm not accepted\n",
        ),
        (
            "RS256 token on an HS256 node",
            rs256_with("rsa_private.pem", &claims("alice", 60)),
            "token algorithm not accepted\n",
        ),
        (
            "expired beyond the leeway",
            hs256(&claims("alice", -30)),
            "token expired\n",
        ),
        (
            "no sub",
            hs256(&json!({"exp": t + 60})),
            "token has no `sub` claim\n",
        ),
        (
            "no exp",
            hs256(&json!({"sub": "alice"})),
            "token has no `exp` claim\n",
        ),
        (
            "patterns not strings",
            hs256(&json!({"sub": "alice", "exp": t + 60, "subscribe": [1]})),
            "token claim `subscribe` is invalid\n",
        ),
        (
            // jsonwebtoken reads an `exp` that is not a number as absent.
            "exp not a number",
            hs256(&json!({"sub": "alice", "exp": "soon"})),
            "token has no `exp` claim\n",
        ),
        (
            "nbf in the future",
            hs256(&json!({"sub": "alice", "exp": t + 120, "nbf": t + 60})),
            "token not yet valid\n",
        ),
        (
            // jsonwebtoken reads a `sub` that is not a string as absent.
            "sub not a string",
            hs256(&json!({"sub": 42, "exp": t + 60})),
            "token has no `sub` claim\n",
        ),
    ];
    for (what, token, body) in &cases {
        let resp = if token.is_empty() {
            upgrade(&node, "/ws", "").await
        } else {
            upgrade_token(&node, token).await
        };
        assert_refused(&resp, 401, body, what);
        assert_eq!(
            common::raw::header(&resp.head, "www-authenticate").as_deref(),
            Some("Bearer error=\"invalid_token\""),
            "{what}"
        );
        assert!(
            common::raw::header(&resp.head, "upgrade").is_none(),
            "{what}: no upgrade"
        );
    }
    // Accepted: query, header, a token expired within the 5 s leeway, nbf just passed.
    assert_eq!(
        upgrade_token(&node, &valid).await.status,
        101,
        "query token"
    );
    let bearer = format!("Authorization: Bearer {valid}\r\n");
    assert_eq!(upgrade(&node, "/ws", &bearer).await.status, 101, "bearer");
    let skewed = hs256(&claims("alice", -2));
    assert_eq!(upgrade_token(&node, &skewed).await.status, 101, "leeway");
    let nbf = hs256(&json!({"sub": "alice", "exp": t + 60, "nbf": t + 2}));
    assert_eq!(
        upgrade_token(&node, &nbf).await.status,
        101,
        "nbf within leeway"
    );
    // The header wins over the query, both ways.
    let resp = upgrade(&node, "/ws?token=garbage", &bearer).await;
    assert_eq!(resp.status, 101, "valid header, bad query: {resp:?}");
    let resp = upgrade(
        &node,
        &format!("/ws?token={valid}"),
        "Authorization: Bearer garbage\r\n",
    )
    .await;
    assert_refused(&resp, 401, "malformed token\n", "bad header, valid query");

    let refused = cases.len() as f64 + 1.0;
    assert_eq!(
        node.metric("pubgate_upgrades_rejected_total{reason=\"unauthorized\"}")
            .await,
        Some(refused)
    );
}

#[tokio::test]
async fn rs256_and_es256_public_keys_pin_their_algorithm() {
    type Sign = fn(&str, &Value) -> String;
    let setups: [(&str, &str, &str, Sign, Sign); 2] = [
        (
            "rsa_public.pem",
            "rsa_private.pem",
            "rsa_other_private.pem",
            rs256_with,
            es256_with,
        ),
        (
            "ec_public.pem",
            "ec_private.pem",
            "ec_other_private.pem",
            es256_with,
            rs256_with,
        ),
    ];
    for (public, private, other, sign, _) in setups {
        let node = start_node(key_config(public)).await;
        // A valid token: a full session, with the user in presence.
        let token = sign(private, &claims("carol", 60));
        let mut client = Client::connect(&format!("{}?token={token}", node.ws_url())).await;
        client.subscribe("room").await;
        let reply = client
            .request(json!({"type":"presence","channel":"room","id":1}))
            .await;
        assert_eq!(reply["members"][0]["user"], "carol", "{public}: {reply}");

        let wrong_key = sign(other, &claims("carol", 60));
        assert_refused(
            &upgrade_token(&node, &wrong_key).await,
            401,
            "invalid token signature\n",
            &format!("{public}: wrong key"),
        );
        // The classic confusion: an HS256 token keyed with the public key's PEM text.
        let pem = std::fs::read_to_string(fixture(public)).unwrap();
        let confused = hs256_with(&pem, &claims("carol", 60));
        assert_refused(
            &upgrade_token(&node, &confused).await,
            401,
            "token algorithm not accepted\n",
            &format!("{public}: HS256 with the public key as secret"),
        );
        let other_alg = if public.starts_with("rsa") {
            es256_with("ec_private.pem", &claims("carol", 60))
        } else {
            rs256_with("rsa_private.pem", &claims("carol", 60))
        };
        assert_refused(
            &upgrade_token(&node, &other_alg).await,
            401,
            "token algorithm not accepted\n",
            &format!("{public}: the other asymmetric algorithm"),
        );
        assert_refused(
            &upgrade_token(&node, &alg_none(&claims("carol", 60))).await,
            401,
            "token algorithm not accepted\n",
            &format!("{public}: alg none"),
        );
        assert_refused(
            &upgrade_token(&node, &sign(private, &claims("carol", -30))).await,
            401,
            "token expired\n",
            &format!("{public}: expired"),
        );
        assert_refused(
            &upgrade_token(&node, &sign(private, &json!({"exp": now() + 60}))).await,
            401,
            "token has no `sub` claim\n",
            &format!("{public}: no sub"),
        );
        assert_refused(
            &upgrade_token(&node, &sign(private, &json!({"sub": "carol"}))).await,
            401,
            "token has no `exp` claim\n",
            &format!("{public}: no exp"),
        );
        let future = json!({"sub": "carol", "exp": now() + 120, "nbf": now() + 60});
        assert_refused(
            &upgrade_token(&node, &sign(private, &future)).await,
            401,
            "token not yet valid\n",
            &format!("{public}: nbf in the future"),
        );
        // The header form works with these keys too.
        let bearer = format!("Authorization: Bearer {token}\r\n");
        assert_eq!(upgrade(&node, "/ws", &bearer).await.status, 101, "{public}");
    }
}

#[tokio::test]
async fn key_configuration_errors_stop_the_node_at_start() {
    let bind_error = |config: Config| async move {
        match Server::bind(config).await {
            Ok(_) => panic!("the node started"),
            Err(e) => e.to_string(),
        }
    };
    let both = bind_error(Config {
        jwt_public_key_file: Some(fixture("rsa_public.pem")),
        ..secret_config()
    })
    .await;
    assert!(both.contains("not both"), "{both}");
    for (file, needle) in [
        ("missing.pem", "cannot read"),
        ("ec_p384_public.pem", "P-256"),
        ("rsa_private.pem", "private key"),
    ] {
        let e = bind_error(key_config(file)).await;
        assert!(
            e.contains("PUBGATE_JWT_PUBLIC_KEY_FILE") && e.contains(needle),
            "{file}: {e}"
        );
    }
}

#[tokio::test]
async fn refusals_come_in_the_contract_order() {
    let mut node = start_node(Config {
        allowed_origins: Some("https://app.example".into()),
        max_connections: 1,
        // Upgrades are answered "draining" while the node keeps accepting, which is the drain
        // delay: without one the listener stops at once and the last check races the shutdown.
        drain_delay: Duration::from_secs(2),
        ..secret_config()
    })
    .await;
    let valid = hs256(&claims("alice", 60));
    let bad_origin = "Origin: https://evil.example\r\n";
    // Without upgrade headers: 426 whatever else is wrong.
    let addr = node.addr;
    let plain = format!("GET /ws?token=x HTTP/1.1\r\nHost: {addr}\r\n{bad_origin}\r\n");
    assert_eq!(
        http_exchange(addr, plain.as_bytes(), WAIT).await.status,
        426
    );
    // A bad origin is refused before the token is looked at.
    assert_refused(
        &upgrade(&node, "/ws", bad_origin).await,
        403,
        "origin not allowed\n",
        "bad origin, no token",
    );
    // A bad token before the connection cap; the cap last.
    let _holder = Client::connect(&format!("{}?token={valid}", node.ws_url())).await;
    assert_refused(
        &upgrade(&node, "/ws", "Origin: https://app.example\r\n").await,
        401,
        "missing token\n",
        "full node, no token",
    );
    assert_refused(
        &upgrade_token(&node, &valid).await,
        503,
        "connection limit reached\n",
        "full node, valid token",
    );
    // Draining comes before the origin.
    let before = node
        .metric("pubgate_upgrades_rejected_total{reason=\"draining\"}")
        .await;
    assert_eq!(before, Some(0.0));
    node.signal_stop();
    let deadline = Instant::now() + WAIT;
    loop {
        let resp = upgrade(&node, "/ws", bad_origin).await;
        if resp.status == 503 {
            assert_eq!(resp.body, "draining\n");
            break;
        }
        assert!(Instant::now() < deadline, "never draining: {resp:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A client of `node` holding a token with these patterns.
async fn user(node: &TestNode, sub: &str, subscribe: Value, publish: Value) -> Client {
    let token = hs256(&json!({
        "sub": sub, "exp": now() + 60, "subscribe": subscribe, "publish": publish
    }));
    Client::connect_bearer(&node.ws_url(), &token).await
}

fn forbidden(id: i64) -> impl Fn(&Value) {
    move |reply: &Value| {
        assert_eq!(reply["type"], "error", "{reply}");
        assert_eq!(reply["code"], "forbidden", "{reply}");
        assert_eq!(reply["id"], id, "{reply}");
    }
}

#[tokio::test]
async fn permissions_are_enforced_on_subscribe_publish_and_presence() {
    let node = start_node(secret_config()).await;
    let mut alice = user(&node, "alice", json!(["news", "chat:*"]), json!(["chat:*"])).await;
    let sub = |ch: &str, id: i64| json!({"type":"subscribe","channel":ch,"id":id});
    for ch in ["news", "chat:", "chat:1", "user:alice"] {
        assert_eq!(
            alice.request(sub(ch, 1)).await,
            json!({"type":"subscribed","channel":ch,"id":1})
        );
    }
    let mut denied = 0.0;
    for ch in ["chat", "sports", "user:bob", "user:alice2", "newsroom"] {
        forbidden(2)(&alice.request(sub(ch, 2)).await);
        denied += 1.0;
    }
    let publish = |ch: &str, id: i64| json!({"type":"publish","channel":ch,"data":{"x":1},"id":id});
    // The delivery of that publish (alice is subscribed to chat:1) and its reply, in any order.
    alice.send(publish("chat:1", 3)).await;
    let mut got = vec![
        alice.recv().await["type"].clone(),
        alice.recv().await["type"].clone(),
    ];
    got.sort_by_key(|v| v.to_string());
    assert_eq!(got, vec![json!("message"), json!("published")]);
    for ch in ["news", "user:alice", "chat"] {
        forbidden(4)(&alice.request(publish(ch, 4)).await);
        denied += 1.0;
    }
    let presence = |ch: &str, id: i64| json!({"type":"presence","channel":ch,"id":id});
    let reply = alice.request(presence("news", 5)).await;
    assert_eq!(reply["count"], 1, "{reply}");
    assert_eq!(reply["members"][0]["user"], "alice", "{reply}");
    assert_eq!(alice.request(presence("user:alice", 5)).await["count"], 1);
    for ch in ["sports", "user:bob"] {
        forbidden(6)(&alice.request(presence(ch, 6)).await);
        denied += 1.0;
    }
    // A user with no patterns at all still has its own channel, and nothing else.
    let mut bob = user(&node, "bob", Value::Null, Value::Null).await;
    forbidden(7)(&bob.request(sub("news", 7)).await);
    forbidden(7)(&bob.request(publish("user:bob", 7)).await);
    denied += 2.0;
    bob.subscribe("user:bob").await;
    // Still open after every refusal.
    assert_eq!(
        alice.request(json!({"type":"ping","id":9})).await,
        json!({"type":"pong","id":9})
    );
    assert_eq!(
        node.metric("pubgate_requests_rejected_total{reason=\"forbidden\"}")
            .await,
        Some(denied)
    );
}

#[tokio::test]
async fn reserved_names_are_invalid_channels_even_with_every_permission() {
    let node = start_node(secret_config()).await;
    let mut root = user(&node, "root", json!(["*"]), json!(["*"])).await;
    let requests = [
        json!({"type":"subscribe","channel":"__control","id":1}),
        json!({"type":"unsubscribe","channel":"__control","id":1}),
        json!({"type":"publish","channel":"__control","data":{"type":"disconnect","user":"root"},"id":1}),
        json!({"type":"presence","channel":"__probe:x","id":1}),
        json!({"type":"subscribe","channel":"__","id":1}),
    ];
    for request in &requests {
        let reply = root.request(request.clone()).await;
        assert_eq!(reply["code"], "invalid_channel", "{request}: {reply}");
        assert_eq!(reply["id"], 1);
    }
    // A forbidden user gets invalid_channel too: the name is checked first.
    let mut nobody = user(&node, "nobody", json!([]), json!([])).await;
    let reply = nobody.request(requests[0].clone()).await;
    assert_eq!(reply["code"], "invalid_channel", "{reply}");
    assert_eq!(
        node.metric("pubgate_requests_rejected_total{reason=\"invalid_channel\"}")
            .await,
        Some(requests.len() as f64 + 1.0)
    );
    assert_eq!(
        node.metric("pubgate_requests_rejected_total{reason=\"forbidden\"}")
            .await,
        Some(0.0)
    );
    // The publish above did not disconnect anyone.
    root.subscribe("still-here").await;
}

#[tokio::test]
async fn anonymous_mode_is_open_and_refresh_is_forbidden() {
    let node = start_node(test_config()).await;
    let mut anon = node.client().await;
    anon.subscribe("anything:at/all").await;
    anon.publish("user:alice", json!(1)).await;
    let reply = anon
        .request(json!({"type":"presence","channel":"anything:at/all","id":1}))
        .await;
    assert_eq!(reply["members"][0]["user"], Value::Null, "{reply}");
    let token = hs256(&claims("alice", 60));
    forbidden(2)(
        &anon
            .request(json!({"type":"refresh","token":token,"id":2}))
            .await,
    );
    let reply = anon
        .request(json!({"type":"subscribe","channel":"__control","id":3}))
        .await;
    assert_eq!(reply["code"], "invalid_channel", "{reply}");
}

#[tokio::test]
async fn refresh_replaces_permissions_and_ends_what_they_no_longer_cover() {
    let node = start_node(secret_config()).await;
    let mut alice = user(&node, "alice", json!(["news", "chat:*"]), json!([])).await;
    for ch in ["news", "chat:1", "chat:2", "user:alice"] {
        alice.subscribe(ch).await;
    }
    let exp = now() + 120;
    let narrower = hs256(&json!({"sub":"alice","exp":exp,"subscribe":["chat:1"]}));
    alice
        .send(json!({"type":"refresh","token":narrower,"id":6}))
        .await;
    assert_eq!(
        alice.recv().await,
        json!({"type":"unsubscribed","channel":"chat:2","reason":"forbidden"})
    );
    assert_eq!(
        alice.recv().await,
        json!({"type":"unsubscribed","channel":"news","reason":"forbidden"})
    );
    assert_eq!(
        alice.recv().await,
        json!({"type":"refreshed","id":6,"exp":exp})
    );
    // What is left still delivers; what was removed does not.
    let mut backend = user(&node, "backend", json!([]), json!(["*"])).await;
    backend.publish("news", json!("gone")).await;
    backend.publish("user:alice", json!("private")).await;
    backend.publish("chat:1", json!("kept")).await;
    assert_eq!(alice.recv().await["data"], "private");
    assert_eq!(alice.recv().await["data"], "kept");
    forbidden(7)(
        &alice
            .request(json!({"type":"subscribe","channel":"news","id":7}))
            .await,
    );
    let reply = alice
        .request(json!({"type":"presence","channel":"news","id":8}))
        .await;
    forbidden(8)(&reply);

    // Refusals change nothing.
    let bobs = hs256(&json!({"sub":"bob","exp":now()+60,"subscribe":["*"]}));
    let expired = hs256(&json!({"sub":"alice","exp":now()-60,"subscribe":["*"]}));
    let wrong_key = hs256_with(
        "nope",
        &json!({"sub":"alice","exp":now()+60,"subscribe":["*"]}),
    );
    for token in [bobs, expired, wrong_key, "garbage".to_owned()] {
        forbidden(9)(
            &alice
                .request(json!({"type":"refresh","token":token,"id":9}))
                .await,
        );
    }
    forbidden(10)(
        &alice
            .request(json!({"type":"subscribe","channel":"news","id":10}))
            .await,
    );
    alice.subscribe("chat:1").await;
    // Presence of the remaining subscription still shows alice; the removed one is empty.
    let mut observer = user(&node, "obs", json!(["*"]), json!([])).await;
    let reply = observer
        .request(json!({"type":"presence","channel":"news","id":1}))
        .await;
    assert_eq!(reply["count"], 0, "{reply}");
}

#[tokio::test]
async fn an_unrefreshed_token_closes_the_connection_at_exp() {
    let node = start_node(secret_config()).await;
    let exp = now() + 2;
    let mut alice = Client::connect_bearer(&node.ws_url(), &hs256(&claims("alice", 2))).await;
    alice.subscribe("news").await;
    let frame = alice.expect_close_within(Duration::from_secs(4)).await;
    assert!(now() >= exp, "closed before exp");
    assert_eq!(close_code(&frame), Some(1008), "{frame:?}");
    assert_eq!(frame.unwrap().reason.as_str(), "token expired");
    // Counted, and its subscription is gone.
    let deadline = Instant::now() + WAIT;
    while node.metric("pubgate_subscriptions").await != Some(0.0) {
        assert!(Instant::now() < deadline, "subscription not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        node.metric("pubgate_disconnects_total{reason=\"token_expired\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn an_exp_at_the_end_of_time_does_not_crash_the_node() {
    let node = start_node(secret_config()).await;
    let token = hs256(&json!({"sub":"alice","exp":u64::MAX,"subscribe":["*"]}));
    let mut alice = Client::connect_bearer(&node.ws_url(), &token).await;
    alice.subscribe("news").await;
    let reply = alice
        .request(json!({"type":"refresh","token":token,"id":1}))
        .await;
    assert_eq!(reply, json!({"type":"refreshed","id":1,"exp":u64::MAX}));
    assert_eq!(
        alice.request(json!({"type":"ping","id":2})).await,
        json!({"type":"pong","id":2})
    );
    assert_eq!(node.http_get("/healthz").await.0, 200);
}

#[tokio::test]
async fn refresh_moves_the_expiry_later_or_earlier() {
    let node = start_node(secret_config()).await;
    // Later: a token due in 2 s refreshed to 5 s is still open at 3 s.
    let mut later = Client::connect_bearer(&node.ws_url(), &hs256(&claims("alice", 2))).await;
    let mut earlier = Client::connect_bearer(&node.ws_url(), &hs256(&claims("bob", 600))).await;
    let started = Instant::now();
    let reply = later
        .request(json!({"type":"refresh","token":hs256(&claims("alice", 5)),"id":1}))
        .await;
    assert_eq!(reply["type"], "refreshed", "{reply}");
    // Earlier: a token good for 10 minutes refreshed to one due in 1 s.
    let reply = earlier
        .request(json!({"type":"refresh","token":hs256(&claims("bob", 1)),"id":1}))
        .await;
    assert_eq!(reply["type"], "refreshed", "{reply}");
    let frame = earlier.expect_close_within(Duration::from_secs(3)).await;
    assert_eq!(frame.unwrap().reason.as_str(), "token expired");
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(started.elapsed())).await;
    assert_eq!(
        later.request(json!({"type":"ping","id":2})).await,
        json!({"type":"pong","id":2}),
        "still open after the first exp"
    );
    let frame = later.expect_close_within(Duration::from_secs(4)).await;
    assert_eq!(close_code(&frame), Some(1008));
    assert_eq!(frame.unwrap().reason.as_str(), "token expired");
}
