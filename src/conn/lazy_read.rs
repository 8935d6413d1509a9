//! The WebSocket parser, and its read buffer, only while a connection has bytes to parse.
//!
//! fastwebsockets gives each parser an 8 KiB `BytesMut` for the parser's whole life (no knob in
//! 0.10); for an idle subscriber that buffer would be most of its memory. [`LazyRead`] builds a
//! parser when bytes arrive and drops it once the parser holds none: an idle connection waits in a
//! read into a buffer on the stack of one `poll`, and the bytes that read returns are handed to
//! the next parser first. (Waiting for readiness alone would not do: tokio keeps a socket readable
//! until a read finds it empty, so a new parser would often find nothing and wait, holding its
//! buffer; and a TLS stream has no readiness of its own.)
//!
//! A parser is dropped only between frames, with nothing left in its buffer: [`Source`] counts
//! the bytes it handed the parser, [`LazyRead`] the wire size of each frame the parser returned
//! (the header in its shortest encoding, the mask, the payload), and the parser goes when the two
//! are equal. A client that encodes a length in more bytes than needed makes the second count
//! short, never long, so its parser is kept rather than dropped with bytes in it. A parser whose
//! last read filled all the room it offered is kept too: more bytes are likely waiting, and a
//! client that keeps sending does not pay a new buffer per read.
//!
//! [`LazyRead::read_frame`] is not cancel-safe once a parser exists (fastwebsockets' `read_frame`
//! is not); the reader never races it.

use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use fastwebsockets::{Frame, Role, WebSocketError, WebSocketRead};
use tokio::io::{AsyncRead, ReadBuf};

use super::capped::Capped;

/// Most bytes the wait of an idle connection reads: a pong, a ping, a close or a short command
/// in one read. The buffer is on the stack of one poll, not in the connection.
const WAKE_READ: usize = 512;

/// The read half of a connection, shared by [`LazyRead`] and the parser it builds.
///
/// A parser owns its stream and fastwebsockets cannot give it back, so each parser reads through
/// a reference to this; the lock is never contended (one task reads).
pub struct Source<R>(Mutex<State<R>>);

struct State<R> {
    inner: R,
    /// Read from `inner` and not handed to a parser yet: what hyper read behind the upgrade
    /// request, or what an idle wait read.
    held: Bytes,
    /// Bytes handed to the current parser.
    handed: u64,
    /// The current parser's last read from `inner` filled all the room it offered.
    full: bool,
}

