//! The WebSocket message protocol of a single node on the in-memory broker, through a real
//! WebSocket client (tokio-tungstenite): welcome, subscribe, unsubscribe, publish, deliveries,
//! presence, ping, every error code that applies without authentication, and the ordering
//! guarantees.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{start_node, test_config, Client};
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

/// How long a test listens to prove that nothing (more) arrives.
const QUIET: Duration = Duration::from_millis(300);

/// Asserts the exact shape of an error: `type`, `code`, a string `message`, and `id` exactly as
/// given (the key absent when `id` is None).
#[track_caller]
fn assert_error(reply: &Value, code: &str, id: Option<Value>) {
    let obj = reply
        .as_object()
        .unwrap_or_else(|| panic!("an error is an object: {reply}"));
    assert_eq!(reply["type"], "error", "not an error: {reply}");
    assert_eq!(reply["code"], code, "error code in {reply}");
    assert!(
        reply["message"].as_str().is_some_and(|m| !m.is_empty()),
        "message is a non-empty string in {reply}"
    );
    match id {
        Some(id) => assert_eq!(obj.get("id"), Some(&id), "id echoed in {reply}"),
        None => assert!(
            !obj.contains_key("id"),
            "no id key (not even null) in {reply}"
        ),
    }
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut expected = vec!["code", "message", "type"];
    if obj.contains_key("id") {
        expected.push("id");
        expected.sort_unstable();
    }
    assert_eq!(keys, expected, "exact keys of {reply}");
}

/// Proves the connection still works: a ping request gets its pong.
async fn assert_works(client: &mut Client) {
    let reply = client
        .request(json!({"type":"ping","id":"still-alive"}))
        .await;
    assert_eq!(reply, json!({"type":"pong","id":"still-alive"}));
}

/// Asserts that no message arrives for a while.
async fn assert_quiet(client: &mut Client) {
    if let Some(m) = client.recv_within(QUIET).await {
        panic!("unexpected message: {m}");
    }
}

/// Reads `n` messages and returns them sorted by their JSON text (for replies and deliveries
/// whose relative order the contract does not fix).
async fn recv_n_sorted(client: &mut Client, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(client.recv().await);
    }
    out.sort_by_key(|v| v.to_string());
    out
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(|v| v.to_string());
    v
}

#[tokio::test]
async fn welcome_comes_first_and_describes_the_node() {
    let config = pubgate::Config {
        ping_interval: Duration::from_millis(7_250),
        ..test_config()
    };
    let node = start_node(config).await;
    let a = node.client().await;
    let b = node.client().await;
    for welcome in [&a.welcome, &b.welcome] {
        let obj = welcome.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            ["conn_id", "node", "ping_interval_ms", "type"],
            "{welcome}"
        );
        assert_eq!(welcome["type"], "welcome");
        assert_eq!(welcome["node"], node.node_id.as_str());
        assert_eq!(welcome["ping_interval_ms"], 7250);
        assert!(
            welcome["conn_id"].as_str().is_some_and(|c| !c.is_empty()),
            "{welcome}"
        );
    }
    assert_ne!(a.conn_id(), b.conn_id(), "each connection has its own id");
}

#[tokio::test]
async fn replies_echo_ids_of_every_kind_exactly() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let ids = [
        json!(1),
        json!(0),
        json!(-7),
        json!(2.5),
        json!(9_007_199_254_740_993_u64),
        json!(u64::MAX),
        json!("abc"),
        json!(""),
        json!("ü-id \"quoted\""),
    ];
    for id in ids {
        let reply = c
            .request(json!({"type":"subscribe","channel":"news","id":id}))
            .await;
        assert_eq!(reply, json!({"type":"subscribed","channel":"news","id":id}));
        let reply = c
            .request(json!({"type":"publish","channel":"other","data":1,"id":id}))
            .await;
        assert_eq!(reply, json!({"type":"published","channel":"other","id":id}));
        let reply = c.request(json!({"type":"ping","id":id})).await;
        assert_eq!(reply, json!({"type":"pong","id":id}));
        let reply = c
            .request(json!({"type":"unsubscribe","channel":"news","id":id}))
            .await;
        assert_eq!(
            reply,
            json!({"type":"unsubscribed","channel":"news","id":id})
        );
    }
    // The id's JSON text is echoed, not re-rounded through a float.
    c.send_text(r#"{"type":"ping","id":12345678901234567890}"#)
        .await;
    let raw = next_text(&mut c).await;
    assert!(raw.contains("12345678901234567890"), "{raw}");
}

