//! A raw WebSocket client over TCP, for frames a library will not send: the HTTP upgrade is done
//! by hand, frames are built byte by byte (masked unless asked otherwise) and the server's frames
//! are parsed here, so tests can see close codes, pongs and the end of the TCP connection.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;

use super::WAIT;

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The mask key of every frame this client builds (any key is valid; a fixed one keeps failures
/// reproducible).
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The key of the handshake and the `Sec-WebSocket-Accept` the server must answer with
/// (RFC 6455 section 1.3).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Builds one frame. `rsv` is the 3 reserved bits (0..=7) as they appear in bits 6..4 of the first
/// byte; `masked` false builds an unmasked frame (which a server must refuse).
pub fn frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(((fin as u8) << 7) | ((rsv & 7) << 4) | (opcode & 0x0f));
    let mask_bit = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as usize {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame: what a well-behaved client sends.
pub fn masked(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    frame(fin, 0, opcode, payload, true)
}

/// The payload of a close frame: the code then the reason.
pub fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// One frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The close code of a close frame (the first 2 bytes of its payload), if it has one.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.payload).expect("server text frames are UTF-8")
    }
}

/// Why reading a frame stopped without one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The server closed the TCP connection (EOF, or a reset).
    Closed(String),
    /// Nothing (complete) arrived in time.
    Timeout,
}

/// How a connection ended, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// A close frame arrived, with this code (None: a close frame without payload).
    Frame(Option<u16>),
    /// The TCP connection ended without a close frame.
    NoFrame,
}

impl Closed {
    pub fn code(&self) -> Option<u16> {
        match self {
            Closed::Frame(c) => *c,
            Closed::NoFrame => None,
        }
    }
}

/// A WebSocket client over a plain TCP stream, after a hand-made upgrade.
pub struct RawClient {
    pub stream: TcpStream,
    /// Bytes read from the socket but not yet parsed.
    buf: Vec<u8>,
    /// The welcome message, when [`RawClient::connect`] read it.
    pub welcome: Value,
}

