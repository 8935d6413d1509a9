//! One WebSocket connection: a reader and a writer joined by a bounded queue.
//!
//! fastwebsockets' `read_frame` is not cancel-safe (a dropped read loses partly parsed bytes), so
//! reading is never a `select!` branch: the reader runs in the connection's task and is only
//! dropped once the connection is over; the writer runs in a task of its own, so the deliveries
//! that wake it do not poll the reader too.
//! The writer owns the socket's write half: deliveries, replies and pongs from the queue, the
//! server's ping timer, the dead-peer and stall deadlines and the final close frame; its writes
//! are raced against those deadlines, which the reader's never are. fastwebsockets parses
//! the client's frames; the server's frames are encoded by [`crate::wire::frame`], once per
//! message.
//!
//! This module knows nothing of commands: the reader hands each complete data message to a
//! [`Handler`] (the session; in an `autobahn` build, an echo) and queues the reply it returns.
//! It takes its limits and the metrics, not the node.

mod capped;
#[cfg(feature = "autobahn")]
mod echo;
mod rate;
pub(crate) mod reader;
mod writer;

#[cfg(feature = "autobahn")]
pub use self::echo::Echo;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Role, WebSocket};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;
use tracing::Instrument;

use crate::metrics::Metrics;
use crate::wire::Outbox;

/// The upgraded HTTP connection.
pub type Io = TokioIo<Upgraded>;

/// When the connection last received anything from the client.
#[derive(Debug)]
pub struct Liveness {
    start: Instant,
    last_ms: AtomicU64,
}

impl Liveness {
    pub(crate) fn new() -> Self {
        Liveness {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last_seen(&self) -> Instant {
        self.start + std::time::Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// What one connection enforces, copied out of the node's settings.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The server's ping period; with `pong_timeout`, how long a silent client may stay.
    pub ping_interval: Duration,
    /// Grace after a ping interval, and the bound of the closing handshake.
    pub pong_timeout: Duration,
    /// Largest message, reassembled fragments included.
    pub max_message_size: usize,
    /// Client messages per second; 0 = unlimited.
    pub rate_limit: u32,
    /// Token bucket capacity of the rate limit.
    pub rate_burst: u32,
}

/// A complete data message from the client, its text checked as UTF-8.
#[derive(Debug, Clone, Copy)]
pub enum Message<'a> {
    Text(&'a str),
    /// The session refuses binary without reading it; only the Autobahn echo reads the bytes.
    Binary(#[cfg_attr(not(feature = "autobahn"), allow(dead_code))] &'a [u8]),
}

/// What a connection does with the client's messages: the session executes them as commands.
///
/// Generic, not `dyn`: the reader is compiled for its handler, so the per-message call stays
/// static. Called from the reader only, one message at a time, in the order they arrived.
pub trait Handler {
    /// Handles one complete data message within the rate limit; returns the frame to queue as
    /// its reply (empty: none, the handler queued its replies itself). The reader waits for room
    /// in the queue, so a client that does not read its replies only stops itself.
    async fn on_message(&mut self, message: Message<'_>) -> Bytes;

    /// Answers a message over the rate limit, which is not handled (empty: no answer).
    fn on_rate_limited(&mut self, message: Message<'_>) -> Bytes;

    /// Called once, after the connection has closed.
    async fn end(self);
}

/// Serves one upgraded WebSocket until it is closed: `handler` gets the client's messages, the
/// writer sends what `outbox` queues. Ends with [`Handler::end`].
pub async fn serve<H: Handler>(
    ws: WebSocket<Io>,
    outbox: &Arc<Outbox>,
    handler: H,
    limits: &Limits,
    metrics: &Arc<Metrics>,
) {
    // The session's events carry the connection's id; the writer's task is not in the span
    // (it is polled on every delivery) and names the connection in its one event itself.
    let span = tracing::info_span!("conn", conn_id = %outbox.conn_id());
    serve_inner(ws, outbox, handler, limits, metrics)
        .instrument(span)
        .await
}

async fn serve_inner<H: Handler>(
    ws: WebSocket<Io>,
    outbox: &Arc<Outbox>,
    mut handler: H,
    limits: &Limits,
    metrics: &Arc<Metrics>,
) {
    metrics.connections.inc();
    metrics.connections_total.inc();
    tracing::debug!("connected");

    // fastwebsockets reads; the writer writes the raw half (its frames are pre-encoded), so the
    // library's own write half is never used.
    let (read_half, write_half) = tokio::io::split(ws.into_inner());
    let (read, _) = fastwebsockets::after_handshake_split(
        capped::Capped(read_half),
        tokio::io::sink(),
        Role::Server,
    );
    let liveness = Arc::new(Liveness::new());
    let peer_closed = CancellationToken::new();
    // The writer is a task of its own: a delivery wakes just the writer, not the reader too (a
    // task polls all it drives on every wake-up, and a poll of the reader costs a lock and a
    // readiness check). Aborted with the connection's task if that is dropped.
    let mut writer = AbortOnDropHandle::new(tokio::spawn(writer::run(
        write_half,
        outbox.clone(),
        liveness.clone(),
        peer_closed.clone(),
        limits.clone(),
        metrics.clone(),
    )));
    {
        let reader = reader::run(read, &mut handler, outbox, limits, &liveness, &peer_closed);
        tokio::pin!(reader);
        tokio::select! {
            _ = &mut reader => {
                let _ = (&mut writer).await;
            }
            _ = &mut writer => {}
        }
    }
    // Boxed: the leave-every-channel path runs once, and inline its state would sit in every
    // idle connection's task for the connection's whole life.
    Box::pin(handler.end()).await;
    metrics.connections.dec();
    tracing::debug!(reason = ?outbox.close_reason(), "disconnected");
}