/// The next text frame as it came (no JSON round trip).
async fn next_text(c: &mut Client) -> String {
    use futures_util::StreamExt;
    loop {
        match tokio::time::timeout(common::WAIT, c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn replies_have_no_id_key_when_the_request_had_none() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    assert_eq!(
        c.request(json!({"type":"subscribe","channel":"news"}))
            .await,
        json!({"type":"subscribed","channel":"news"})
    );
    assert_eq!(
        c.request(json!({"type":"publish","channel":"elsewhere","data":"x"}))
            .await,
        json!({"type":"published","channel":"elsewhere"})
    );
    assert_eq!(
        c.request(json!({"type":"presence","channel":"elsewhere"}))
            .await,
        json!({"type":"presence","channel":"elsewhere","count":0,"members":[]})
    );
    assert_eq!(
        c.request(json!({"type":"ping"})).await,
        json!({"type":"pong"})
    );
    assert_eq!(
        c.request(json!({"type":"unsubscribe","channel":"news"}))
            .await,
        json!({"type":"unsubscribed","channel":"news"})
    );
}

#[tokio::test]
async fn subscribing_twice_is_idempotent_and_delivers_once() {
    let node = start_node(test_config()).await;
    let mut sub = node.client().await;
    let mut publisher = node.client().await;
    assert_eq!(
        sub.request(json!({"type":"subscribe","channel":"news","id":1}))
            .await,
        json!({"type":"subscribed","channel":"news","id":1})
    );
    assert_eq!(
        sub.request(json!({"type":"subscribe","channel":"news","id":2}))
            .await,
        json!({"type":"subscribed","channel":"news","id":2})
    );
    publisher.publish("news", json!({"n":1})).await;
    assert_eq!(
        sub.recv().await,
        json!({"type":"message","channel":"news","data":{"n":1}})
    );
    assert_quiet(&mut sub).await;
    // One unsubscribe ends it (a subscription is not counted twice).
    assert_eq!(
        sub.request(json!({"type":"unsubscribe","channel":"news","id":3}))
            .await,
        json!({"type":"unsubscribed","channel":"news","id":3})
    );
    publisher.publish("news", json!({"n":2})).await;
    assert_quiet(&mut sub).await;
}

#[tokio::test]
async fn unsubscribe_replies_and_not_subscribed_errors() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    // Never subscribed.
    let reply = c
        .request(json!({"type":"unsubscribe","channel":"news","id":1}))
        .await;
    assert_error(&reply, "not_subscribed", Some(json!(1)));
    let reply = c
        .request(json!({"type":"unsubscribe","channel":"news"}))
        .await;
    assert_error(&reply, "not_subscribed", None);
    // An explicit null id is no id: the error has no id key (never null).
    let reply = c
        .request(json!({"type":"unsubscribe","channel":"news","id":null}))
        .await;
    assert_error(&reply, "not_subscribed", None);
    assert_works(&mut c).await;

    c.subscribe("news").await;
    assert_eq!(
        c.request(json!({"type":"unsubscribe","channel":"news","id":"u"}))
            .await,
        json!({"type":"unsubscribed","channel":"news","id":"u"})
    );
    // Already unsubscribed.
    let reply = c
        .request(json!({"type":"unsubscribe","channel":"news","id":"again"}))
        .await;
    assert_error(&reply, "not_subscribed", Some(json!("again")));
    // Subscribed to another channel only.
    c.subscribe("sports").await;
    let reply = c
        .request(json!({"type":"unsubscribe","channel":"news","id":2}))
        .await;
    assert_error(&reply, "not_subscribed", Some(json!(2)));
    assert_works(&mut c).await;
}

#[tokio::test]
async fn publish_reaches_every_subscriber_including_the_subscribed_publisher() {
    let node = start_node(test_config()).await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    let mut publisher = node.client().await;
    let mut bystander = node.client().await;
    a.subscribe("news").await;
    b.subscribe("news").await;
    publisher.subscribe("news").await;
    bystander.subscribe("sports").await;

    publisher
        .send(json!({"type":"publish","channel":"news","data":{"headline":"hi"},"id":3}))
        .await;
    let delivery = json!({"type":"message","channel":"news","data":{"headline":"hi"}});
    // The publisher gets its reply and its own delivery, in an order the contract leaves open.
    assert_eq!(
        recv_n_sorted(&mut publisher, 2).await,
        sorted(vec![
            json!({"type":"published","channel":"news","id":3}),
            delivery.clone()
        ])
    );
    assert_eq!(a.recv().await, delivery);
    assert_eq!(b.recv().await, delivery);
    for c in [&mut a, &mut b, &mut publisher, &mut bystander] {
        assert_quiet(c).await;
    }
}

#[tokio::test]
async fn publisher_needs_no_subscription_and_gets_no_delivery() {
    let node = start_node(test_config()).await;
    let mut sub = node.client().await;
    let mut publisher = node.client().await;
    sub.subscribe("news").await;
    let reply = publisher
        .request(json!({"type":"publish","channel":"news","data":[1,2],"id":"p1"}))
        .await;
    assert_eq!(
        reply,
        json!({"type":"published","channel":"news","id":"p1"})
    );
    assert_eq!(
        sub.recv().await,
        json!({"type":"message","channel":"news","data":[1,2]})
    );
    assert_quiet(&mut publisher).await;
    // Publishing to a channel nobody listens to is accepted too.
    let reply = publisher
        .request(json!({"type":"publish","channel":"empty","data":true,"id":"p2"}))
        .await;
    assert_eq!(
        reply,
        json!({"type":"published","channel":"empty","id":"p2"})
    );
    assert_quiet(&mut sub).await;
}

#[tokio::test]
async fn data_of_every_json_kind_arrives_exactly() {
    let node = start_node(test_config()).await;
    let mut sub = node.client().await;
    let mut publisher = node.client().await;
    sub.subscribe("kinds").await;
    let values = [
        json!({"a":1,"b":"two"}),
        json!({}),
        json!([]),
        json!([1, "two", null, true, {"x":[3.5]}]),
        json!("a string"),
        json!(""),
        json!("line\nbreak \"quoted\" back\\slash tab\t nul\u{0000} é 😀"),
        json!(0),
        json!(42),
        json!(-17),
        json!(3.25),
        json!(1.5e300),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(null),
        json!(true),
        json!(false),
        json!({"deep":{"er":{"and":[{"deeper":[[[{"bottom":null}]]]}]}}}),
    ];
    for value in &values {
        publisher.publish("kinds", value.clone()).await;
        let msg = sub.recv().await;
        assert_eq!(
            msg,
            json!({"type":"message","channel":"kinds","data":value}),
            "data {value}"
        );
    }
    // The JSON text of a large integer survives exactly (not rounded through a float).
    publisher
        .send_text(r#"{"type":"publish","channel":"kinds","data":123456789012345678901234567890}"#)
        .await;
    // A number this large is valid JSON; the server may keep it exactly or refuse it, but it must
    // not deliver a rounded number.
    let reply = publisher.recv().await;
    if reply["type"] == "published" {
        let raw = next_text(&mut sub).await;
        assert!(
            raw.contains("123456789012345678901234567890"),
            "delivered exactly: {raw}"
        );
    } else {
        assert_error(&reply, "bad_request", None);
    }
}

#[tokio::test]
async fn presence_lists_subscribers_and_follows_unsubscribe_and_disconnect() {
    let node = start_node(test_config()).await;
    let mut observer = node.client().await;
    let mut a = node.client().await;
    let mut b = node.client().await;
    let mut c = node.client().await;

    let empty = observer
        .request(json!({"type":"presence","channel":"room","id":4}))
        .await;
    assert_eq!(
        empty,
        json!({"type":"presence","channel":"room","id":4,"count":0,"members":[]})
    );

    // A member appears before its `subscribed` reply.
    for client in [&mut a, &mut b, &mut c] {
        client.subscribe("room").await;
    }
    let member = |c: &Client| json!({"conn_id":c.conn_id(),"node":node.node_id,"user":null});
    let (ma, mb, mc) = (member(&a), member(&b), member(&c));
    assert_presence(
        &mut observer,
        "room",
        vec![ma.clone(), mb.clone(), mc.clone()],
    )
    .await;
    // A member of another channel is not listed.
    observer.subscribe("other").await;
    assert_presence(&mut a, "room", vec![ma.clone(), mb.clone(), mc.clone()]).await;

    // Gone before the `unsubscribed` reply.
    assert_eq!(
        a.request(json!({"type":"unsubscribe","channel":"room","id":1}))
            .await,
        json!({"type":"unsubscribed","channel":"room","id":1})
    );
    assert_presence(&mut observer, "room", vec![mb.clone(), mc.clone()]).await;

    // Gone within 1 s after the connection closes: a clean close...
    b.ws.close(None).await.unwrap();
    let closed = Instant::now();
    wait_presence(&mut observer, "room", vec![mc.clone()], closed).await;
    // ... and a dropped TCP connection without a close frame.
    drop(c);
    let closed = Instant::now();
    wait_presence(&mut observer, "room", vec![], closed).await;
}

/// Asserts a presence reply exactly (members in any order).
async fn assert_presence(client: &mut Client, channel: &str, members: Vec<Value>) {
    let reply = client
        .request(json!({"type":"presence","channel":channel,"id":"pr"}))
        .await;
    assert_eq!(reply["type"], "presence", "{reply}");
    assert_eq!(reply["channel"], channel, "{reply}");
    assert_eq!(reply["id"], "pr", "{reply}");
    assert_eq!(reply["count"], members.len(), "{reply}");
    let got = reply["members"].as_array().expect("members array").clone();
    assert_eq!(sorted(got), sorted(members), "{reply}");
    assert_eq!(reply.as_object().unwrap().len(), 5, "exact keys of {reply}");
}

/// Polls presence until it equals `members`; panics if that takes more than 1 s (plus slack for
/// a loaded machine) after `since`.
async fn wait_presence(client: &mut Client, channel: &str, members: Vec<Value>, since: Instant) {
    let limit = Duration::from_millis(1_250);
    let expected = sorted(members);
    loop {
        let reply = client
            .request(json!({"type":"presence","channel":channel}))
            .await;
        let got = sorted(reply["members"].as_array().expect("members array").clone());
        if got == expected {
            assert_eq!(reply["count"], expected.len(), "{reply}");
            return;
        }
        assert!(
            since.elapsed() < limit,
            "presence still {got:?} {:?} after the close, expected {expected:?}",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn ping_is_answered_with_pong() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    assert_eq!(
        c.request(json!({"type":"ping","id":5})).await,
        json!({"type":"pong","id":5})
    );
    assert_eq!(
        c.request(json!({"type":"ping","id":"five"})).await,
        json!({"type":"pong","id":"five"})
    );
    assert_eq!(
        c.request(json!({"type":"ping"})).await,
        json!({"type":"pong"})
    );
}

#[tokio::test]
async fn malformed_requests_are_bad_request_and_the_connection_stays_open() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let cases: &[(&str, Option<Value>)] = &[
        ("not json", None),
        ("", None),
        ("{\"type\":\"ping\"", None),
        ("[1]", None),
        ("\"x\"", None),
        ("42", None),
        ("null", None),
        ("{}", None),
        (r#"{"id":3}"#, Some(json!(3))),
        (r#"{"type":5,"id":4}"#, Some(json!(4))),
        (r#"{"type":null}"#, None),
        (r#"{"type":["subscribe"],"channel":"news"}"#, None),
        (r#"{"type":"subscribe","id":5}"#, Some(json!(5))),
        (r#"{"type":"subscribe","channel":5,"id":6}"#, Some(json!(6))),
        (r#"{"type":"subscribe","channel":null}"#, None),
        (r#"{"type":"unsubscribe"}"#, None),
        (
            r#"{"type":"unsubscribe","channel":{"a":1},"id":"u"}"#,
            Some(json!("u")),
        ),
        (r#"{"type":"presence","channel":["news"]}"#, None),
        (r#"{"type":"presence","id":"pr"}"#, Some(json!("pr"))),
        (
            r#"{"type":"publish","channel":"news","id":7}"#,
            Some(json!(7)),
        ),
        (r#"{"type":"publish","channel":"news"}"#, None),
        (r#"{"type":"publish","data":1,"id":8}"#, Some(json!(8))),
        (r#"{"type":"publish","channel":true,"data":1}"#, None),
    ];
    for (text, id) in cases {
        c.send_text(text).await;
        let reply = c.recv().await;
        assert_eq!(reply["code"], "bad_request", "request {text:?}: {reply}");
        assert_error(&reply, "bad_request", id.clone());
        assert_works(&mut c).await;
    }
}

#[tokio::test]
async fn unknown_types_are_unknown_type() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let cases = [
        (json!({"type":"foo","id":1}), Some(json!(1))),
        (json!({"type":"SUBSCRIBE","channel":"news"}), None),
        (
            json!({"type":"message","channel":"news","data":1,"id":"m"}),
            Some(json!("m")),
        ),
        (json!({"type":"welcome"}), None),
        (json!({"type":""}), None),
    ];
    for (req, id) in cases {
        let reply = c.request(req.clone()).await;
        assert_eq!(reply["code"], "unknown_type", "request {req}: {reply}");
        assert_error(&reply, "unknown_type", id);
        assert_works(&mut c).await;
    }
}

#[tokio::test]
async fn invalid_channel_names_are_refused_by_every_command() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let bad = [
        String::new(),
        "a".repeat(201),
        "two words".to_owned(),
        " lead".to_owned(),
        "café".to_owned(),
        "Ω".to_owned(),
        "tab\there".to_owned(),
        "new\nline".to_owned(),
        "star*".to_owned(),
        "hash#".to_owned(),
        "comma,".to_owned(),
        "caret^".to_owned(),
        "tick`".to_owned(),
        "quote\"".to_owned(),
        "back\\slash".to_owned(),
        "pct%20".to_owned(),
    ];
    for channel in &bad {
        let requests = [
            json!({"type":"subscribe","channel":channel,"id":"s"}),
            json!({"type":"unsubscribe","channel":channel,"id":"u"}),
            json!({"type":"publish","channel":channel,"data":1,"id":"p"}),
            json!({"type":"presence","channel":channel,"id":"pr"}),
        ];
        for req in requests {
            let reply = c.request(req.clone()).await;
            assert_eq!(reply["code"], "invalid_channel", "request {req}: {reply}");
            assert_error(&reply, "invalid_channel", Some(req["id"].clone()));
        }
        let reply = c
            .request(json!({"type":"subscribe","channel":channel}))
            .await;
        assert_error(&reply, "invalid_channel", None);
        assert_works(&mut c).await;
    }
}

#[tokio::test]
async fn every_valid_channel_name_form_is_accepted() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let mut publisher = node.client().await;
    let good = [
        "a".to_owned(),
        "x".repeat(200),
        "_-.:@/".to_owned(),
        "|+=~".to_owned(),
        "user:auth0|42".to_owned(),
        "ABCDEFGHIJKLMNOPQRSTUVWXYZ".to_owned(),
        "abcdefghijklmnopqrstuvwxyz0123456789".to_owned(),
        "chat:room-1/user@host.example_x".to_owned(),
        "0".to_owned(),
        "/".to_owned(),
        "..".to_owned(),
    ];
    for channel in &good {
        c.subscribe(channel).await;
        publisher.publish(channel, json!(channel)).await;
        assert_eq!(
            c.recv().await,
            json!({"type":"message","channel":channel,"data":channel})
        );
        let reply = c
            .request(json!({"type":"presence","channel":channel,"id":1}))
            .await;
        assert_eq!(reply["count"], 1, "{reply}");
        assert_eq!(
            c.request(json!({"type":"unsubscribe","channel":channel}))
                .await,
            json!({"type":"unsubscribed","channel":channel})
        );
    }
    // Names differing only in case are different channels.
    c.subscribe("Case").await;
    publisher.publish("case", json!(1)).await;
    assert_quiet(&mut c).await;
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused_but_resubscribing_is_accepted() {
    let config = pubgate::Config {
        max_subscriptions: 3,
        ..test_config()
    };
    let node = start_node(config).await;
    let mut c = node.client().await;
    let mut publisher = node.client().await;
    for ch in ["a", "b", "c"] {
        c.subscribe(ch).await;
    }
    let reply = c
        .request(json!({"type":"subscribe","channel":"d","id":9}))
        .await;
    assert_error(&reply, "too_many_subscriptions", Some(json!(9)));
    let reply = c.request(json!({"type":"subscribe","channel":"e"})).await;
    assert_error(&reply, "too_many_subscriptions", None);
    // The refused subscription is not live.
    publisher.publish("d", json!("nope")).await;
    assert_quiet(&mut c).await;
    // Re-subscribing a channel the connection already has is accepted at the limit.
    assert_eq!(
        c.request(json!({"type":"subscribe","channel":"c","id":10}))
            .await,
        json!({"type":"subscribed","channel":"c","id":10})
    );
    // A freed slot can be used again.
    assert_eq!(
        c.request(json!({"type":"unsubscribe","channel":"a"})).await,
        json!({"type":"unsubscribed","channel":"a"})
    );
    c.subscribe("d").await;
    publisher.publish("d", json!("yes")).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"d","data":"yes"})
    );
    let reply = c
        .request(json!({"type":"subscribe","channel":"a","id":11}))
        .await;
    assert_error(&reply, "too_many_subscriptions", Some(json!(11)));
    // The limit is per connection.
    let mut other = node.client().await;
    for ch in ["a", "b", "c"] {
        other.subscribe(ch).await;
    }
    assert_works(&mut c).await;
}

#[tokio::test]
async fn binary_frames_are_unsupported_and_the_connection_stays_open() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    c.subscribe("news").await;
    c.ws.send(Message::binary(br#"{"type":"ping","id":1}"#.to_vec()))
        .await
        .unwrap();
    let reply = c.recv().await;
    assert_error(&reply, "unsupported", None);
    c.ws.send(Message::binary(Vec::new())).await.unwrap();
    assert_error(&c.recv().await, "unsupported", None);
    assert_works(&mut c).await;
    // Still subscribed.
    let mut publisher = node.client().await;
    publisher.publish("news", json!("after")).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"news","data":"after"})
    );
}

#[tokio::test]
async fn one_publisher_reaches_every_subscriber_in_order_without_duplicates() {
    const N: usize = 500;
    let node = start_node(test_config()).await;
    let mut subs = Vec::new();
    for _ in 0..3 {
        let mut s = node.client().await;
        s.subscribe("seq").await;
        subs.push(s);
    }
    let mut publisher = node.client().await;
    // Pipelined: every publish is sent before any reply is read.
    for i in 0..N {
        publisher
            .ws
            .feed(Message::text(
                json!({"type":"publish","channel":"seq","data":{"i":i},"id":i}).to_string(),
            ))
            .await
            .unwrap();
    }
    publisher.ws.flush().await.unwrap();
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let mut got = Vec::with_capacity(N);
                for _ in 0..N {
                    let m = s.recv().await;
                    assert_eq!(m["type"], "message", "{m}");
                    assert_eq!(m["channel"], "seq", "{m}");
                    got.push(m["data"]["i"].as_u64().unwrap() as usize);
                }
                assert_quiet(&mut s).await;
                got
            })
        })
        .collect();
    let mut acked = HashSet::new();
    for _ in 0..N {
        let r = publisher.recv().await;
        assert_eq!(r["type"], "published", "{r}");
        assert!(
            acked.insert(r["id"].as_u64().unwrap()),
            "one reply per id: {r}"
        );
    }
    assert_eq!(acked.len(), N);
    for reader in readers {
        let got = reader.await.unwrap();
        assert_eq!(
            got,
            (0..N).collect::<Vec<_>>(),
            "in order, no gaps, no duplicates"
        );
    }
}

#[tokio::test]
async fn no_message_arrives_for_a_channel_the_connection_is_not_subscribed_to() {
    let node = start_node(test_config()).await;
    let mut c = node.client().await;
    let mut publisher = node.client().await;
    c.subscribe("news").await;
    c.subscribe("sports").await;
    // Similar names are other channels.
    for ch in ["new", "news2", "News", "news/", "sport", "other"] {
        publisher.publish(ch, json!(ch)).await;
    }
    publisher.publish("news", json!("sentinel")).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"news","data":"sentinel"})
    );
    assert_quiet(&mut c).await;

    // After unsubscribe: nothing more from that channel, the other one still delivers.
    assert_eq!(
        c.request(json!({"type":"unsubscribe","channel":"news"}))
            .await,
        json!({"type":"unsubscribed","channel":"news"})
    );
    publisher.publish("news", json!("late")).await;
    publisher.publish("sports", json!("score")).await;
    assert_eq!(
        c.recv().await,
        json!({"type":"message","channel":"sports","data":"score"})
    );
    assert_quiet(&mut c).await;

    // A channel whose last subscriber left still works for a new one.
    let mut d = node.client().await;
    d.subscribe("news").await;
    publisher.publish("news", json!("again")).await;
    assert_eq!(
        d.recv().await,
        json!({"type":"message","channel":"news","data":"again"})
    );
    assert_quiet(&mut c).await;
}
