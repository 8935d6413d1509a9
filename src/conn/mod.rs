//! One WebSocket connection: a reader and a writer joined by a bounded queue.
//!
//! fastwebsockets' `read_frame` is not cancel-safe (a dropped read loses partly parsed bytes), so
//! reading is never a `select!` branch: the reader and the writer are two futures driven side by
//! side in the connection's task, and the reader is only dropped once the connection is over.
//! The writer owns the socket's write half: deliveries, replies and pongs from the queue, the
//! server's ping timer, the dead-peer and stall deadlines and the final close frame; its writes
//! are raced against those deadlines, which the reader's never are. fastwebsockets parses
//! the client's frames; the server's frames are encoded by [`crate::wire::frame`], once per message.

mod capped;
mod rate;
pub(crate) mod reader;
mod writer;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fastwebsockets::{Role, WebSocket};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::Identity;
use crate::node::Node;
use crate::session::Session;
use crate::wire::protocol::Reply;
use crate::wire::{Member, Outbox};

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

/// What a connection does with each complete data message from the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Executes it as a pubgate command (the product; the only mode of a default build).
    Gateway,
    /// Sends it back with its opcode, and sends no welcome: the endpoint the Autobahn TestSuite
    /// is run against, so that the suite tests exactly this connection code.
    #[cfg(feature = "autobahn")]
    Echo,
}

/// Serves one upgraded WebSocket of `identity` until it is closed.
pub async fn serve(ws: WebSocket<Io>, node: Arc<Node>, identity: Identity, mode: Mode) {
    let conn_id = format!("{:016x}", rand::random::<u64>());
    let span = tracing::info_span!("conn", conn_id = %conn_id);
    serve_inner(ws, node, conn_id, identity, mode)
        .instrument(span)
        .await
}

async fn serve_inner(
    ws: WebSocket<Io>,
    node: Arc<Node>,
    conn_id: String,
    identity: Identity,
    mode: Mode,
) {
    let limits = node.limits.clone();
    let metrics = node.metrics.clone();
    let member = Member {
        conn_id,
        node: node.id.clone(),
        user: identity.user.clone(),
        info: identity.info.clone(),
    };
    let outbox = Arc::new(Outbox::new(node.next_key(), member, limits.budget()));
    node.drain.register(&outbox);
    metrics.connections.inc();
    metrics.connections_total.inc();
    tracing::debug!("connected");

    if mode == Mode::Gateway {
        let welcome = Reply::Welcome {
            conn_id: outbox.conn_id(),
            node: &node.id,
            ping_interval_ms: limits.ping_interval.as_millis() as u64,
        };
        outbox.try_push(welcome.encode());
    }

    // fastwebsockets reads; the writer writes the raw half (its frames are pre-encoded), so the
    // library's own write half is never used.
    let (read_half, write_half) = tokio::io::split(ws.into_inner());
    let (read, _) = fastwebsockets::after_handshake_split(
        capped::Capped(read_half),
        tokio::io::sink(),
        Role::Server,
    );
    let liveness = Liveness::new();
    let peer_closed = CancellationToken::new();
    let mut session = Session::new(node.clone(), outbox.clone(), identity);
    {
        let reader = reader::run(read, &mut session, mode, &liveness, &peer_closed);
        let writer = writer::run(write_half, &outbox, &liveness, &peer_closed, &node);
        tokio::pin!(reader, writer);
        tokio::select! {
            _ = &mut reader => writer.await,
            _ = &mut writer => {}
        }
    }
    // Boxed: the leave-every-channel path runs once, and inline its state would sit in every
    // idle connection's task for the connection's whole life.
    Box::pin(session.end()).await;
    node.drain.unregister(outbox.key);
    metrics.connections.dec();
    tracing::debug!(reason = ?outbox.close_reason(), "disconnected");
}
