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
