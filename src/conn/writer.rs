//! The writing side: the only place that writes frames to the socket.
//!
//! Frames queued together are written into one buffer and flushed once. Until the connection
//! starts closing, a write may wait on a client that reads slowly (its queue then fills and it
//! is closed as a slow consumer); from then on every write is bounded by the pong timeout, after
//! which the socket is dropped without further ceremony.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use fastwebsockets::{Frame, OpCode, Payload, WebSocketError, WebSocketWrite};
use tokio::io::{BufWriter, WriteHalf};
use tokio::sync::mpsc;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, Io, Liveness, Outbox};
use crate::node::Node;

/// Messages written before one flush, so a busy connection still flushes regularly.
const MAX_BATCH: usize = 64;
/// How long the writer waits for the client's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

type Sink = WebSocketWrite<BufWriter<WriteHalf<Io>>>;

/// The socket failed or a closing write ran out of time: drop the connection.
struct Abort;

pub async fn run(
    mut ws: Sink,
    mut queue: mpsc::Receiver<Bytes>,
    mut control: mpsc::Receiver<Bytes>,
    outbox: &Outbox,
    liveness: &Liveness,
    peer_closed: &CancellationToken,
    node: &Node,
) {
    let limits = &node.limits;
    let grace = limits.pong_timeout;
    let served = serve(&mut ws, &mut queue, &mut control, outbox, liveness, node).await;
    let reason = outbox.close_reason();
    if let Some(label) = reason.metric_label() {
        node.metrics.disconnects.with_label_values(&[label]).inc();
    }
    if served.is_err() || reason == CloseReason::Gone {
        return;
    }
    let close = match &reason {
        CloseReason::Echo(payload) => Frame::close_raw(Payload::Borrowed(payload)),
        other => {
            let (code, text) = other.frame().unwrap_or((1000, ""));
            Frame::close(code, text.as_bytes())
        }
    };
    let sent = bounded(outbox, grace, async {
        ws.write_frame(close).await?;
        ws.flush().await
    })
    .await;
    if sent.is_ok() {
        let _ = tokio::time::timeout(CLOSE_WAIT.min(grace), peer_closed.cancelled()).await;
    }
}

/// Writes until the connection starts closing.
async fn serve(
    ws: &mut Sink,
    queue: &mut mpsc::Receiver<Bytes>,
    control: &mut mpsc::Receiver<Bytes>,
    outbox: &Outbox,
    liveness: &Liveness,
    node: &Node,
) -> Result<(), Abort> {
    let limits = &node.limits;
    let grace = limits.pong_timeout;
    let idle_limit = limits.ping_interval + limits.pong_timeout;
    let mut ping =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    let idle = sleep(idle_limit);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            biased;
            _ = outbox.closing() => return Ok(()),
            Some(payload) = control.recv() => {
                bounded(outbox, grace, ws.write_frame(Frame::pong(Payload::Borrowed(&payload)))).await?;
            }
            Some(msg) = queue.recv() => {
                bounded(outbox, grace, ws.write_frame(Frame::text(Payload::Borrowed(&msg)))).await?;
                for _ in 1..MAX_BATCH {
                    let Ok(msg) = queue.try_recv() else { break };
                    bounded(outbox, grace, ws.write_frame(Frame::text(Payload::Borrowed(&msg)))).await?;
                }
            }
            _ = ping.tick() => {
                let frame = Frame::new(true, OpCode::Ping, None, Payload::Borrowed(&[]));
                bounded(outbox, grace, ws.write_frame(frame)).await?;
            }
            _ = &mut idle => {
                let deadline = liveness.last_seen() + idle_limit;
                if Instant::now() >= deadline {
                    outbox.close(CloseReason::PongTimeout);
                    return Ok(());
                }
                idle.as_mut().reset(deadline);
                continue;
            }
        }
        bounded(outbox, grace, ws.flush()).await?;
    }
}

/// Runs a write; once the connection is closing it gets at most `grace` more.
async fn bounded(
    outbox: &Outbox,
    grace: Duration,
    write: impl Future<Output = Result<(), WebSocketError>>,
) -> Result<(), Abort> {
    let deadline = async {
        outbox.closing().await;
        sleep(grace).await;
    };
    tokio::select! {
        result = write => result.map_err(|_| {
            outbox.close(CloseReason::Gone);
            Abort
        }),
        _ = deadline => Err(Abort),
    }
}
