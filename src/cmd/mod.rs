//! Client commands: one file each, dispatched from here.
//!
//! A command gets the connection's [`Session`] and returns the reply to send, or a
//! [`Rejection`] that becomes an `error` reply; neither ends the connection.

mod presence;
mod publish;
mod subscribe;
mod unsubscribe;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;

use crate::conn::Outbox;
use crate::error::BrokerError;
use crate::node::Node;
use crate::protocol::{parse_request, Command, ErrorCode, Rejection, Reply};

/// Per-connection state the commands work on; owned by the connection's reader.
pub struct Session {
    pub node: Arc<Node>,
    pub outbox: Arc<Outbox>,
    /// Channels this connection is subscribed to.
    pub channels: HashSet<String>,
}

impl Session {
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>) -> Self {
        Session {
            node,
            outbox,
            channels: HashSet::new(),
        }
    }

    /// Executes one text message and returns the reply.
    pub async fn execute(&mut self, text: &str) -> Bytes {
        let result = match parse_request(text) {
            Err(rejection) => Err(rejection),
            Ok(request) => {
                let id = request.id;
                match request.command {
                    Command::Subscribe { channel } => subscribe::apply(self, id, &channel).await,
                    Command::Unsubscribe { channel } => {
                        unsubscribe::apply(self, id, &channel).await
                    }
                    Command::Publish { channel, data } => {
                        publish::apply(self, id, &channel, data).await
                    }
                    Command::Presence { channel } => presence::apply(self, id, &channel).await,
                    Command::Ping => Ok(Reply::Pong { id }.encode()),
                }
            }
        };
        result.unwrap_or_else(|rejection| self.reject(&rejection))
    }

    /// The reply to a binary message, which the protocol does not use.
    pub fn binary_rejected(&self) -> Bytes {
        self.reject(&Rejection::new(
            None,
            ErrorCode::Unsupported,
            "binary messages are not supported; send JSON text",
        ))
    }

    fn reject(&self, rejection: &Rejection<'_>) -> Bytes {
        self.node
            .metrics
            .requests_rejected
            .with_label_values(&[rejection.code.as_str()])
            .inc();
        Reply::from(rejection).encode()
    }

    /// Leaves every channel; called once when the connection has closed.
    pub async fn end(self) {
        let channels: Vec<String> = self.channels.into_iter().collect();
        self.node.disconnect(&self.outbox, &channels).await;
    }
}

/// The `unavailable` rejection for a broker or presence failure.
fn unavailable<'a>(
    id: Option<&'a serde_json::value::RawValue>,
    what: &'static str,
    error: &BrokerError,
) -> Rejection<'a> {
    tracing::debug!(error = %error, what, "request failed on the broker");
    let message = match error {
        BrokerError::Down => format!("{what} failed: the broker is unavailable"),
        other => format!("{what} failed: {other}"),
    };
    Rejection::new(id, ErrorCode::Unavailable, message)
}