impl<R: AsyncRead + Unpin> Source<R> {
    /// `inner`, with `leftover` (bytes already read from it) to be parsed first.
    pub fn new(inner: R, leftover: Bytes) -> Self {
        // An empty slice of hyper's read buffer still holds the whole buffer.
        let held = if leftover.is_empty() {
            Bytes::new()
        } else {
            leftover
        };
        Source(Mutex::new(State {
            inner,
            held,
            handed: 0,
            full: false,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until bytes are held for a new parser (`false`: end of stream), and starts its
    /// count. Cancel-safe: a read that returns bytes is complete within one poll.
    fn poll_fill(&self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut state = self.lock();
        if state.held.is_empty() {
            let mut buf = [0u8; WAKE_READ];
            let mut read = ReadBuf::new(&mut buf);
            ready!(Pin::new(&mut state.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                return Poll::Ready(Ok(false));
            }
            state.held = Bytes::copy_from_slice(read.filled());
        }
        state.handed = 0;
        state.full = false;
        Poll::Ready(Ok(true))
    }

    /// Whether a parser that returned frames of `parsed` wire bytes holds nothing, and did not
    /// fill its buffer on its last read.
    fn drained(&self, parsed: u64) -> bool {
        let state = self.lock();
        state.handed == parsed && !state.full
    }
}

/// What a parser reads from: the held bytes first, then the stream, counting what it hands out.
struct Handle<'a, R>(&'a Source<R>);

impl<R: AsyncRead + Unpin> AsyncRead for Handle<'_, R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        let state = &mut *state;
        let before = buf.filled().len();
        if state.held.is_empty() {
            let offered = buf.remaining();
            ready!(Pin::new(&mut state.inner).poll_read(cx, buf))?;
            state.full = buf.filled().len() - before == offered;
        } else {
            let n = state.held.len().min(buf.remaining());
            buf.put_slice(&state.held[..n]);
            state.held.advance(n);
            if state.held.is_empty() {
                // Frees what it pointed into (hyper's read buffer, the wait's copy).
                state.held = Bytes::new();
            }
        }
        state.handed += (buf.filled().len() - before) as u64;
        Poll::Ready(Ok(()))
    }
}

type Parser<'a, R> = WebSocketRead<Capped<Handle<'a, R>>>;

/// Reads frames from a [`Source`], holding a parser (and its buffer) only while there are bytes
/// to parse. Auto-close and auto-pong are off: every frame is returned.
pub struct LazyRead<'a, R> {
    source: &'a Source<R>,
    parser: Option<Parser<'a, R>>,
    /// Wire bytes of the frames the current parser returned, counted in the shortest encoding.
    parsed: u64,
    /// Handed to fastwebsockets, which rejects a frame whose length is >= this.
    max_frame: usize,
}

impl<'a, R: AsyncRead + Unpin> LazyRead<'a, R> {
    /// Frames of at most `max_frame_size` payload bytes (a larger one is `FrameTooLarge`).
    pub fn new(source: &'a Source<R>, max_frame_size: usize) -> Self {
        LazyRead {
            source,
            parser: None,
            parsed: 0,
            max_frame: max_frame_size.saturating_add(1),
        }
    }

    /// The next frame, as fastwebsockets' `read_frame` returns it. Not cancel-safe.
    pub async fn read_frame(&mut self) -> Result<Frame<'_>, WebSocketError> {
        if self.parser.is_some() && self.source.drained(self.parsed) {
            self.parser = None;
        }
        if self.parser.is_none() {
            if !poll_fn(|cx| self.source.poll_fill(cx)).await? {
                return Err(WebSocketError::UnexpectedEOF);
            }
            self.parsed = 0;
        }
        let (source, max_frame) = (self.source, self.max_frame);
        let parser = self.parser.get_or_insert_with(|| parser(source, max_frame));
        let mut frame = parser
            .read_frame(&mut |_| async { Ok::<(), Infallible>(()) })
            .await?;
        let mut head = [0u8; 14];
        self.parsed += (frame.fmt_head(&mut head) + frame.payload.len()) as u64;
        Ok(frame)
    }
}

