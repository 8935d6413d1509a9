//! The sending side of one connection as the rest of the node sees it: a bounded queue of
//! complete frames, the connection's byte budget and its close switch.
//!
//! Deliveries are pushed with [`Outbox::try_push`] and never wait: a full queue (too many frames,
//! or too many bytes not yet accepted by the socket) means the client is not keeping up, so the
//! connection is closed as a slow consumer and fan-out to everyone else goes on. Replies use
//! [`Outbox::push`], which waits for room: a client that sends requests without reading replies
//! only stops its own reader. Pongs wait in a small bounded set ([`Outbox::pong`]): each ping
//! gets its pong while at most [`MAX_PENDING_PONGS`] are unanswered, beyond that only the latest
//! ones are kept, so a ping flood against a closed window holds a few pongs, not a backlog
//! (RFC 6455 5.5.3 allows answering only the most recent ping).
//!
//! The byte count covers every frame from the moment it is queued until the socket has accepted
//! its last byte, the writer's batch in flight included, so it is what the node holds for the
//! connection. It is one atomic add per push, read by nobody but the pushes and the metrics
//! scrape (see [`crate::shutdown::Drain::queued_bytes`]).
//!
//! The queue is a `VecDeque` behind a mutex held only to push or to swap the whole queue out, and
//! the writer is woken only when the queue goes from empty to non-empty, so a subscriber that is
//! keeping up costs fan-out one uncontended lock and usually no wake-up. An idle connection's
//! queue allocates nothing.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use bytes::Bytes;
use tokio::sync::Notify;

use super::Member;

/// How much one connection may have queued.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Most frames queued (`PUBGATE_SEND_QUEUE`).
    pub frames: usize,
    /// Most bytes queued and not yet accepted by the socket (`PUBGATE_SEND_BUFFER`).
    pub bytes: usize,
}

/// Why and how the server closes a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The server is shutting down: 1001.
    Shutdown,
    /// The send queue overflowed (frames or bytes): 1008.
    SlowConsumer,
    /// The socket accepted no byte for ping interval + pong timeout while frames waited: counted
    /// as a slow consumer, and the socket is dropped without a close frame (it would not go out).
    Stalled,
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
            CloseReason::SlowConsumer | CloseReason::Stalled => Some((1008, "slow consumer")),
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
            CloseReason::SlowConsumer | CloseReason::Stalled => Some("slow_consumer"),
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

/// Unanswered client pings kept for their pongs; older ones are dropped beyond it. Enough for
/// a client that sends a burst of pings and expects each answered (the Autobahn TestSuite's
/// cases 2.10 and 2.11 send 10), small enough that a flood pins about 2 KiB.
pub const MAX_PENDING_PONGS: usize = 16;

/// What the mutex guards.
#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Payloads of the latest client pings not yet answered, oldest first, at most
    /// [`MAX_PENDING_PONGS`]: kept in place (a flood allocates nothing past the first ping);
    /// the pong frames are built when the writer takes them.
    pongs: VecDeque<PingPayload>,
}

/// A control frame payload (at most 125 bytes).
#[derive(Debug)]
struct PingPayload {
    len: u8,
    bytes: [u8; 125],
}

/// One connection's queue and close switch.
#[derive(Debug)]
pub struct Outbox {
    /// Node-local key of the connection (cheaper to hash than the conn id).
    pub key: u64,
    /// Who this connection is in presence.
    pub member: Member,
    /// Complete frames waiting for the writer, and the coalesced pong.
    queue: Mutex<Queue>,
    budget: Budget,
    /// Bytes queued or taken by the writer and not yet accepted by the socket. Only grows under
    /// the queue lock (so a push's check-then-add is exact); the writer subtracts without it.
    bytes: AtomicUsize,
    /// Wakes the writer when the queue goes from empty to non-empty, and when the connection
    /// starts closing.
    ready: Notify,
    /// Wakes a reply waiting for room once the writer has taken the queue, or on close.
    room: Notify,
    /// Wakes everything waiting in [`Outbox::closing`] (the writer's deadlines, expiry timers).
    closed_wake: Notify,
    /// Set by [`Outbox::close`]; read on every push and writer wake-up.
    closed: AtomicBool,
    /// Set while [`Outbox::push`] waits for room: the reader is then not reading the client.
    waiting: AtomicBool,
    /// The first reason given wins.
    reason: OnceLock<CloseReason>,
}

impl Outbox {
    pub fn new(key: u64, member: Member, budget: Budget) -> Self {
        Outbox {
            key,
            member,
            queue: Mutex::new(Queue::default()),
            budget,
            bytes: AtomicUsize::new(0),
            ready: Notify::new(),
            room: Notify::new(),
            closed_wake: Notify::new(),
            closed: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
            reason: OnceLock::new(),
        }
    }

