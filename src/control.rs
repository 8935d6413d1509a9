//! The backend's control channel: `PUBLISH <prefix>__control '{"type":"disconnect","user":"alice"}'`.
//!
//! Every node subscribes `__control` on its broker at start (retrying until the broker takes it;
//! from then on the broker restores it after every reconnect like any other channel). The
//! [`Router`] is the broker's sink: it hands control messages to the user index and everything
//! else to the hub. Clients can never reach this channel: names starting with `__` are refused
//! before any command runs.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::Value;

use crate::broker::MessageSink;
use crate::conn::CloseReason;
use crate::hub::Hub;
use crate::node::Node;
use crate::users::Users;

/// The control channel's name (without the node's channel prefix).
pub const CONTROL_CHANNEL: &str = "__control";

/// The broker's sink: control messages to the user index, the rest to the hub.
pub struct Router {
    pub hub: Arc<Hub>,
    pub users: Arc<Users>,
}

impl MessageSink for Router {
    fn deliver(&self, channel: &str, payload: &[u8]) {
        if channel == CONTROL_CHANNEL {
            self.control(payload);
        } else {
            self.hub.deliver(channel, payload);
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

/// Subscribes the node to the control channel, retrying until the broker accepts it (a Redis
/// broker refuses while it is still connecting). Stops when the node is gone.
pub async fn subscribe(node: Weak<Node>) {
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(node) = node.upgrade() else { return };
        match node.broker.subscribe(CONTROL_CHANNEL).await {
            Ok(()) => {
                tracing::debug!("subscribed to the control channel");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "control channel subscribe failed; retrying"),
        }
        drop(node);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::Outbox;
    use crate::metrics::Metrics;
    use crate::presence::Member;

    fn outbox(key: u64, user: &str) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("c{key}"),
            node: "n".into(),
            user: Some(user.into()),
        };
        Arc::new(Outbox::new(key, member, 1))
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
            router.users.insert(o.member.user.as_deref().unwrap(), o);
        }
        for ignored in [
            &br#"["disconnect","alice"]"#[..],
            br#"{"type":"disconnect"}"#,
            br#"{"type":"disconnect","user":["alice"]}"#,
            br#"{"type":"kick","user":"alice"}"#,
            b"\xff\xfe",
        ] {
            router.deliver(CONTROL_CHANNEL, ignored);
        }
        // The same text on an ordinary channel is a message, not a command.
        router.deliver("control", br#"{"type":"disconnect","user":"alice"}"#);
        assert!(alice.iter().all(|o| !o.is_closing()));
        router.deliver(CONTROL_CHANNEL, br#"{"type":"disconnect","user":"alice"}"#);
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
}
