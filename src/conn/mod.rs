//! One WebSocket connection: a reader and a writer joined by a bounded queue.
//!
//! fastwebsockets' `read_frame` is not cancel-safe (a dropped read loses partly parsed bytes), so
//! reading is never a `select!` branch: the reader runs in the connection's task and is only
//! dropped once the connection is over; the writer runs in a task of its own, so the deliveries
//! that wake it do not poll the reader too.
//! The writer owns the socket's write half: deliveries, replies and pongs from the queue, the
//! server's ping timer, the dead-peer and stall deadlines and the final close frame; its writes
//! are raced against those deadlines, which the reader's never are. fastwebsockets parses
//! the client's frames, with a parser only while there are bytes to parse ([`lazy_read`]: an
//! idle connection holds no read buffer); the server's frames are encoded by
//! [`crate::wire::frame`], once per message.
//!
//! This module knows nothing of commands: the reader hands each complete data message to a
//! [`Handler`] (the session; in an `autobahn` build, an echo) and queues the reply it returns.
//! It takes its limits and the metrics, not the node.

mod capped;
#[cfg(feature = "autobahn")]
mod echo;
mod lazy_read;
mod rate;
pub(crate) mod reader;
mod transport;
mod writer;

#[cfg(feature = "autobahn")]
pub use self::echo::Echo;
pub use self::lazy_read::Source;
pub use self::transport::Transport;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
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
/// writer sends what `outbox` queues. Ends with [`Handler::end`], then `on_closed`.
///
/// The future returned is the connection's task (the reader; it spawns the writer's) and holds
/// what the connection keeps for its whole life, once: its body is an `async` block, not an
/// `async fn`, because an `async fn` keeps each argument twice (as received, and moved into its
/// body), and a layer that passed the socket or the handler on by value would add a copy more.
/// For the same reason each transport gets a future of its own, rather than one future holding
/// the `Transport`.
pub fn serve<H, F>(
    transport: Transport,
    outbox: Arc<Outbox>,
    handler: H,
    limits: Limits,
    metrics: Arc<Metrics>,
    on_closed: F,
) -> impl Future<Output = ()>
where
    H: Handler,
    F: FnOnce(),
{
    let span = tracing::info_span!("conn", conn_id = %outbox.conn_id());
    let owned = Owned {
        outbox,
        handler,
        limits,
        metrics,
        on_closed,
    };
    let conn = match transport {
        Transport::Tcp(read, write, leftover) => {
            Either::Left(connection(Source::new(read, leftover), write, owned))
        }
        Transport::Upgraded(read, write) => {
            Either::Right(connection(Source::new(read, Bytes::new()), write, owned))
        }
    };
    conn.instrument(span)
}

/// What a connection's task owns besides its socket.
struct Owned<H, F> {
    outbox: Arc<Outbox>,
    handler: H,
    limits: Limits,
    metrics: Arc<Metrics>,
    on_closed: F,
}

/// The connection's whole life (see [`serve`]).
fn connection<R, W, H, F>(
    source: Source<R>,
    write: W,
    owned: Owned<H, F>,
) -> impl Future<Output = ()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
    H: Handler,
    F: FnOnce(),
{
    let Owned {
        outbox,
        mut handler,
        limits,
        metrics,
        on_closed,
    } = owned;
    async move {
        metrics.connections.inc();
        metrics.connections_total.inc();
        tracing::debug!("connected");
        let liveness = Arc::new(Liveness::new());
        let peer_closed = CancellationToken::new();
        // The writer writes the raw write half (its frames are pre-encoded). It is a task of its
        // own: a delivery wakes just the writer, not the reader too (a task polls all it drives
        // on every wake-up, and a poll of the reader costs a lock and a readiness check).
        // Aborted with the connection's task if that is dropped.
        let mut writer = AbortOnDropHandle::new(tokio::spawn(writer::run(
            write,
            outbox.clone(),
            liveness.clone(),
            peer_closed.clone(),
            limits.clone(),
            metrics.clone(),
        )));
        {
            let reader = reader::run(
                &source,
                &mut handler,
                &outbox,
                &limits,
                &liveness,
                &peer_closed,
            );
            tokio::pin!(reader);
            tokio::select! {
                _ = &mut reader => {
                    let _ = (&mut writer).await;
                }
                _ = &mut writer => {}
            }
        }
        // Boxed: the leave-every-channel path runs once, and inline its state would sit in
        // every idle connection's task for the connection's whole life.
        Box::pin(handler.end()).await;
        metrics.connections.dec();
        tracing::debug!(reason = ?outbox.close_reason(), "disconnected");
        on_closed();
    }
}

#[cfg(test)]
mod tests {
    #![allow(unreachable_code, clippy::diverging_sub_expression)]

    use tokio::net::tcp::OwnedWriteHalf;

    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<T: Future>(_f: impl FnOnce() -> T) -> usize {
        std::mem::size_of::<T>()
    }

    /// Each idle connection holds its writer task's future (the connection task's is measured
    /// where the session is known, in `http`). Printed with `cargo test --release --lib
    /// task_future -- --nocapture`; bounded in release builds (the layout of debug builds
    /// differs), so that growth is noticed.
    #[test]
    fn the_writer_task_future_stays_small() {
        let writer = future_size(|| {
            writer::run::<OwnedWriteHalf>(todo!(), todo!(), todo!(), todo!(), todo!(), todo!())
        });
        println!("writer task future: {writer} bytes");
        // Up to about 790 bytes the task's cell (padded to 128 bytes) stays at 896.
        if cfg!(not(debug_assertions)) {
            assert!(
                writer <= 790,
                "the writer task future grew to {writer} bytes"
            );
        }
    }
}