    pub fn conn_id(&self) -> &str {
        &self.member.conn_id
    }

    /// Queues a frame without waiting; closes the connection when its queue is full.
    pub fn try_push(&self, frame: Bytes) -> Push {
        self.try_push_if(None, frame)
    }

    /// [`Outbox::try_push`] of a delivery for one subscription: queued only if `live` is still
    /// set once the queue is locked. A subscription cleared and then [`fence`](Outbox::fence)d
    /// gets nothing after the fence, even from a fan-out that read `live` before it was cleared.
    pub fn try_push_live(&self, live: &AtomicBool, frame: Bytes) -> Push {
        self.try_push_if(Some(live), frame)
    }

    /// Returns once any push that had already locked the queue has finished.
    pub fn fence(&self) {
        drop(self.lock());
    }

    fn try_push_if(&self, live: Option<&AtomicBool>, frame: Bytes) -> Push {
        if self.closed.load(Ordering::Relaxed) {
            return Push::Closed;
        }
        let queue = self.lock();
        if live.is_some_and(|live| !live.load(Ordering::Relaxed)) {
            return Push::Closed;
        }
        let bytes = self.bytes.load(Ordering::Relaxed);
        if queue.frames.len() >= self.budget.frames || bytes + frame.len() > self.budget.bytes {
            drop(queue);
            self.close(CloseReason::SlowConsumer);
            return Push::Full;
        }
        self.enqueue(queue, frame);
        Push::Queued
    }

