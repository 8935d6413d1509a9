//! The writing side: the only place that writes to the socket.
//!
//! The queue holds complete frames (see [`super::frame`]), so the writer takes everything queued
//! at once and hands it to vectored writes straight from the shared `Bytes`: no copy, and as many
//! frames per syscall as have piled up. Until the connection starts closing a write may wait on a
//! client that reads slowly (its queue then fills and it is closed as a slow consumer); from then
//! on every write is bounded by the pong timeout, after which the socket is dropped.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, AsyncWriteExt, WriteHalf};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::frame::{self, PING_FRAME};
use super::{CloseReason, Io, Liveness, Outbox};
use crate::node::Node;

/// Frames handed to one vectored write: enough to amortise the syscall, small enough that
/// building the array on every poll stays cheap.
const MAX_IOV: usize = 64;
/// How long the writer waits for the client's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A drained batch queue keeps at most this many slots, so a past burst does not pin memory.
const KEEP_SLOTS: usize = 64;

type Sink = WriteHalf<Io>;

/// The socket failed or a closing write ran out of time: drop the connection.
struct Abort;

pub async fn run(
    mut sink: Sink,
    outbox: &Outbox,
    liveness: &Liveness,
    peer_closed: &CancellationToken,
    node: &Node,
) {
    let grace = node.limits.pong_timeout;
    let served = serve(&mut sink, outbox, liveness, node).await;
    let reason = outbox.close_reason();
    if let Some(label) = reason.metric_label() {
        node.metrics.disconnects.with_label_values(&[label]).inc();
    }
    if served.is_err() || reason == CloseReason::Gone {
        return;
    }
    let close = match &reason {
        CloseReason::Echo(payload) => frame::close(payload),
        other => {
            let (code, text) = other.frame().unwrap_or((1000, ""));
            frame::close_with(code, text)
        }
    };
    // When the client's own frames end the connection (its Close, a malformed frame), the
    // replies to the messages it sent before are still queued: they go out ahead of the close
    // frame (RFC 6455 5.5.1 lets an endpoint finish sending first), within the same bound.
    let mut last = VecDeque::new();
    if matches!(
        reason,
        CloseReason::Echo(_)
            | CloseReason::Protocol
            | CloseReason::InvalidUtf8
            | CloseReason::TooBig
    ) {
        outbox.take(&mut last);
    }
    last.push_back(close);
    let sent = bounded(outbox, grace, write_frames(&mut sink, &mut last)).await;
    if sent.is_ok() {
        let _ = tokio::time::timeout(CLOSE_WAIT.min(grace), peer_closed.cancelled()).await;
    }
}

/// Writes until the connection starts closing.
async fn serve(
    sink: &mut Sink,
    outbox: &Outbox,
    liveness: &Liveness,
    node: &Node,
) -> Result<(), Abort> {
    let limits = &node.limits;
    let grace = limits.pong_timeout;
    let idle_limit = limits.ping_interval + limits.pong_timeout;
    let mut ping =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    let mut idle = pin!(sleep(idle_limit));
    let mut batch = VecDeque::new();
    loop {
        if outbox.is_closing() {
            return Ok(());
        }
        outbox.take(&mut batch);
        if !batch.is_empty() {
            bounded(outbox, grace, write_frames(sink, &mut batch)).await?;
            if batch.capacity() > KEEP_SLOTS {
                batch.shrink_to(KEEP_SLOTS);
            }
        }
        // Timers first: they are ready only when due, and a connection that always has frames
        // queued must still ping and still notice a silent peer. Frames queued during the
        // write have left a wake-up, so `ready` returns at once for them.
        tokio::select! {
            biased;
            _ = ping.tick() => {
                bounded(outbox, grace, sink.write_all(&PING_FRAME)).await?;
            }
            _ = &mut idle => {
                let deadline = liveness.last_seen() + idle_limit;
                if Instant::now() >= deadline {
                    outbox.close(CloseReason::PongTimeout);
                    return Ok(());
                }
                idle.as_mut().reset(deadline);
            }
            _ = outbox.ready() => {}
        }
    }
}

/// Writes every frame of `frames`, as many per syscall as fit; leaves `frames` empty.
async fn write_frames(sink: &mut Sink, frames: &mut VecDeque<Bytes>) -> io::Result<()> {
    while !frames.is_empty() {
        // The iovec array lives only inside one poll, not in the connection's future; a lone
        // frame (the common case for a subscriber that keeps up) needs none.
        let written = poll_fn(|cx| {
            if frames.len() == 1 {
                return Pin::new(&mut *sink).poll_write(cx, &frames[0]);
            }
            let mut slices = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, frame) in slices.iter_mut().zip(frames.iter()) {
                *slot = IoSlice::new(frame);
                count += 1;
            }
            Pin::new(&mut *sink).poll_write_vectored(cx, &slices[..count])
        })
        .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        consume(frames, written);
    }
    Ok(())
}

/// Drops the first `written` bytes of the queued frames.
fn consume(frames: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(front) = frames.front_mut() else {
            return;
        };
        if written < front.len() {
            front.advance(written);
            return;
        }
        written -= front.len();
        frames.pop_front();
    }
}

/// Runs a write; once the connection is closing it gets at most `grace` more. The deadline is
/// only set up when the write does not complete at once, which is the rare case.
async fn bounded<F>(outbox: &Outbox, grace: Duration, write: F) -> Result<(), Abort>
where
    F: Future<Output = io::Result<()>>,
{
    let mut write = pin!(write);
    let result = match poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await {
        Poll::Ready(result) => result,
        Poll::Pending => {
            let deadline = async {
                outbox.closing().await;
                sleep(grace).await;
            };
            tokio::select! {
                result = write => result,
                _ = deadline => return Err(Abort),
            }
        }
    };
    result.map_err(|_| {
        outbox.close(CloseReason::Gone);
        Abort
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_drops_whole_frames_and_advances_into_a_partial_one() {
        let mut frames: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fgh"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        consume(&mut frames, 4);
        assert_eq!(frames, [&b"e"[..], b"fgh"]);
        consume(&mut frames, 1);
        assert_eq!(frames, [&b"fgh"[..]]);
        consume(&mut frames, 3);
        assert!(frames.is_empty());
    }
}
