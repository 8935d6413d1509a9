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
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;
use tokio::time::{sleep_until, Instant, Sleep};
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
/// sends the close frame. A task of its own: see the module doc of `conn`.
///
/// An `async` block rather than an `async fn`, which would hold each argument twice in every
/// connection's writer task.
#[allow(clippy::manual_async_fn)]
pub fn run<S: AsyncWrite + Unpin>(
    mut sink: S,
    outbox: Arc<Outbox>,
    liveness: Arc<Liveness>,
    peer_closed: CancellationToken,
    limits: Limits,
    metrics: Arc<Metrics>,
) -> impl Future<Output = ()> {
    async move {
        let outbox = &*outbox;
        let grace = limits.pong_timeout;
        let mut batch = Batch::default();
        let served = serve(&mut sink, outbox, &liveness, &limits, &mut batch).await;
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
}

/// The writer's deadlines, behind one timer.
///
/// A connection needs three: the next ping, the dead-peer deadline (last heard from + ping
/// interval + pong timeout) and, while frames wait, the stall deadline (last progress + the same
/// limit). One `Sleep` set to the earliest of the first two serves them all: the stall deadline
/// starts at the moment frames are taken, so it is never earlier than the dead-peer deadline,
/// and every deadline only moves later between firings. A timer that fires early is simply set
/// again, so a delivery never touches the timer wheel.
struct Deadlines {
    ping_interval: Duration,
    /// ping interval + pong timeout.
    limit: Duration,
    ping: Instant,
    idle: Instant,
}

/// What a due deadline asks of the writer.
enum Due {
    Ping,
    Close(CloseReason),
}

impl Deadlines {
    fn new(limits: &Limits, now: Instant) -> Self {
        let limit = limits.ping_interval + limits.pong_timeout;
        Deadlines {
            ping_interval: limits.ping_interval,
            limit,
            ping: now + limits.ping_interval,
            idle: now + limit,
        }
    }

    /// Checks every deadline at `now`; returns what is due, and where the timer goes next.
    fn check(
        &mut self,
        now: Instant,
        liveness: &Liveness,
        reply_waiting: bool,
        stall_since: Option<Instant>,
    ) -> (Option<Due>, Instant) {
        let mut due = None;
        if now >= self.idle {
            let mut idle = liveness.last_seen() + self.limit;
            if reply_waiting {
                // The reader waits for room for a reply (a long replay to a slow reader), so it
                // reads nothing, the client's pongs included: silence proves nothing yet.
                // Frames wait meanwhile, so the stall deadline guards the socket; the client
                // is judged again once the reader has caught up with what it sent.
                idle = idle.max(now + self.limit);
            }
            if now >= idle {
                due = Some(Due::Close(CloseReason::PongTimeout));
            }
            self.idle = idle;
        }
        if let Some(since) = stall_since {
            if now >= since + self.limit {
                due = Some(Due::Close(CloseReason::Stalled));
            }
        }
        if due.is_none() && now >= self.ping {
            due = Some(Due::Ping);
            // A writer held up past several periods pings once, not once per missed period.
            self.ping = (self.ping + self.ping_interval).max(now + self.ping_interval / 2);
        }
        let mut next = self.ping.min(self.idle);
        if let Some(since) = stall_since {
            next = next.min(since + self.limit);
        }
        (due, next)
    }
}

/// What woke the writer while it waited.
enum Event {
    Timer,
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
    let mut deadlines = Deadlines::new(limits, Instant::now());
    let mut timer = pin!(sleep_until(deadlines.ping.min(deadlines.idle)));
    // Whether the timer holds this task's waker since it was last set.
    let mut armed = false;
    let mut fired = false;
    // When the frames in the batch started waiting for the socket to accept a byte.
    let mut waiting_since = Instant::now();
    loop {
        if outbox.is_closing() {
            return Ok(());
        }
        // A fired timer is handled before anything else. The wait below is reached on every
        // turn that finds the queue empty, and at the latest when tokio's cooperative budget
        // turns a write away, so a connection that always has frames to write still pings,
        // notices a silent peer and notices a stalled socket.
        if fired {
            fired = false;
            let stall_since = (!batch.frames.is_empty()).then_some(waiting_since);
            let now = Instant::now();
            let (due, next) = deadlines.check(now, liveness, outbox.reply_waiting(), stall_since);
            timer.as_mut().reset(next);
            armed = false;
            match due {
                Some(Due::Ping) => {
                    if batch.frames.is_empty() {
                        waiting_since = now;
                    }
                    outbox.hold(PING_FRAME.len());
                    batch.frames.push_back(PING_FRAME);
                }
                Some(Due::Close(reason)) => {
                    if reason == CloseReason::Stalled {
                        tracing::info!(
                            conn_id = outbox.conn_id(),
                            queued_bytes = outbox.queued_bytes(),
                            mid_frame = batch.mid_frame,
                            "closing a connection whose socket accepted nothing for ping interval + pong timeout"
                        );
                    }
                    outbox.close(reason);
                    return Ok(());
                }
                None => {}
            }
        }
        if batch.frames.is_empty() {
            if batch.frames.capacity() > KEEP_SLOTS {
                batch.frames.shrink_to(KEEP_SLOTS);
            }
            outbox.take(&mut batch.frames);
            if !batch.frames.is_empty() {
                // The common case: the socket takes the frames at once, so they are written
                // without first polling the timer and the close switch (or reading the clock).
                let written = poll_fn(|cx| Poll::Ready(poll_write_some(sink, &batch.frames, cx)));
                if let Poll::Ready(written) = written.await {
                    wrote(written, outbox, batch, &mut waiting_since)?;
                    continue;
                }
                // Frames wait from now: the socket gets the whole limit to take them.
                waiting_since = Instant::now();
            }
        }
        let pending = !batch.frames.is_empty();
        let event = tokio::select! {
            biased;
            _ = poll_fn(|cx| poll_timer(timer.as_mut(), &mut armed, cx)) => Event::Timer,
            written = write_some(sink, &batch.frames), if pending => Event::Wrote(written),
            _ = outbox.closing(), if pending => Event::Ready,
            _ = outbox.ready(), if !pending => Event::Ready,
        };
        match event {
            // Handled at the top of the loop.
            Event::Timer => fired = true,
            Event::Ready => {}
            Event::Wrote(written) => wrote(written, outbox, batch, &mut waiting_since)?,
        }
    }
}

/// Resolves when the timer has fired. The timer is polled (which registers the task's waker,
/// an atomic swap) once after each reset, not on every wake-up: the registered waker stays valid,
/// as a task's waker does not change. That poll is exempt from tokio's cooperative budget, which
/// would otherwise return early without registering the waker.
fn poll_timer(timer: Pin<&mut Sleep>, armed: &mut bool, cx: &mut Context<'_>) -> Poll<()> {
    if timer.is_elapsed() {
        return Poll::Ready(());
    }
    if !*armed {
        *armed = true;
        return pin!(tokio::task::unconstrained(timer)).poll(cx);
    }
    Poll::Pending
}

/// Accounts for one write: bytes accepted leave the batch and the budget; a failed socket
/// closes the connection.
fn wrote(
    written: io::Result<usize>,
    outbox: &Outbox,
    batch: &mut Batch,
    waiting_since: &mut Instant,
) -> Result<(), Abort> {
    match written {
        Ok(0) | Err(_) => {
            outbox.close(CloseReason::Gone);
            Err(Abort)
        }
        Ok(n) => {
            batch.mid_frame = consume(&mut batch.frames, n);
            outbox.sent(n);
            if !batch.frames.is_empty() {
                // The socket made progress: what is left waits from now.
                *waiting_since = Instant::now();
            }
            Ok(())
        }
    }
}

/// One write of as many queued frames as fit in one syscall: accepts some bytes or none, so
/// dropping it while pending loses nothing.
fn write_some<'a, S: AsyncWrite + Unpin>(
    sink: &'a mut S,
    frames: &'a VecDeque<Bytes>,
) -> impl Future<Output = io::Result<usize>> + 'a {
    poll_fn(move |cx| poll_write_some(sink, frames, cx))
}