    /// Queues a reply, waiting for room; returns false if the connection is closing. A reply
    /// larger than the whole byte budget is let in once nothing else is queued or in flight, so
    /// it cannot wait forever.
    ///
    /// An `async` block rather than an `async fn`, which would hold `frame` twice: this future
    /// sits in the reader's state, so in every connection's task.
    #[allow(clippy::manual_async_fn)]
    pub fn push(&self, frame: Bytes) -> impl Future<Output = bool> + '_ {
        async move {
            /// Clears the waiting flag however the push ends (returned or dropped).
            struct Waiting<'a>(&'a AtomicBool);
            impl Drop for Waiting<'_> {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Relaxed);
                }
            }
            let _waiting = Waiting(&self.waiting);
            loop {
                let room = self.room.notified();
                tokio::pin!(room);
                // Registered before the checks, so room made (or a close) after them is not missed.
                room.as_mut().enable();
                if self.is_closing() {
                    return false;
                }
                {
                    let queue = self.lock();
                    let bytes = self.bytes.load(Ordering::Acquire);
                    let fits = bytes == 0 || bytes + frame.len() <= self.budget.bytes;
                    if queue.frames.len() < self.budget.frames && fits {
                        self.enqueue(queue, frame);
                        return true;
                    }
                }
                self.waiting.store(true, Ordering::Relaxed);
                room.await;
            }
        }
    }

    /// Whether a reply is waiting for room (see [`Outbox::push`]).
    pub fn reply_waiting(&self) -> bool {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Queues the pong for a client ping's `payload` (at most 125 bytes, checked by the
    /// reader). With [`MAX_PENDING_PONGS`] already waiting the oldest is dropped: a client always
    /// gets a pong for its latest ping, and a ping flood holds a few small frames. Never waits.
    pub fn pong(&self, payload: &[u8]) {
        if self.is_closing() {
            return;
        }
        let len = payload.len().min(125);
        let mut ping = PingPayload {
            len: len as u8,
            bytes: [0; 125],
        };
        ping.bytes[..len].copy_from_slice(&payload[..len]);
        let mut queue = self.lock();
        // A pong frame is its payload plus a 2-byte header.
        self.bytes.fetch_add(len + 2, Ordering::Relaxed);
        let wake = queue.frames.is_empty() && queue.pongs.is_empty();
        if queue.pongs.len() >= MAX_PENDING_PONGS {
            if let Some(old) = queue.pongs.pop_front() {
                self.bytes
                    .fetch_sub(old.len as usize + 2, Ordering::Relaxed);
            }
        }
        queue.pongs.push_back(ping);
        drop(queue);
        if wake {
            self.ready.notify_one();
        }
    }

    fn enqueue(&self, mut queue: MutexGuard<'_, Queue>, frame: Bytes) {
        self.bytes.fetch_add(frame.len(), Ordering::Relaxed);
        queue.frames.push_back(frame);
        let first = queue.frames.len() == 1 && queue.pongs.is_empty();
        drop(queue);
        if first {
            self.ready.notify_one();
        }
    }

    /// Records that the socket accepted `n` bytes of frames taken with [`Outbox::take`] (or
    /// counted with [`Outbox::hold`]), making room for replies.
    pub fn sent(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::AcqRel);
        self.room.notify_one();
    }

    /// Counts a frame the writer sends of its own (a ping, the close frame) until it is sent.
    pub fn hold(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes queued or in flight and not yet accepted by the socket.
    pub fn queued_bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Forgets frames that will never be sent (the connection is over): the queue is emptied
    /// and the count reset, so the node's gauge does not report what is no longer held.
    pub fn discard(&self) {
        let mut queue = self.lock();
        queue.frames = VecDeque::new();
        queue.pongs = VecDeque::new();
        self.bytes.store(0, Ordering::Release);
    }

    /// Resolves when frames may be waiting (spurious wake-ups are possible).
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Moves every queued frame into `into` (which must be empty); a pending pong goes first.
    /// Their bytes stay counted until [`Outbox::sent`].
    ///
    /// The two deques trade allocations, so a connection that keeps receiving allocates none;
    /// with nothing queued, only the queue keeps one (an idle connection holds a single one).
    pub fn take(&self, into: &mut VecDeque<Bytes>) {
        debug_assert!(into.is_empty());
        let mut queue = self.lock();
        if queue.frames.is_empty() && queue.pongs.is_empty() {
            if queue.frames.capacity() == 0 {
                std::mem::swap(&mut queue.frames, into);
            }
            *into = VecDeque::new();
            return;
        }
        std::mem::swap(&mut queue.frames, into);
        // Pongs first, in the order of their pings; the set's allocation is freed, since pings
        // are rare and an idle connection should hold nothing.
        for ping in std::mem::take(&mut queue.pongs).iter().rev() {
            into.push_front(super::frame::pong(&ping.bytes[..ping.len as usize]));
        }
        drop(queue);
        if !into.is_empty() {
            self.room.notify_one();
        }
    }

    /// Starts closing the connection; the first reason wins.
    pub fn close(&self, reason: CloseReason) {
        let _ = self.reason.set(reason);
        self.closed.store(true, Ordering::Release);
        self.ready.notify_one();
        self.room.notify_waiters();
        self.closed_wake.notify_waiters();
    }

    /// Whether the connection is closing.
    pub fn is_closing(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Resolves once the connection starts closing.
    pub async fn closing(&self) {
        loop {
            let closed = self.closed_wake.notified();
            tokio::pin!(closed);
            // Registered before the check, so a close right after it is not missed.
            closed.as_mut().enable();
            if self.is_closing() {
                return;
            }
            closed.await;
        }
    }

    /// Why the connection is closing (a shutdown unless a reason was given).
    pub fn close_reason(&self) -> CloseReason {
        self.reason.get().cloned().unwrap_or(CloseReason::Shutdown)
    }

    // A poisoned lock means a panic while pushing or swapping; the deque is still whole.
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn outbox(frames: usize) -> Arc<Outbox> {
        with_budget(frames, usize::MAX / 2)
    }

    fn with_budget(frames: usize, bytes: usize) -> Arc<Outbox> {
        let member = Member {
            conn_id: "c".into(),
            node: "n".into(),
            user: None,
            info: None,
        };
        Arc::new(Outbox::new(1, member, Budget { frames, bytes }))
    }

    /// `f`'s output, or `None` if it is still pending once nothing else can run (paused time:
    /// the 200 ms pass at once).
    async fn within<F: std::future::Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_millis(200), f)
            .await
            .ok()
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_closes_the_connection_as_a_slow_consumer() {
        let o = outbox(2);
        assert_eq!(o.try_push(Bytes::from_static(b"1")), Push::Queued);
        assert_eq!(o.try_push(Bytes::from_static(b"2")), Push::Queued);
        assert_eq!(o.try_push(Bytes::from_static(b"3")), Push::Full);
        assert_eq!(o.close_reason(), CloseReason::SlowConsumer);
        assert_eq!(o.try_push(Bytes::from_static(b"4")), Push::Closed);
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(taken, [&b"1"[..], b"2"]);
    }

    #[test]
    fn the_queue_and_the_writer_trade_one_allocation_and_an_idle_pair_keeps_one() {
        let o = outbox(16);
        let capacity = |o: &Outbox| o.lock().frames.capacity();
        let mut batch = VecDeque::new();
        o.try_push(Bytes::from_static(b"1"));
        let first = capacity(&o);
        assert!(first > 0);
        o.take(&mut batch);
        assert_eq!(
            (batch.len(), capacity(&o)),
            (1, 0),
            "the allocation moved along"
        );
        batch.clear();
        // Nothing queued: the queue gets the allocation back, the writer keeps none.
        o.take(&mut batch);
        assert_eq!((batch.capacity(), capacity(&o)), (0, first));
        // A push while the writer holds frames allocates once; then the two trade.
        o.try_push(Bytes::from_static(b"2"));
        o.take(&mut batch);
        o.try_push(Bytes::from_static(b"3"));
        batch.clear();
        o.take(&mut batch);
        assert_eq!(batch, [&b"3"[..]]);
        assert!(capacity(&o) > 0 && batch.capacity() > 0);
        batch.clear();
        o.take(&mut batch);
        assert_eq!(
            (batch.capacity(), capacity(&o) > 0),
            (0, true),
            "idle: one left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_the_close_does_not_take_the_writers_wake_up() {
        let o = outbox(4);
        let watcher = tokio::spawn({
            let o = o.clone();
            async move { o.closing().await }
        });
        tokio::task::yield_now().await;
        o.try_push(Bytes::from_static(b"x"));
        assert!(
            within(o.ready()).await.is_some(),
            "the writer was not woken"
        );
        assert!(!watcher.is_finished());
        o.close(CloseReason::Shutdown);
        assert!(
            within(watcher).await.is_some(),
            "the watcher missed the close"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_waits_for_room_and_gives_up_on_close() {
        let o = outbox(1);
        assert!(o.push(Bytes::from_static(b"1")).await);
        let blocked = tokio::spawn({
            let o = o.clone();
            async move { o.push(Bytes::from_static(b"2")).await }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(within(blocked).await.map(Result::unwrap), Some(true));
        let blocked = tokio::spawn({
            let o = o.clone();
            async move { o.push(Bytes::from_static(b"3")).await }
        });
        tokio::task::yield_now().await;
        o.close(CloseReason::Shutdown);
        assert_eq!(within(blocked).await.map(Result::unwrap), Some(false));
    }

    #[tokio::test(start_paused = true)]
    async fn the_byte_budget_counts_frames_until_the_socket_accepts_them() {
        let o = with_budget(100, 10);
        assert_eq!(o.try_push(Bytes::from_static(b"123456")), Push::Queued);
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        // Taken by the writer but not yet written: still counted.
        assert_eq!(o.queued_bytes(), 6);
        o.sent(4);
        assert_eq!(o.try_push(Bytes::from_static(b"12345678")), Push::Queued);
        assert_eq!(o.queued_bytes(), 10);
        assert_eq!(o.try_push(Bytes::from_static(b"x")), Push::Full);
        assert_eq!(o.close_reason(), CloseReason::SlowConsumer);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_waits_for_bytes_and_one_larger_than_the_budget_still_goes() {
        let o = with_budget(100, 10);
        assert!(o.push(Bytes::from_static(b"12345678")).await);
        let blocked = tokio::spawn({
            let o = o.clone();
            async move { o.push(Bytes::from_static(b"12345")).await }
        });
        tokio::task::yield_now().await;
        assert!(!blocked.is_finished());
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        o.sent(4);
        assert_eq!(within(blocked).await.map(Result::unwrap), Some(true));
        // 20 bytes never fit in 10: they wait until nothing else is held, then go.
        let big = tokio::spawn({
            let o = o.clone();
            async move { o.push(Bytes::from(vec![b'a'; 20])).await }
        });
        tokio::task::yield_now().await;
        assert!(!big.is_finished());
        taken.clear();
        o.take(&mut taken);
        o.sent(o.queued_bytes());
        assert_eq!(within(big).await.map(Result::unwrap), Some(true));
        assert_eq!(o.queued_bytes(), 20);
    }

    #[tokio::test(start_paused = true)]
    async fn pongs_coalesce_to_the_latest() {
        let o = with_budget(100, 10_000);
        for i in 0..1000u32 {
            o.pong(i.to_string().as_bytes());
        }
        // The last MAX_PENDING_PONGS pings, 984..=999: 3-byte payloads + 2-byte headers.
        assert_eq!(o.queued_bytes(), MAX_PENDING_PONGS * 5);
        assert!(within(o.ready()).await.is_some(), "the writer was woken");
        o.try_push(Bytes::from_static(b"m"));
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        assert_eq!(taken.len(), MAX_PENDING_PONGS + 1);
        assert_eq!(taken[0], &b"\x8a\x03984"[..]);
        assert_eq!(taken[MAX_PENDING_PONGS - 1], &b"\x8a\x03999"[..]);
        assert_eq!(taken[MAX_PENDING_PONGS], &b"m"[..]);
        o.discard();
        assert_eq!(o.queued_bytes(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_pings_gets_every_pong_in_order() {
        let o = with_budget(100, 10_000);
        for i in 0..10u32 {
            o.pong(i.to_string().as_bytes());
        }
        let mut taken = VecDeque::new();
        o.take(&mut taken);
        let expected: Vec<Vec<u8>> = (0..10u32)
            .map(|i| [&[0x8a, 1][..], i.to_string().as_bytes()].concat())
            .collect();
        assert_eq!(taken, expected);
    }
}
