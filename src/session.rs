//! What a client may do: the [`Session`] of one connection, which is the connection's
//! [`Handler`], and the client commands, one file each (`session/<command>.rs`), dispatched from
//! here.
//!
//! A command gets the connection's [`Session`] and returns the reply to send, or a
//! [`Rejection`] that becomes an `error` reply; neither ends the connection. The commands are
//! children of this module because they work on the session's state: as siblings, the session
//! (dispatching to them) and the commands (taking a `Session`) would import each other.

mod history;
mod presence;
mod publish;
mod refresh;
mod subscribe;
mod unsubscribe;

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::auth::{expiry, Identity, Permissions};
use crate::conn::{Handler, Message};
use crate::error::BrokerError;
use crate::node::Node;
use crate::wire::protocol::{parse_request, Command, ErrorCode, Rejection, Reply};
use crate::wire::Outbox;

/// Per-connection state the commands work on; owned by the connection's reader.
pub struct Session {
    node: Arc<Node>,
    outbox: Arc<Outbox>,
    /// Channels this connection is subscribed to.
    channels: HashSet<String>,
    /// Subscribed channels whose presence events the connection receives (a subset of
    /// `channels`).
    watched: HashSet<String>,
    /// The token's `sub`; `None` when anonymous.
    user: Option<String>,
    /// What the connection may do; replaced by a refresh.
    permissions: Permissions,
    /// Re-arms the expiry timer (authenticated connections only).
    expiry: Option<watch::Sender<u64>>,
}

impl Handler for Session {
    async fn on_message(&mut self, message: Message<'_>) -> Bytes {
        match message {
            Message::Binary(_) => self.binary_rejected(),
            // Boxed: a command's state would otherwise sit in every idle connection's task.
            Message::Text(text) => Box::pin(self.execute(text)).await,
        }
    }

    fn on_rate_limited(&mut self, message: Message<'_>) -> Bytes {
        let text = match message {
            Message::Text(text) => Some(text),
            Message::Binary(_) => None,
        };
        self.rate_limited(text)
    }

    /// Leaves every channel.
    async fn end(self) {
        if let Some(user) = &self.user {
            self.node.users().remove(user, self.outbox.key);
        }
        let channels: Vec<String> = self.channels.into_iter().collect();
        let watched: Vec<String> = self.watched.into_iter().collect();
        self.node
            .disconnect(&self.outbox, &channels, &watched)
            .await;
    }
}

impl Session {
    /// Starts a session: queues the `welcome`, registers an authenticated connection in the
    /// node's user index and starts its expiry timer.
    pub fn new(node: Arc<Node>, outbox: Arc<Outbox>, identity: Identity) -> Self {
        let welcome = Reply::Welcome {
            conn_id: outbox.conn_id(),
            node: node.id(),
            ping_interval_ms: node.limits().ping_interval.as_millis() as u64,
        };
        outbox.try_push(welcome.encode());
        if let Some(user) = &identity.user {
            node.users().insert(user, &outbox, identity.verified_at);
        }
        let expiry = identity.exp.map(|exp| expiry::watch(outbox.clone(), exp));
        Session {
            node,
            outbox,
            channels: HashSet::new(),
            watched: HashSet::new(),
            user: identity.user,
            permissions: identity.permissions,
            expiry,
        }
    }

    /// Executes one text message and returns the reply.
    async fn execute(&mut self, text: &str) -> Bytes {
        let result = match parse_request(text) {
            Err(rejection) => Err(rejection),
            Ok(request) => {
                let id = request.id;
                match request.command {
                    Command::Subscribe {
                        channel,
                        since,
                        presence_events,
                    } => subscribe::apply(self, id, &channel, since, presence_events).await,
                    Command::History { channel, limit } => {
                        history::apply(self, id, &channel, limit).await
                    }
                    Command::Unsubscribe { channel } => {
                        unsubscribe::apply(self, id, &channel).await
                    }
                    Command::Publish { channel, data } => {
                        publish::apply(self, id, &channel, data).await
                    }
                    Command::Presence {
                        channel,
                        count_only,
                    } => presence::apply(self, id, &channel, count_only).await,
                    Command::Ping => Ok(Reply::Pong { id }.encode()),
                    Command::Refresh { token } => refresh::apply(self, id, &token).await,
                }
            }
        };
        result.unwrap_or_else(|rejection| self.reject(&rejection))
    }

    /// The reply to a binary message, which the protocol does not use.
    fn binary_rejected(&self) -> Bytes {
        self.reject(&Rejection::new(
            None,
            ErrorCode::Unsupported,
            "binary messages are not supported; send JSON text",
        ))
    }

    /// The reply to a message over the rate limit (not executed). The request id is echoed when
    /// the text is a request that has one.
    fn rate_limited(&self, text: Option<&str>) -> Bytes {
        let id = text.and_then(|t| match parse_request(t) {
            Ok(request) => request.id,
            Err(rejection) => rejection.id,
        });
        self.reject(&Rejection::new(
            id,
            ErrorCode::RateLimited,
            "rate limit exceeded: message not executed",
        ))
    }

    fn reject(&self, rejection: &Rejection<'_>) -> Bytes {
        self.node
            .metrics()
            .requests_rejected
            .with_label_values(&[rejection.code.as_str()])
            .inc();
        Reply::from(rejection).encode()
    }

    /// Stops the presence events of `channel` if the connection watched them.
    async fn unwatch_presence(&mut self, channel: &str) {
        if self.watched.remove(channel) {
            self.node.unwatch_presence(&self.outbox, channel).await;
        }
    }
}

/// The `forbidden` rejection of a request its permissions do not cover.
fn forbidden<'a>(id: Option<&'a RawValue>, what: &str, channel: &str) -> Rejection<'a> {
    Rejection::new(
        id,
        ErrorCode::Forbidden,
        format!("not permitted to {what} `{channel}`"),
    )
}

/// The rejection for a broker or presence failure: `timeout` when the call timed out (its outcome
/// is unknown: a publish may still be delivered, a SUBSCRIBE may have reached Redis), else
/// `unavailable` (not accepted, never delivered). Either way the connection's own state is rolled
/// back: after a failed subscribe it is not subscribed.
fn broker_failed<'a>(
    id: Option<&'a serde_json::value::RawValue>,
    what: &'static str,
    error: &BrokerError,
) -> Rejection<'a> {
    tracing::debug!(error = %error, what, "request failed on the broker");
    match error {
        BrokerError::Timeout(after) => Rejection::new(
            id,
            ErrorCode::Timeout,
            format!("{what} timed out after {after:?}: outcome unknown"),
        ),
        BrokerError::Down => Rejection::new(
            id,
            ErrorCode::Unavailable,
            format!("{what} failed: the broker is unavailable"),
        ),
        other => Rejection::new(
            id,
            ErrorCode::Unavailable,
            format!("{what} failed: {other}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_timed_out_call_is_timeout_and_anything_else_unavailable() {
        let code = |e: BrokerError| broker_failed(None, "publish", &e).code;
        assert_eq!(
            code(BrokerError::Timeout(Duration::from_millis(500))),
            ErrorCode::Timeout
        );
        assert_eq!(code(BrokerError::Down), ErrorCode::Unavailable);
        let refused = redis::RedisError::from((redis::ErrorKind::Io, "connection refused"));
        assert_eq!(code(BrokerError::Redis(refused)), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::Timeout.as_str(), "timeout");
    }
}
