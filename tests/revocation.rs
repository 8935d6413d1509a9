//! What a backend revokes takes effect at once, however slow Redis is: a `refresh` that narrows
//! a connection's permissions stops its deliveries of the lost channels before presence and the
//! broker are cleaned up. (The `__control` race — a disconnect between a connection's token
//! check and its registration — is covered by `users::tests` and tests/control.rs.)

mod common;

use std::time::Duration;

use pubgate::Config;
use serde_json::json;
use tokio::time::Instant;

use common::redis::RedisServer;
use common::tokens::{hs256, now, SECRET};
use common::{rand_u32, start_node, test_config, Client, TestNode, WAIT};

async fn wait_metric(node: &TestNode, sample: &str, want: f64, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if node.metric(sample).await == Some(want) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Redis takes no write for 3 s (`CLIENT PAUSE WRITE`: presence removals and unsubscribes
/// block). The refresh must take the connection out of the hub at once anyway: before the fix
/// the hub entry went last, after up to one Redis timeout per channel.
#[tokio::test]
async fn refresh_stops_deliveries_of_revoked_channels_before_redis_answers() {
    let redis = RedisServer::start().await;
    let node = start_node(Config {
        redis_url: Some(redis.url()),
        channel_prefix: format!("t{:08x}:", rand_u32()),
        jwt_secret: Some(SECRET.into()),
        redis_timeout: Duration::from_millis(1500),
        // No probe during the pause: this test is not about broker liveness.
        broker_probe_interval: Duration::from_secs(30),
        ..test_config()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.http_get("/readyz").await.0 != 200 {
        assert!(Instant::now() < deadline, "node never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let token = hs256(&json!({"sub":"alice","exp":now()+120,"subscribe":["a:*"]}));
    let mut alice = Client::connect_bearer(&node.ws_url(), &token).await;
    for channel in ["a:1", "a:2", "a:3"] {
        alice.subscribe(channel).await;
    }
    assert!(wait_metric(&node, "pubgate_subscriptions", 3.0, WAIT).await);

    let _: String = redis.cmd(&["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    let exp = now() + 120;
    let none = hs256(&json!({"sub":"alice","exp":exp,"subscribe":[]}));
    let sent = Instant::now();
    alice
        .send(json!({"type":"refresh","token":none,"id":1}))
        .await;
    // Well under the 1.5 s Redis timeout, with room for a loaded machine.
    assert!(
        wait_metric(
            &node,
            "pubgate_subscriptions",
            0.0,
            Duration::from_millis(700)
        )
        .await,
        "the revoked subscriptions still receive deliveries while Redis is slow"
    );
    assert!(sent.elapsed() < Duration::from_millis(1400));
    // The replies follow once presence is cleaned up (or timed out), in the contract's order.
    for channel in ["a:1", "a:2", "a:3"] {
        assert_eq!(
            alice.recv().await,
            json!({"type":"unsubscribed","channel":channel,"reason":"forbidden"})
        );
    }
    assert_eq!(
        alice.recv().await,
        json!({"type":"refreshed","id":1,"exp":exp})
    );
    let _: String = redis.cmd(&["CLIENT", "UNPAUSE"]).await;
}
