//! The backend's control channel: `PUBLISH <prefix>__control '{"type":"disconnect","user":"alice"}'`.
//!
//! Every node subscribes `__control` on its broker at start (retrying until the broker takes it,
//! and not ready until then; from then on the broker restores it after every reconnect like any
//! other channel). The [`Router`] is the broker's sink: it hands control messages to the user
//! index and everything else to the hub. Clients can never reach this channel: names starting
//! with `__` are refused before any command runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::broker::Position;
use crate::broker::{Broker, MessageSink};
use crate::users::Users;
use crate::wire::CloseReason;

/// The control channel's name (without the node's channel prefix).
pub const CONTROL_CHANNEL: &str = "__control";

/// The broker's sink: control messages to the user index, the rest to the hub (directly with
/// the memory broker, through the fan-out workers with Redis).
pub struct Router {
    pub hub: Arc<dyn MessageSink>,
    pub users: Arc<Users>,
}

impl MessageSink for Router {
    fn deliver(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>) {
        if channel == CONTROL_CHANNEL {
            self.control(payload);
        } else {
            self.hub.deliver(channel, payload, position);
        }
    }
}

impl Router {
    /// Handles one control message; anything but a well-formed disconnect is ignored.
    fn control(&self, payload: &[u8]) {
        // A JSON object only: serde would also read a struct out of an array.
        let Ok(Value::Object(msg)) = serde_json::from_slice::<Value>(payload) else {
            tracing::debug!("control message ignored: not a JSON object");
            return;
        };
        match (msg.get("type"), msg.get("user")) {
            (Some(Value::String(kind)), Some(Value::String(user))) if kind == "disconnect" => {
                let closed = self.users.close_all(user, CloseReason::Disconnected);
                tracing::info!(user = %user, connections = closed, "control: disconnect");
            }
            (kind, _) => tracing::debug!(?kind, "control message ignored"),
        }
    }
}

/// Subscribes the node's broker to the control channel: once now, then, if the broker refused (a
/// Redis broker does while it is still connecting), in the background until it takes it, and
/// sets `live` then. `/readyz` stays 503 until the subscription is live, so a node never takes
/// clients before it can obey a disconnect for them. Once live, the broker restores it after
/// every reconnect.
pub async fn subscribe(broker: &Arc<dyn Broker>, live: &Arc<AtomicBool>) {
    if !try_subscribe(broker.as_ref(), live).await {
        tokio::spawn(retry(Arc::downgrade(broker), Arc::downgrade(live)));
    }
}

async fn try_subscribe(broker: &dyn Broker, live: &AtomicBool) -> bool {
    match broker.subscribe(CONTROL_CHANNEL).await {
        Ok(()) => {
            live.store(true, Ordering::Release);
            tracing::debug!("subscribed to the control channel");
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "control channel subscribe failed; retrying");
            false
        }
    }
}