/// A parser with the reader's settings (each new one starts from fastwebsockets' defaults).
fn parser<R: AsyncRead + Unpin>(source: &Source<R>, max_frame: usize) -> Parser<'_, R> {
    let (mut parser, _) = fastwebsockets::after_handshake_split(
        Capped(Handle(source)),
        tokio::io::sink(),
        Role::Server,
    );
    parser.set_auto_close(false);
    parser.set_auto_pong(false);
    parser.set_max_message_size(max_frame);
    parser
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use fastwebsockets::OpCode;
    use tokio::io::AsyncWriteExt;
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];
    const TEXT: u8 = 0x1;
    const BINARY: u8 = 0x2;
    const CONT: u8 = 0x0;
    const CLOSE: u8 = 0x8;
    const PING: u8 = 0x9;

    /// A masked client frame whose length takes `ext` extra bytes: 0, 2 or 8 (the shortest
    /// encoding or a longer one).
    fn encode(fin: bool, opcode: u8, payload: &[u8], ext: usize) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        match ext {
            0 => out.push(0x80 | payload.len() as u8),
            2 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    /// A frame in the shortest length encoding, as clients send them.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let ext = match payload.len() {
            0..126 => 0,
            126..65536 => 2,
            _ => 8,
        };
        encode(fin, opcode, payload, ext)
    }

    type Got = (bool, OpCode, Vec<u8>);

    /// Bounds each read, so lost bytes fail a test instead of hanging it.
    const WAIT: Duration = Duration::from_secs(10);

    async fn next<R: AsyncRead + Unpin>(lazy: &mut LazyRead<'_, R>) -> Got {
        let frame = tokio::time::timeout(WAIT, lazy.read_frame())
            .await
            .expect("a frame within the wait")
            .expect("a frame");
        (frame.fin, frame.opcode, frame.payload.to_vec())
    }

    /// Every frame until the end of the stream, which must come between two frames.
    async fn all<R: AsyncRead + Unpin>(lazy: &mut LazyRead<'_, R>) -> Vec<Got> {
        let mut got = Vec::new();
        loop {
            let read = tokio::time::timeout(WAIT, lazy.read_frame()).await;
            match read.expect("a frame or the end within the wait") {
                Ok(frame) => got.push((frame.fin, frame.opcode, frame.payload.to_vec())),
                Err(WebSocketError::UnexpectedEOF) => return got,
                Err(e) => panic!("after {} frames: {e}", got.len()),
            }
        }
    }

    /// Whether waiting for the next frame would hold no parser.
    fn holds_nothing<R: AsyncRead + Unpin>(lazy: &LazyRead<'_, R>) -> bool {
        lazy.parser.is_none() || lazy.source.drained(lazy.parsed)
    }

    /// A stream that returns `chunks` one read at a time, pending in between (as a socket
    /// returns what arrived between two reads), then its end.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        pending: bool,
    }

    impl Chunks {
        fn new<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Self {
            Chunks {
                chunks: chunks
                    .into_iter()
                    .filter(|c| !c.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect(),
                pending: false,
            }
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if std::mem::take(&mut self.pending) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(front) = self.chunks.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.drain(..n);
                if front.is_empty() {
                    self.chunks.pop_front();
                    self.pending = true;
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// A connected pair: the client's stream and the server's halves.
    async fn tcp() -> (TcpStream, OwnedReadHalf, OwnedWriteHalf) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (read, write) = server.into_split();
        (client, read, write)
    }

    /// Frames of every kind the reader sees: fragments with a ping between them, both longer
    /// length encodings' thresholds, an empty frame, a close.
    fn conversation() -> (Vec<u8>, Vec<Got>) {
        let parts: Vec<(bool, u8, Vec<u8>)> = vec![
            (
                true,
                TEXT,
                br#"{"type":"subscribe","channel":"news"}"#.to_vec(),
            ),
            (true, PING, b"are you there".to_vec()),
            (false, TEXT, b"frag".to_vec()),
            (true, PING, Vec::new()),
            (false, CONT, b"ment".to_vec()),
            (true, CONT, b"ed".to_vec()),
            (true, BINARY, (0..300).map(|i| i as u8).collect()),
            (true, BINARY, vec![7; 125]),
            (true, BINARY, vec![8; 126]),
            (true, CLOSE, b"\x03\xe8bye".to_vec()),
        ];
        let wire = parts
            .iter()
            .flat_map(|(fin, op, payload)| frame(*fin, *op, payload))
            .collect();
        let expected = parts
            .into_iter()
            .map(|(fin, op, payload)| (fin, OpCode::try_from(op).unwrap(), payload))
            .collect();
        (wire, expected)
    }

    #[tokio::test]
    async fn frames_cut_between_reads_at_every_byte_boundary_arrive_whole() {
        let (wire, expected) = conversation();
        for cut in 0..=wire.len() {
            let source = Source::new(Chunks::new([&wire[..cut], &wire[cut..]]), Bytes::new());
            let mut lazy = LazyRead::new(&source, 1 << 20);
            assert_eq!(all(&mut lazy).await, expected, "cut at {cut}");
        }
    }

    #[tokio::test]
    async fn small_frames_cut_twice_at_every_pair_of_boundaries_arrive_whole() {
        let parts = [
            frame(true, TEXT, b"{}"),
            frame(true, PING, b""),
            frame(false, TEXT, b"ab"),
            frame(true, CONT, b"cd"),
        ];
        let wire = parts.concat();
        for a in 0..=wire.len() {
            for b in a..=wire.len() {
                let chunks = Chunks::new([&wire[..a], &wire[a..b], &wire[b..]]);
                let source = Source::new(chunks, Bytes::new());
                let mut lazy = LazyRead::new(&source, 1 << 20);
                let got = all(&mut lazy).await;
                let payloads: Vec<&[u8]> = got.iter().map(|g| &g.2[..]).collect();
                assert_eq!(payloads, [&b"{}"[..], b"", b"ab", b"cd"], "cuts {a}, {b}");
            }
        }
    }

    #[tokio::test]
    async fn pipelined_frames_over_a_socket_keep_the_parser_until_the_last_is_parsed() {
        let (mut client, read, _write) = tcp().await;
        let source = Source::new(read, Bytes::new());
        let mut lazy = LazyRead::new(&source, 1 << 20);
        let (wire, expected) = conversation();
        client.write_all(&wire).await.unwrap();
        for (i, want) in expected.iter().enumerate() {
            assert_eq!(&next(&mut lazy).await, want, "frame {i}");
            // The last frame ends the bytes sent: only then is there nothing left to parse.
            assert_eq!(
                holds_nothing(&lazy),
                i + 1 == expected.len(),
                "after frame {i}"
            );
        }
        // Idle: the next frame's wait holds no parser, and cancelling the wait is safe.
        let wait = tokio::time::timeout(Duration::from_millis(20), lazy.read_frame()).await;
        assert!(wait.is_err(), "nothing more was sent");
        assert!(lazy.parser.is_none());
        client
            .write_all(&frame(true, TEXT, b"later"))
            .await
            .unwrap();
        assert_eq!(next(&mut lazy).await.2, b"later");
        drop(client);
        assert!(matches!(
            lazy.read_frame().await,
            Err(WebSocketError::UnexpectedEOF)
        ));
    }

    #[tokio::test]
    async fn frames_cut_inside_the_header_and_the_payload_over_a_socket_arrive_whole() {
        let (mut client, read, _write) = tcp().await;
        let source = Source::new(read, Bytes::new());
        let mut lazy = LazyRead::new(&source, 1 << 20);
        let (wire, expected) = conversation();
        // Inside the first header, inside its mask, inside its payload, between two frames,
        // inside the 2-byte length of the 300-byte frame.
        let at_300 = wire
            .windows(3)
            .position(|w| w == [0x82, 0xfe, 0x01])
            .unwrap();
        let cuts = [1, 4, 20, 44, at_300 + 3, wire.len()];
        let writer = tokio::spawn(async move {
            let mut at = 0;
            for cut in cuts {
                client.write_all(&wire[at..cut]).await.unwrap();
                at = cut;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            client
        });
        for want in &expected {
            assert_eq!(&next(&mut lazy).await, want);
        }
        let _client = writer.await.unwrap();
        assert!(holds_nothing(&lazy));
    }

    #[tokio::test]
    async fn a_frame_larger_than_the_buffer_is_read_and_its_buffer_then_freed() {
        let (mut client, read, _write) = tcp().await;
        let source = Source::new(read, Bytes::new());
        let mut lazy = LazyRead::new(&source, 1 << 20);
        for len in [8 * 1024, 8 * 1024 + 1, 65535, 65536, 300_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut wire = frame(true, BINARY, &payload);
            wire.extend(frame(true, TEXT, b"after"));
            client.write_all(&wire).await.unwrap();
            assert_eq!(next(&mut lazy).await.2, payload, "{len} bytes");
            assert_eq!(next(&mut lazy).await.2, b"after", "behind {len} bytes");
            let wait = tokio::time::timeout(Duration::from_millis(20), lazy.read_frame()).await;
            assert!(wait.is_err());
            assert!(lazy.parser.is_none(), "idle after {len} bytes");
        }
    }

    #[tokio::test]
    async fn leftover_bytes_are_parsed_first() {
        let (mut client, read, _write) = tcp().await;
        let (wire, expected) = conversation();
        // Read behind the upgrade request: a whole frame and part of the next.
        let (leftover, rest) = wire.split_at(50);
        let source = Source::new(read, Bytes::copy_from_slice(leftover));
        let mut lazy = LazyRead::new(&source, 1 << 20);
        client.write_all(rest).await.unwrap();
        drop(client);
        assert_eq!(all(&mut lazy).await, expected);
        // Leftover only, the stream already ended: every frame, then the end.
        let source = Source::new(Chunks::new([]), Bytes::from(wire));
        let mut lazy = LazyRead::new(&source, 1 << 20);
        assert_eq!(all(&mut lazy).await, expected);
    }

    #[tokio::test]
    async fn a_new_parser_keeps_the_readers_settings() {
        let (mut client, read, _write) = tcp().await;
        let source = Source::new(read, Bytes::new());
        let mut lazy = LazyRead::new(&source, 1000);
        for _ in 0..2 {
            // Pings and closes come back as frames (auto-pong, auto-close off), each time from a
            // new parser.
            client.write_all(&frame(true, PING, b"p")).await.unwrap();
            assert_eq!(next(&mut lazy).await.1, OpCode::Ping);
            client.write_all(&frame(true, CLOSE, b"")).await.unwrap();
            assert_eq!(next(&mut lazy).await.1, OpCode::Close);
            client
                .write_all(&frame(true, BINARY, &[0; 1000]))
                .await
                .unwrap();
            assert_eq!(next(&mut lazy).await.2.len(), 1000);
            assert!(holds_nothing(&lazy));
        }
        client
            .write_all(&frame(true, BINARY, &[0; 1001]))
            .await
            .unwrap();
        assert!(matches!(
            lazy.read_frame().await,
            Err(WebSocketError::FrameTooLarge)
        ));
    }

    #[tokio::test]
    async fn a_longer_length_encoding_keeps_the_parser() {
        let (mut client, read, _write) = tcp().await;
        let source = Source::new(read, Bytes::new());
        let mut lazy = LazyRead::new(&source, 1 << 20);
        // 5 bytes announced in 8 extra length bytes: counted 8 wire bytes short.
        client
            .write_all(&encode(true, BINARY, b"12345", 8))
            .await
            .unwrap();
        assert_eq!(next(&mut lazy).await.2, b"12345");
        assert!(!holds_nothing(&lazy), "the count is short: keep the buffer");
        client.write_all(&frame(true, TEXT, b"next")).await.unwrap();
        assert_eq!(next(&mut lazy).await.2, b"next");
        assert!(lazy.parser.is_some());
    }

    #[tokio::test]
    async fn a_read_that_fills_the_room_offered_keeps_the_parser() {
        let data = [1u8; 100];
        let source = Source::new(&data[..], Bytes::new());
        let mut handle = Handle(&source);
        let mut buf = [0u8; 60];
        let mut read = ReadBuf::new(&mut buf);
        poll_fn(|cx| Pin::new(&mut handle).poll_read(cx, &mut read))
            .await
            .unwrap();
        assert!(!source.drained(60), "60 of 60: more may be waiting");
        let mut buf = [0u8; 60];
        let mut read = ReadBuf::new(&mut buf);
        poll_fn(|cx| Pin::new(&mut handle).poll_read(cx, &mut read))
            .await
            .unwrap();
        assert!(source.drained(100), "40 of 60, all parsed");
        assert!(!source.drained(99));
    }
}
