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
use tokio::io::AsyncWrite;
use tokio::time::{sleep, Instant};
use tokio_util::sync::CancellationToken;

use super::{Limits, Liveness};
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

/// The socket failed: drop the connection.
struct Abort;

/// Frames taken from the outbox and not yet fully written.
#[derive(Default)]
struct Batch {
    frames: VecDeque<Bytes>,
    /// The socket accepted part of the first frame (kept for the log of a stalled close).
    mid_frame: bool,
}

/// Writes `outbox`'s frames to `sink` (the socket's write half) until the connection closes, then
/// sends the close frame.
pub async fn run<S: AsyncWrite + Unpin>(
    mut sink: S,
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
async fn serve<S: AsyncWrite + Unpin>(
    sink: &mut S,
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
fn write_some<'a, S: AsyncWrite + Unpin>(
    sink: &'a mut S,
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
async fn write_all<S: AsyncWrite + Unpin>(
    sink: &mut S,
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
    use std::sync::Arc;

    use tokio::io::{duplex, AsyncReadExt, DuplexStream};

    use super::*;
    use crate::wire::protocol::encode_delivery;
    use crate::wire::{Budget, Member, Push};

    /// The defaults: a silent client or a stalled socket is let go after 35 s.
    fn limits() -> Limits {
        Limits {
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            max_message_size: 1 << 16,
            rate_limit: 0,
            rate_burst: 0,
        }
    }

    fn outbox(key: u64) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("c{key}"),
            node: "n".into(),
            user: None,
            info: None,
        };
        let budget = Budget {
            frames: 1000,
            bytes: 1 << 20,
        };
        Arc::new(Outbox::new(key, member, budget))
    }

    /// Everything the client side reads until the server drops the socket, as (opcode,
    /// payload) frames (server frames are unmasked and short here).
    async fn client(mut peer: DuplexStream) -> Vec<(u8, Vec<u8>)> {
        let mut bytes = Vec::new();
        peer.read_to_end(&mut bytes).await.unwrap();
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let len = rest[1] as usize;
            assert!(len < 126, "a short frame");
            frames.push((rest[0] & 0x0f, rest[2..2 + len].to_vec()));
            rest = &rest[2 + len..];
        }
        frames
    }

    fn message(n: u64) -> Vec<u8> {
        format!(r#"{{"type":"message","channel":"ch","data":{n}}}"#).into_bytes()
    }

    fn disconnects(metrics: &Metrics, reason: &str) -> u64 {
        metrics.disconnects.with_label_values(&[reason]).get()
    }

    /// A client that stays alive (it keeps sending) but whose socket accepts nothing is closed
    /// as a slow consumer exactly ping interval + pong timeout after the socket last took a
    /// byte, without a close frame; another subscriber of the same messages keeps receiving.
    /// (Each message is queued to both as the hub's fan-out does: one frame, `try_push`.)
    #[tokio::test(start_paused = true)]
    async fn a_stalled_socket_is_dropped_while_the_others_keep_receiving() {
        let metrics = Metrics::new().unwrap();
        // The first frame fills a's socket part way; its client never reads.
        let (stuck, _stuck_peer) = duplex(16);
        let (open, open_peer) = duplex(1 << 16);
        let (a, b) = (outbox(1), outbox(2));
        let (alive_a, alive_b) = (Liveness::new(), Liveness::new());
        let never = CancellationToken::new();
        let limits = limits();
        let start = Instant::now();
        let writer_a = async {
            run(stuck, &a, &alive_a, &never, &limits, &metrics).await;
            start.elapsed()
        };
        let writer_b = run(open, &b, &alive_b, &never, &limits, &metrics);
        let publisher = async {
            for n in 0..45 {
                // Both clients send something (pongs) every second.
                alive_a.touch();
                alive_b.touch();
                let frame = encode_delivery("ch", n.to_string().as_bytes());
                let pushed = [a.try_push(frame.clone()), b.try_push(frame)];
                // a's queue holds what waits while its socket takes nothing, until it is closed.
                // (At 35 s it depends on which of the two runs first.)
                match n {
                    ..35 => assert_eq!(pushed, [Push::Queued; 2], "message {n}"),
                    35 => assert_eq!(pushed[1], Push::Queued),
                    _ => assert_eq!(pushed, [Push::Closed, Push::Queued], "message {n}"),
                }
                sleep(Duration::from_secs(1)).await;
            }
            b.close(CloseReason::Shutdown);
        };
        let (a_ended, (), (), got) = tokio::join!(writer_a, writer_b, publisher, client(open_peer));
        assert_eq!(a_ended, Duration::from_secs(35));
        assert_eq!(a.close_reason(), CloseReason::Stalled);
        assert_eq!(a.queued_bytes(), 0, "what it held is released");
        assert_eq!(disconnects(&metrics, "slow_consumer"), 1);
        assert_eq!(disconnects(&metrics, "pong_timeout"), 0);
        let texts: Vec<Vec<u8>> = got
            .iter()
            .filter(|f| f.0 == 1)
            .map(|f| f.1.clone())
            .collect();
        assert_eq!(texts, (0..45).map(message).collect::<Vec<_>>());
        assert_eq!(
            got.iter().filter(|f| f.0 == 9).count(),
            1,
            "one ping, at 25 s"
        );
        let mut close = 1001u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"server shutting down");
        assert_eq!(got.last(), Some(&(8, close)));
    }

    /// The server pings every interval; a client that sends nothing for ping interval + pong
    /// timeout after its last frame is closed 1008, while one that keeps sending stays.
    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_closed_after_ping_interval_plus_pong_timeout() {
        let metrics = Metrics::new().unwrap();
        let (sink, peer) = duplex(1 << 16);
        let a = outbox(1);
        let alive = Liveness::new();
        let never = CancellationToken::new();
        let limits = limits();
        let start = Instant::now();
        let closed_at = async {
            a.closing().await;
            start.elapsed()
        };
        let client_sends = async {
            // The client's last frame, at 20 s.
            sleep(Duration::from_secs(20)).await;
            alive.touch();
        };
        let writer = run(sink, &a, &alive, &never, &limits, &metrics);
        let (closed_at, (), (), got) = tokio::join!(closed_at, client_sends, writer, client(peer));
        assert_eq!(closed_at, Duration::from_secs(20 + 35));
        assert_eq!(a.close_reason(), CloseReason::PongTimeout);
        assert_eq!(disconnects(&metrics, "pong_timeout"), 1);
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"pong timeout");
        assert_eq!(
            got,
            [(9, vec![]), (9, vec![]), (8, close)],
            "pings at 25 and 50 s, then the close"
        );
    }

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