/// Retries with a short capped backoff (readiness waits on it); stops when the node (which
/// holds both) is gone.
async fn retry(broker: Weak<dyn Broker>, live: Weak<AtomicBool>) {
    let mut delay = Duration::from_millis(20);
    loop {
        tokio::time::sleep(delay).await;
        let (Some(broker), Some(live)) = (broker.upgrade(), live.upgrade()) else {
            return;
        };
        if try_subscribe(broker.as_ref(), &live).await {
            return;
        }
        delay = (delay * 2).min(Duration::from_millis(250));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::wire::{Budget, Member, Outbox};

    fn outbox(key: u64, user: &str) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("c{key}"),
            node: "n".into(),
            user: Some(user.into()),
            info: None,
        };
        Arc::new(Outbox::new(
            key,
            member,
            Budget {
                frames: 1,
                bytes: 1 << 20,
            },
        ))
    }

    #[test]
    fn only_a_disconnect_object_for_the_user_closes_its_connections() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let router = Router {
            hub: Arc::new(Hub::new(metrics)),
            users: Arc::new(Users::default()),
        };
        let alice = [outbox(1, "alice"), outbox(2, "alice")];
        let bob = outbox(3, "bob");
        for o in alice.iter().chain([&bob]) {
            router.users.insert(
                o.member.user.as_deref().unwrap(),
                o,
                std::time::Instant::now(),
            );
        }
        for ignored in [
            &br#"["disconnect","alice"]"#[..],
            br#"{"type":"disconnect"}"#,
            br#"{"type":"disconnect","user":["alice"]}"#,
            br#"{"type":"kick","user":"alice"}"#,
            b"\xff\xfe",
        ] {
            router.deliver(CONTROL_CHANNEL, ignored, None);
        }
        // The same text on an ordinary channel is a message, not a command.
        router.deliver("control", br#"{"type":"disconnect","user":"alice"}"#, None);
        assert!(alice.iter().all(|o| !o.is_closing()));
        router.deliver(
            CONTROL_CHANNEL,
            br#"{"type":"disconnect","user":"alice"}"#,
            None,
        );
        assert!(alice
            .iter()
            .all(|o| o.close_reason() == CloseReason::Disconnected));
        assert!(!bob.is_closing());
        // A closed connection leaves the index.
        router.users.remove("alice", 1);
        router.users.remove("alice", 2);
        assert_eq!(
            router.users.close_all("alice", CloseReason::Disconnected),
            0
        );
    }

    /// A broker that refuses the first `refusals` subscribes, like a Redis broker still
    /// connecting, and records when each was tried (ms since the test began).
    struct Connecting {
        refusals: std::sync::Mutex<usize>,
        tries: std::sync::Mutex<Vec<u64>>,
        start: tokio::time::Instant,
    }

    #[async_trait::async_trait]
    impl Broker for Connecting {
        async fn subscribe(&self, _channel: &str) -> Result<(), crate::error::BrokerError> {
            let ms = self.start.elapsed().as_millis() as u64;
            self.tries.lock().unwrap().push(ms);
            let mut refusals = self.refusals.lock().unwrap();
            if *refusals == 0 {
                return Ok(());
            }
            *refusals -= 1;
            Err(crate::error::BrokerError::Down)
        }

        async fn unsubscribe(&self, _channel: &str) -> Result<(), crate::error::BrokerError> {
            Ok(())
        }

        async fn publish(
            &self,
            _channel: &str,
            _payload: bytes::Bytes,
        ) -> Result<(), crate::error::BrokerError> {
            Ok(())
        }

        fn is_up(&self) -> bool {
            true
        }
    }

    fn connecting(refusals: usize) -> Arc<Connecting> {
        Arc::new(Connecting {
            refusals: std::sync::Mutex::new(refusals),
            tries: std::sync::Mutex::default(),
            start: tokio::time::Instant::now(),
        })
    }

    /// The node is not ready until the control channel is live: a refused subscribe is retried
    /// with a backoff doubling from 20 ms up to 250 ms until the broker takes it.
    #[tokio::test(start_paused = true)]
    async fn the_control_subscribe_is_retried_until_the_broker_takes_it() {
        let broker = connecting(6);
        let live = Arc::new(AtomicBool::new(false));
        let dyn_broker: Arc<dyn Broker> = broker.clone();
        subscribe(&dyn_broker, &live).await;
        assert!(!live.load(Ordering::Acquire));
        tokio::time::sleep(Duration::from_millis(799)).await;
        assert!(!live.load(Ordering::Acquire));
        // Past the try at 800 ms (a task woken at the same instant may run after this one).
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(live.load(Ordering::Acquire));
        let tries = broker.tries.lock().unwrap().clone();
        assert_eq!(tries, [0, 20, 60, 140, 300, 550, 800]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_stops_with_the_node() {
        let broker = connecting(usize::MAX);
        let live = Arc::new(AtomicBool::new(false));
        let dyn_broker: Arc<dyn Broker> = broker.clone();
        subscribe(&dyn_broker, &live).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The node (which holds both) is gone.
        drop((dyn_broker, live));
        tokio::time::sleep(Duration::from_secs(10)).await;
        let tries = broker.tries.lock().unwrap().clone();
        assert_eq!(tries, [0, 20, 60]);
    }
}