/// The upgrade request this client sends.
pub fn upgrade_request(addr: SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl RawClient {
    /// Connects, upgrades and reads the welcome.
    pub async fn connect(addr: SocketAddr) -> RawClient {
        Self::connect_with(TcpSocket::new_v4().unwrap(), addr).await
    }

    /// Connects with a small receive buffer (for a client that stops reading), upgrades and
    /// reads the welcome.
    pub async fn connect_small_buffer(addr: SocketAddr, recv_buffer: u32) -> RawClient {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(recv_buffer).unwrap();
        Self::connect_with(socket, addr).await
    }

    /// Connects and sends `behind` in the same write as the upgrade request, before any
    /// answer (so the server reads them together); checks the 101 and returns without reading
    /// further (a pong may come before the welcome).
    pub async fn upgrade_sending(addr: SocketAddr, behind: &[u8]) -> RawClient {
        let stream = tokio::time::timeout(WAIT, TcpStream::connect(addr))
            .await
            .expect("connect within the wait")
            .expect("connect");
        Self::upgrade(stream, addr, behind).await
    }

    async fn connect_with(socket: TcpSocket, addr: SocketAddr) -> RawClient {
        let stream = tokio::time::timeout(WAIT, socket.connect(addr))
            .await
            .expect("connect within the wait")
            .expect("connect");
        let mut client = Self::upgrade(stream, addr, &[]).await;
        let welcome = client.recv_json().await;
        assert_eq!(welcome["type"], "welcome", "first message is the welcome");
        client.welcome = welcome;
        client
    }

    /// Connects a fresh client, sends `frames` in order and returns how the server ended the
    /// connection ([`RawClient::expect_close`]). Write errors are ignored: the server may close
    /// before the last frame is sent.
    pub async fn close_after(addr: SocketAddr, frames: &[Vec<u8>]) -> Closed {
        let mut raw = Self::connect(addr).await;
        for f in frames {
            if raw.send_raw(f).await.is_err() {
                break;
            }
        }
        raw.expect_close().await
    }

    /// Sends the upgrade request (and `behind` in the same write) and checks the 101 answer;
    /// keeps what follows it buffered.
    async fn upgrade(mut stream: TcpStream, addr: SocketAddr, behind: &[u8]) -> RawClient {
        let mut request = upgrade_request(addr).into_bytes();
        request.extend_from_slice(behind);
        stream.write_all(&request).await.unwrap();
        let mut buf = Vec::new();
        let head_end = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    return i + 4;
                }
                let mut chunk = [0u8; 4096];
                let n = stream
                    .read(&mut chunk)
                    .await
                    .expect("read the upgrade answer");
                assert!(n > 0, "connection closed during the upgrade: {buf:?}");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("upgrade answer within the wait");
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "expected 101 Switching Protocols, got {head:?}"
        );
        let accept = header(&head, "sec-websocket-accept");
        assert_eq!(
            accept.as_deref(),
            Some(ACCEPT),
            "Sec-WebSocket-Accept in {head:?}"
        );
        buf.drain(..head_end);
        RawClient {
            stream,
            buf,
            welcome: Value::Null,
        }
    }

    pub fn conn_id(&self) -> &str {
        self.welcome["conn_id"].as_str().unwrap()
    }

    /// Writes bytes as they are. Errors (the server may already have closed) are returned.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Writes one masked frame; panics if the socket refuses it.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.send_raw(&masked(fin, opcode, payload))
            .await
            .expect("write a frame");
    }

    /// Sends one masked text frame.
    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    /// Sends a JSON request as one text frame.
    pub async fn send_json(&mut self, msg: &Value) {
        self.send_text(&msg.to_string()).await;
    }

    /// The next frame within `wait`, or why there is none.
    pub async fn next_frame_within(&mut self, wait: Duration) -> Result<Frame, End> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(End::Timeout),
                Ok(Ok(0)) => return Err(End::Closed("EOF".into())),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(End::Closed(e.to_string())),
            }
        }
    }

    /// The next frame; panics if none arrives within [`WAIT`].
    pub async fn next_frame(&mut self) -> Frame {
        match self.next_frame_within(WAIT).await {
            Ok(f) => f,
            Err(e) => panic!("expected a frame, got {e:?}"),
        }
    }

    /// The next text message as JSON, skipping pings and pongs; panics on anything else.
    pub async fn recv_json(&mut self) -> Value {
        self.recv_json_within(WAIT)
            .await
            .expect("a text message within the wait")
    }

    /// The next text message as JSON within `wait` (None on timeout), skipping pings and pongs.
    pub async fn recv_json_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame_within(left).await {
                Err(End::Timeout) => return None,
                Err(e) => panic!("expected a text message, the connection ended: {e:?}"),
                Ok(f) if f.opcode == OP_PING || f.opcode == OP_PONG => continue,
                Ok(f) if f.opcode == OP_TEXT && f.fin => {
                    return Some(serde_json::from_str(f.text()).expect("server sends JSON"))
                }
                Ok(f) => panic!("expected a text message, got {f:?} ({:?})", f.close_code()),
            }
        }
    }

    /// Sends a JSON request and returns the next JSON message.
    pub async fn request(&mut self, msg: &Value) -> Value {
        self.send_json(msg).await;
        self.recv_json().await
    }

    /// Reads until the server closes, within `wait`: skips data and control frames, and returns
    /// the close frame's code. After a close frame, answers it with a close (like a real client)
    /// and checks that the server ends the TCP connection within [`WAIT`] without sending a
    /// second close frame or anything else. Panics if nothing ends the connection in time.
    pub async fn expect_close_within(&mut self, wait: Duration) -> Closed {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame_within(left).await {
                Err(End::Timeout) => {
                    panic!("the server did not close the connection within {wait:?}")
                }
                Err(End::Closed(_)) => return Closed::NoFrame,
                Ok(f) if f.opcode == OP_CLOSE => {
                    let code = f.close_code();
                    // The echo may fail if the server already dropped the socket: fine.
                    let echo = match code {
                        Some(c) => close_payload(c, ""),
                        None => Vec::new(),
                    };
                    let _ = self.send_raw(&masked(true, OP_CLOSE, &echo)).await;
                    self.expect_eof_within(WAIT).await;
                    return Closed::Frame(code);
                }
                Ok(_) => continue,
            }
        }
    }

    /// [`RawClient::expect_close_within`] with [`WAIT`].
    pub async fn expect_close(&mut self) -> Closed {
        self.expect_close_within(WAIT).await
    }

    /// Expects a close frame with exactly this code (and then the end of the TCP connection).
    pub async fn expect_close_code(&mut self, expected: u16) {
        let closed = self.expect_close().await;
        assert_eq!(
            closed,
            Closed::Frame(Some(expected)),
            "expected a close frame with code {expected}"
        );
    }

    /// Expects the TCP connection to end within `wait`, with nothing but pings/pongs before
    /// (in particular no second close frame).
    pub async fn expect_eof_within(&mut self, wait: Duration) {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_frame_within(left).await {
                Err(End::Closed(_)) => return,
                Err(End::Timeout) => {
                    panic!(
                        "the server did not end the TCP connection within {wait:?} after a close"
                    )
                }
                Ok(f) if f.opcode == OP_PING || f.opcode == OP_PONG => continue,
                Ok(f) => panic!(
                    "a frame after the close frame: {f:?} (close code {:?})",
                    f.close_code()
                ),
            }
        }
    }
}

