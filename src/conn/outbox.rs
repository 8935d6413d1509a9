//! The sending side of one connection as the rest of the node sees it.
//!
//! Deliveries are pushed with [`Outbox::try_push`] and never wait: a full queue means the client
//! is not keeping up, so the connection is closed as a slow consumer and fan-out to everyone else
//! goes on. Replies to the client's own requests use [`Outbox::push`], which waits for room: a
//! client that sends requests without reading replies only slows itself down.

use std::sync::OnceLock;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::presence::Member;

/// Why and how the server closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is shutting down: 1001.
    Shutdown,
    /// The send queue overflowed: 1008.
    SlowConsumer,
    /// Nothing received within ping interval + pong timeout: 1008.
    PongTimeout,
    /// A message over the size limit: 1009.
    TooBig,
    /// Invalid UTF-8 in a text message: 1007.
    InvalidUtf8,
    /// A malformed frame: 1002.
    Protocol,
    /// The token reached its `exp` without a refresh: 1008.
    TokenExpired,
    /// A backend's `__control` disconnect for the connection's user: 1008.
    Disconnected,
    /// More than twice the rate limit in each of 5 consecutive seconds: 1008.
    Flood,
    /// The client closed: echo its close payload (empty when it sent none).
    Echo(Bytes),
    /// The peer is gone (EOF, reset): no close frame can be sent.
    Gone,
}

impl CloseReason {
    /// The close code and reason text to send; `None` for no close frame payload.
    pub fn frame(&self) -> Option<(u16, &'static str)> {
        match self {
            CloseReason::Shutdown => Some((1001, "server shutting down")),
            CloseReason::SlowConsumer => Some((1008, "slow consumer")),
            CloseReason::PongTimeout => Some((1008, "pong timeout")),
            CloseReason::TooBig => Some((1009, "message too big")),
            CloseReason::InvalidUtf8 => Some((1007, "invalid utf-8")),
            CloseReason::Protocol => Some((1002, "protocol error")),
            CloseReason::TokenExpired => Some((1008, "token expired")),
            CloseReason::Disconnected => Some((1008, "disconnected")),
            CloseReason::Flood => Some((1008, "rate limit exceeded")),
            CloseReason::Echo(_) | CloseReason::Gone => None,
        }
    }

    /// The `reason` label of `pubgate_disconnects_total`, for closes forced by the server.
    pub fn metric_label(&self) -> Option<&'static str> {
        match self {
            CloseReason::Shutdown => Some("shutdown"),
            CloseReason::SlowConsumer => Some("slow_consumer"),
            CloseReason::PongTimeout => Some("pong_timeout"),
            CloseReason::TooBig => Some("message_too_big"),
            CloseReason::InvalidUtf8 => Some("invalid_utf8"),
            CloseReason::Protocol => Some("protocol_error"),
            CloseReason::TokenExpired => Some("token_expired"),
            CloseReason::Disconnected => Some("control"),
            CloseReason::Flood => Some("flood"),
            CloseReason::Echo(_) | CloseReason::Gone => None,
        }
    }
}

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The queue is full: the connection is now closing as a slow consumer.
    Full,
    /// The connection is closing or closed; nothing was queued.
    Closed,
}

/// One connection's queue and close switch.
#[derive(Debug)]
pub struct Outbox {
    /// Node-local key of the connection (cheaper to hash than the conn id).
    pub key: u64,
    /// Who this connection is in presence.
    pub member: Member,
    queue: mpsc::Sender<Bytes>,
    /// Cancelled when the connection starts closing; a child of the node's shutdown token, so a
    /// shutdown closes every connection without a registry of them.
    closing: CancellationToken,
    /// The first reason given wins; unset when the close came from the shutdown token.
    reason: OnceLock<CloseReason>,
}

impl Outbox {
    pub fn new(
        key: u64,
        member: Member,
        queue: mpsc::Sender<Bytes>,
        closing: CancellationToken,
    ) -> Self {
        Outbox {
            key,
            member,
            queue,
            closing,
            reason: OnceLock::new(),
        }
    }

    pub fn conn_id(&self) -> &str {
        &self.member.conn_id
    }

    /// Queues a delivery without waiting; closes the connection when its queue is full.
    pub fn try_push(&self, msg: Bytes) -> Push {
        if self.closing.is_cancelled() {
            return Push::Closed;
        }
        match self.queue.try_send(msg) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.close(CloseReason::SlowConsumer);
                Push::Full
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Closed,
        }
    }

    /// Queues a reply, waiting for room; returns false if the connection is closing.
    pub async fn push(&self, msg: Bytes) -> bool {
        tokio::select! {
            sent = self.queue.send(msg) => sent.is_ok(),
            _ = self.closing.cancelled() => false,
        }
    }

    /// Starts closing the connection; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closing.cancel();
    }

    pub fn is_closing(&self) -> bool {
        self.closing.is_cancelled()
    }

    /// Resolves once the connection starts closing.
    pub async fn closing(&self) {
        self.closing.cancelled().await
    }

    /// Why the connection is closing (a shutdown unless a reason was given).
    pub fn close_reason(&self) -> CloseReason {
        self.reason.get().cloned().unwrap_or(CloseReason::Shutdown)
    }
}
