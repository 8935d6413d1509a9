//! The writing side: the only place that writes to the socket.
//!
//! The queue holds complete frames (see [`crate::wire::frame`]), so the writer takes everything queued
//! at once and hands it to vectored writes straight from the shared `Bytes`: no copy, and as many
//! frames per syscall as have piled up. Each write is one `poll_write`, which either accepts bytes
//! or accepts none, so it is raced against the timers without losing anything: the server's ping,
//! the dead-peer deadline (a client silent for ping interval + pong timeout), the stall deadline
//! (a socket that accepts no byte for as long while frames wait) and the close switch all fire
//! whatever the socket does, mid-frame included. (The reader is the half that must never be
//! raced: fastwebsockets' `read_frame` is not cancel-safe.)
//!
//! Bytes stay counted in the outbox's budget until the socket accepted them ([`Outbox::sent`]).

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::pin::{pin, Pin};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncWrite, WriteHalf};
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::{Io, Limits, Liveness};
use crate::metrics::Metrics;
use crate::wire::frame::{self, PING_FRAME};
use crate::wire::{CloseReason, Outbox};

/// Frames handed to one vectored write: enough to amortise the syscall, small enough that
/// building the array on every poll stays cheap.
const MAX_IOV: usize = 64;
/// How long the writer waits for the client's close frame after sending its own.
const CLOSE_WAIT: Duration = Duration::from_secs(1);
/// A drained batch queue keeps at most this many slots, so a past burst does not pin memory.
const KEEP_SLOTS: usize = 64;

type Sink = WriteHalf<Io>;

/// The socket failed: drop the connection.
struct Abort;

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
struct Batch {
    frames: VecDeque<Bytes>,
    /// The socket accepted part of the first frame (kept for the log of a stalled close).
    mid_frame: bool,
}

pub async fn run(
    mut sink: Sink,
    outbox: &Outbox,
    liveness: &Liveness,
    peer_closed: &CancellationToken,
    limits: &Limits,
    metrics: &Metrics,
) {
    let grace = limits.pong_timeout;
    let mut batch = Batch::default();
    let served = serve(&mut sink, outbox, liveness, limits, &mut batch).await;
    let reason = outbox.close_reason();
    if let Some(label) = reason.metric_label() {
        metrics.disconnects.with_label_values(&[label]).inc();
    }
    // A stalled socket has accepted nothing for ping interval + pong timeout: a close frame
    // would wait the same way, so the connection is dropped at once.
    if served.is_err() || matches!(reason, CloseReason::Gone | CloseReason::Stalled) {
        outbox.discard();
        return;
    }
    let close = match &reason {
        CloseReason::Echo(payload) => frame::close(payload),
        other => {
            let (code, text) = other.frame().unwrap_or((1000, ""));
            frame::close_with(code, text)
        }
    };
    // The batch already taken goes out first (a frame the socket accepted part of must be
    // finished before the close frame, or the client would read the close as payload).
    let mut last = std::mem::take(&mut batch.frames);
    // When the client's own frames end the connection (its Close, a malformed frame), the
    // replies to the messages it sent before are still queued: they go out ahead of the close
    // frame (RFC 6455 5.5.1 lets an endpoint finish sending first), within the same bound.
    if matches!(
        reason,
        CloseReason::Echo(_)
            | CloseReason::Protocol
            | CloseReason::InvalidUtf8
            | CloseReason::TooBig
    ) {
        let mut queued = VecDeque::new();
        outbox.take(&mut queued);
        last.append(&mut queued);
    }
    drop(batch);
    last.push_back(close);
    outbox.discard();
    outbox.hold(last.iter().map(Bytes::len).sum());
    let sent = tokio::time::timeout(grace, write_all(&mut sink, outbox, &mut last)).await;
    outbox.discard();
    if matches!(sent, Ok(Ok(()))) {
        let _ = tokio::time::timeout(CLOSE_WAIT.min(grace), peer_closed.cancelled()).await;
    }
}

/// What woke the writer.
enum Event {
    Ping,
    Idle,
    Stall,
    Wrote(io::Result<usize>),
    Ready,
}