/// Parses one frame from the front of `buf`; None when it is not complete yet.
pub fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 7;
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let mut pos = 2;
    let len = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            pos = 4;
            u16::from_be_bytes([buf[2], buf[3]]) as usize
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            pos = 10;
            let len = u64::from_be_bytes(buf[2..10].try_into().unwrap());
            assert!(
                len < 64 * 1024 * 1024,
                "server frame length {len} is absurd"
            );
            len as usize
        }
        n => n as usize,
    };
    let mut key = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return None;
        }
        key.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    if buf.len() < pos + len {
        return None;
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some((
        Frame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        },
        pos + len,
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The value of a header in a response head (name case-insensitive).
pub fn header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// An HTTP response read without waiting for the server to close (the connection may stay open).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Sends a raw request and reads one response: the head, then a `Content-Length` or chunked body
/// (or the rest until EOF when it has neither). Panics unless it all arrives within `wait`.
pub async fn http_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> Response {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.unwrap();
    read_response(&mut stream, wait).await
}

/// Reads one HTTP response from `stream` (see [`http_exchange`]).
pub async fn read_response(stream: &mut TcpStream, wait: Duration) -> Response {
    let mut buf = Vec::new();
    let deadline = Instant::now() + wait;
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
        if read_more(stream, &mut buf, deadline, wait).await == 0 {
            panic!(
                "connection closed before a complete response head: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {head:?}"));
    let body_bytes: Vec<u8> = if status == 101 || status == 204 || status == 304 {
        Vec::new()
    } else if let Some(len) = header(&head, "content-length") {
        let len: usize = len.parse().expect("numeric content-length");
        while buf.len() < head_end + len {
            if read_more(stream, &mut buf, deadline, wait).await == 0 {
                panic!("connection closed inside the body");
            }
        }
        buf[head_end..head_end + len].to_vec()
    } else if header(&head, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            if let Some(body) = dechunk(&buf[head_end..]) {
                break body;
            }
            if read_more(stream, &mut buf, deadline, wait).await == 0 {
                panic!("connection closed inside a chunked body");
            }
        }
    } else {
        while read_more(stream, &mut buf, deadline, wait).await > 0 {}
        buf[head_end..].to_vec()
    };
    Response {
        status,
        head,
        body: String::from_utf8_lossy(&body_bytes).into_owned(),
    }
}

/// Reads what is there into `buf`; 0 at EOF (or on a reset). Panics at the deadline.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    wait: Duration,
) -> usize {
    let mut chunk = vec![0u8; 8192];
    let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "no complete HTTP response within {wait:?}; so far: {:?}",
                String::from_utf8_lossy(buf)
            )
        })
        .unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// The body of a complete chunked encoding, or None if more bytes are needed.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            // Trailers end with an empty line.
            find(data, b"\r\n")?;
            return Some(body);
        }
        if data.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}