/// Polls one write of the queued frames. The iovec array lives only inside one poll, not in the
/// connection's future; a lone frame (the common case for a subscriber that keeps up) needs none.
fn poll_write_some<S: AsyncWrite + Unpin>(
    sink: &mut S,
    frames: &VecDeque<Bytes>,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
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
    use tokio::time::sleep;

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
        let metrics = Arc::new(Metrics::new().unwrap());
        // The first frame fills a's socket part way; its client never reads.
        let (stuck, _stuck_peer) = duplex(16);
        let (open, open_peer) = duplex(1 << 16);
        let (a, b) = (outbox(1), outbox(2));
        let (alive_a, alive_b) = (Arc::new(Liveness::new()), Arc::new(Liveness::new()));
        let never = CancellationToken::new();
        let limits = limits();
        let start = Instant::now();
        let writer_a = async {
            run(
                stuck,
                a.clone(),
                alive_a.clone(),
                never.clone(),
                limits.clone(),
                metrics.clone(),
            )
            .await;
            start.elapsed()
        };
        let writer_b = run(
            open,
            b.clone(),
            alive_b.clone(),
            never.clone(),
            limits.clone(),
            metrics.clone(),
        );
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
        let metrics = Arc::new(Metrics::new().unwrap());
        let (sink, peer) = duplex(1 << 16);
        let a = outbox(1);
        let alive = Arc::new(Liveness::new());
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
        let writer = run(
            sink,
            a.clone(),
            alive.clone(),
            never.clone(),
            limits.clone(),
            metrics.clone(),
        );
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

    fn short_limits() -> Limits {
        Limits {
            ping_interval: Duration::from_secs(10),
            pong_timeout: Duration::from_secs(5),
            max_message_size: 1024,
            rate_limit: 0,
            rate_burst: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_timer_serves_the_ping_the_dead_peer_and_the_stall_deadlines() {
        let t0 = Instant::now();
        let liveness = Liveness::new();
        let mut d = Deadlines::new(&short_limits(), t0);
        let s = Duration::from_secs;

        // Nothing due before the first ping; the timer goes to it.
        let (due, next) = d.check(t0 + s(3), &liveness, false, None);
        assert!(due.is_none());
        assert_eq!(next, t0 + s(10));
        // The ping is due, and the next one a period later.
        let (due, next) = d.check(t0 + s(10), &liveness, false, None);
        assert!(matches!(due, Some(Due::Ping)));
        assert_eq!(
            next,
            t0 + s(15),
            "the dead-peer deadline comes before the next ping"
        );

        // The client spoke at 12 s: at 15 s its deadline moves to 12 + 15 = 27 s.
        tokio::time::advance(s(12)).await;
        liveness.touch();
        let (due, next) = d.check(t0 + s(15), &liveness, false, None);
        assert!(due.is_none());
        assert_eq!(next, t0 + s(20));

        // Frames waiting since 16 s make the stall deadline (31 s) part of the schedule.
        let (due, next) = d.check(t0 + s(20), &liveness, false, Some(t0 + s(16)));
        assert!(matches!(due, Some(Due::Ping)));
        assert_eq!(next, t0 + s(27));
        // Silent since 12 s: at 27 s the client is gone.
        let (due, _) = d.check(t0 + s(27), &liveness, false, Some(t0 + s(16)));
        assert!(matches!(due, Some(Due::Close(CloseReason::PongTimeout))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_socket_that_takes_nothing_is_stalled_and_a_waiting_reply_defers_the_peer() {
        let t0 = Instant::now();
        let liveness = Liveness::new();
        let mut d = Deadlines::new(&short_limits(), t0);
        let s = Duration::from_secs;
        // A reply waits for room: at 15 s the silent client is not judged; the deadline moves
        // a whole limit on.
        let (due, next) = d.check(t0 + s(15), &liveness, true, None);
        assert!(
            matches!(due, Some(Due::Ping)),
            "the overdue ping still goes out"
        );
        assert_eq!(next, t0 + s(20));
        // Frames waiting since 1 s and nothing accepted: stalled at 16 s.
        let (due, _) = d.check(t0 + s(16), &liveness, true, Some(t0 + s(1)));
        assert!(matches!(due, Some(Due::Close(CloseReason::Stalled))));
    }

    #[test]
    fn a_writer_held_up_for_several_periods_pings_once() {
        let t0 = Instant::now();
        let liveness = Liveness::new();
        let mut d = Deadlines::new(&short_limits(), t0);
        liveness.touch();
        d.idle = t0 + Duration::from_secs(1000);
        let (due, next) = d.check(t0 + Duration::from_secs(95), &liveness, false, None);
        assert!(matches!(due, Some(Due::Ping)));
        assert_eq!(next, t0 + Duration::from_secs(100));
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