/// Writes until the connection starts closing.
async fn serve(
    sink: &mut Sink,
    outbox: &Outbox,
    liveness: &Liveness,
    limits: &Limits,
    batch: &mut Batch,
) -> Result<(), Abort> {
    let idle_limit = limits.ping_interval + limits.pong_timeout;
    let mut ping =
        tokio::time::interval_at(Instant::now() + limits.ping_interval, limits.ping_interval);
    let mut idle = pin!(sleep(idle_limit));
    // The stall deadline is `progress + idle_limit`; the timer is only moved when it fires
    // early, so a write costs no timer update.
    let mut stall = pin!(sleep(idle_limit));
    let mut progress = Instant::now();
    loop {
        if outbox.is_closing() {
            return Ok(());
        }
        if batch.frames.is_empty() {
            if batch.frames.capacity() > KEEP_SLOTS {
                batch.frames.shrink_to(KEEP_SLOTS);
            }
            outbox.take(&mut batch.frames);
            if !batch.frames.is_empty() {
                // Frames wait from now: the socket gets the whole limit to take them.
                progress = Instant::now();
            }
        }
        let pending = !batch.frames.is_empty();
        // Timers first: they are ready only when due, and a connection that always has frames
        // queued must still ping, notice a silent peer and notice a stalled socket.
        let event = tokio::select! {
            biased;
            _ = ping.tick() => Event::Ping,
            _ = &mut idle => Event::Idle,
            _ = &mut stall, if pending => Event::Stall,
            written = write_some(sink, &batch.frames), if pending => Event::Wrote(written),
            _ = outbox.closing(), if pending => Event::Ready,
            _ = outbox.ready(), if !pending => Event::Ready,
        };
        match event {
            Event::Ping => {
                outbox.hold(PING_FRAME.len());
                batch.frames.push_back(PING_FRAME);
            }
            Event::Idle => {
                let mut deadline = liveness.last_seen() + idle_limit;
                if outbox.reply_waiting() {
                    // The reader waits for room for a reply (a long replay to a slow reader), so
                    // it reads nothing, the client's pongs included: silence proves nothing yet.
                    // Frames wait meanwhile, so the stall deadline guards the socket; the client
                    // is judged again once the reader has caught up with what it sent.
                    deadline = deadline.max(Instant::now() + idle_limit);
                }
                if Instant::now() >= deadline {
                    outbox.close(CloseReason::PongTimeout);
                    return Ok(());
                }
                idle.as_mut().reset(deadline);
            }
            Event::Stall => {
                let deadline = progress + idle_limit;
                if Instant::now() >= deadline {
                    tracing::info!(
                        queued_bytes = outbox.queued_bytes(),
                        mid_frame = batch.mid_frame,
                        "closing a connection whose socket accepted nothing for ping interval + pong timeout"
                    );
                    outbox.close(CloseReason::Stalled);
                    return Ok(());
                }
                stall.as_mut().reset(deadline);
            }
            Event::Wrote(written) => {
                let written = match written {
                    Ok(0) | Err(_) => {
                        outbox.close(CloseReason::Gone);
                        return Err(Abort);
                    }
                    Ok(n) => n,
                };
                batch.mid_frame = consume(&mut batch.frames, written);
                outbox.sent(written);
                progress = Instant::now();
            }
            Event::Ready => {}
        }
    }
}

/// One write of as many queued frames as fit in one syscall: accepts some bytes or none, so
/// dropping it while pending loses nothing.
fn write_some<'a>(
    sink: &'a mut Sink,
    frames: &'a VecDeque<Bytes>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    // The iovec array lives only inside one poll, not in the connection's future; a lone frame
    // (the common case for a subscriber that keeps up) needs none.
    poll_fn(move |cx| {
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
}

/// Writes every frame of `frames` (closing time: no timers to race but the caller's bound).
async fn write_all(
    sink: &mut Sink,
    outbox: &Outbox,
    frames: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !frames.is_empty() {
        let written = write_some(sink, frames).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        consume(frames, written);
        outbox.sent(written);
    }
    Ok(())
}

/// Drops the first `written` bytes of the queued frames; true when that ends inside a frame.
fn consume(frames: &mut VecDeque<Bytes>, mut written: usize) -> bool {
    while written > 0 {
        let Some(front) = frames.front_mut() else {
            return false;
        };
        if written < front.len() {
            front.advance(written);
            return true;
        }
        written -= front.len();
        frames.pop_front();
    }
    false
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
        assert!(consume(&mut frames, 4));
        assert_eq!(frames, [&b"e"[..], b"fgh"]);
        assert!(!consume(&mut frames, 1));
        assert_eq!(frames, [&b"fgh"[..]]);
        assert!(!consume(&mut frames, 3));
        assert!(frames.is_empty());
    }
}
