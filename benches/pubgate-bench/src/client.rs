//! Client connections: TCP from a chosen loopback source address, a hand-written HTTP upgrade
//! (no hyper client per connection: less CPU and memory in the load generator), then
//! fastwebsockets for framing (masking, pongs to the server's pings, close handling).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use fastwebsockets::{Frame, OpCode, Payload, Role, WebSocket};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};

pub type Ws = WebSocket<Prefixed<TcpStream>>;

/// What a subscriber says to its server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// pubgate's (and the bare writer's): `welcome`, `subscribe` -> `subscribed`, deliveries as
    /// `{"type":"message",...,"data":<payload>}`.
    #[default]
    Pubgate,
    /// Nchan's WebSocket subscriber: the channel is the URL's last path segment (the URL ends in
    /// `/sub/`), subscribed once the upgrade completes, deliveries are the published payload.
    Nchan,
}

/// Nanoseconds since the Unix epoch: the clock every process of a run shares.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// `ws://host:port/path` split into its parts.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{url}: only ws:// URLs are supported"))?;
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/ws"),
        };
        let addr: SocketAddr = match hostport.parse() {
            Ok(a) => a,
            Err(_) => {
                let (h, p) = hostport
                    .rsplit_once(':')
                    .ok_or_else(|| format!("{url}: no port"))?;
                let ip: IpAddr = if h == "localhost" {
                    IpAddr::V4(Ipv4Addr::LOCALHOST)
                } else {
                    h.parse()
                        .map_err(|_| format!("{url}: host must be an IP or localhost"))?
                };
                SocketAddr::new(ip, p.parse().map_err(|_| format!("{url}: bad port"))?)
            }
        };
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{url}: pubgate-bench only targets loopback addresses (127.0.0.0/8, ::1)"
            ));
        }
        Ok(Target {
            addr,
            host: hostport.to_string(),
            path: path.to_string(),
        })
    }

    /// The HTTP base of the same server (`http://host:port`), for /metrics.
    pub fn http_addr(&self) -> SocketAddr {
        self.addr
    }
}

/// The source address for connection `i`: 127.0.0.2.. when `sources > 0`.
pub fn source_for(i: usize, sources: usize, target: &Target) -> Option<IpAddr> {
    if sources == 0 || !target.addr.is_ipv4() {
        return None;
    }
    Some(IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % sources) as u8,
    )))
}

/// Opens a TCP connection (bound to `source` when given) and completes the WebSocket upgrade.
pub async fn connect(target: &Target, source: Option<IpAddr>) -> io::Result<Ws> {
    let socket = if target.addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let key = base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        target.path, target.host
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if buf.len() > 16 * 1024 {
            return Err(io::Error::other("upgrade response headers too long"));
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the upgrade",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = std::str::from_utf8(&buf[..end]).unwrap_or("");
    let status = head.split(' ').nth(1).unwrap_or("");
    if status != "101" {
        let line = head.lines().next().unwrap_or("").to_string();
        return Err(io::Error::other(format!("upgrade refused: {line}")));
    }
    let leftover = buf.split_off(end);
    let mut ws = WebSocket::after_handshake(Prefixed::new(leftover, stream), Role::Client);
    ws.set_writev(false);
    Ok(ws)
}

/// Sends one text frame and flushes.
pub async fn send_text(ws: &mut Ws, text: &str) -> Result<(), fastwebsockets::WebSocketError> {
    ws.write_frame(Frame::text(Payload::Borrowed(text.as_bytes())))
        .await?;
    ws.flush().await
}

/// Reads text frames until one satisfies `pred`; other frames are passed to `other`.
pub async fn wait_text(
    ws: &mut Ws,
    limit: Duration,
    mut pred: impl FnMut(&[u8]) -> bool,
) -> Result<(), String> {
    let wait = async {
        loop {
            let frame = ws.read_frame().await.map_err(|e| e.to_string())?;
            match frame.opcode {
                OpCode::Text if pred(&frame.payload) => return Ok(()),
                OpCode::Close => return Err(format!("closed: {}", close_text(&frame.payload))),
                _ => {}
            }
        }
    };
    tokio::time::timeout(limit, wait)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Connects and subscribes to `channel`: pubgate's protocol reads the welcome, subscribes and
/// waits for `subscribed`; Nchan's is subscribed by the upgrade to `<path><channel>`.
pub async fn connect_subscribed(
    target: &Target,
    source: Option<IpAddr>,
    channel: &str,
    limit: Duration,
    protocol: Protocol,
) -> Result<Ws, String> {
    if protocol == Protocol::Nchan {
        let target = Target {
            path: format!("{}{channel}", target.path),
            ..target.clone()
        };
        return tokio::time::timeout(limit, connect(&target, source))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string());
    }
    let mut ws = tokio::time::timeout(limit, connect(target, source))
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
    wait_text(&mut ws, limit, |t| starts_with_type(t, b"welcome")).await?;
    let request = format!(r#"{{"type":"subscribe","channel":"{channel}","id":1}}"#);
    send_text(&mut ws, &request)
        .await
        .map_err(|e| e.to_string())?;
    let mut refused = None;
    wait_text(&mut ws, limit, |t| {
        if starts_with_type(t, b"subscribed") {
            return true;
        }
        if starts_with_type(t, b"error") {
            refused = Some(String::from_utf8_lossy(t).into_owned());
            return true;
        }
        false
    })
    .await?;
    match refused {
        Some(e) => Err(format!("subscribe refused: {e}")),
        None => Ok(ws),
    }
}

/// Whether a server message is `{"type":"<kind>"...`.
pub fn starts_with_type(text: &[u8], kind: &[u8]) -> bool {
    const HEAD: &[u8] = br#"{"type":""#;
    text.starts_with(HEAD)
        && text[HEAD.len()..].starts_with(kind)
        && text.get(HEAD.len() + kind.len()) == Some(&b'"')
}

/// The send stamp of a delivery: pubgate's `{"type":"message",...,"data":{"t":<ns>,...}}`, or
/// the bare payload `{"t":<ns>,...}` as Nchan delivers it.
pub fn delivery_stamp(text: &[u8]) -> Option<u64> {
    const BARE: &[u8] = br#"{"t":"#;
    let at = if text.starts_with(BARE) {
        BARE.len()
    } else if starts_with_type(text, b"message") {
        find(text, br#""data":{"t":"#)? + 12
    } else {
        return None;
    };
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &text[at..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.wrapping_mul(10).wrapping_add((b - b'0') as u64);
        digits += 1;
    }
    (digits > 0).then_some(n)
}

pub fn close_text(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        format!("{code} {}", String::from_utf8_lossy(&payload[2..]))
    } else {
        "no code".into()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A stream that first yields bytes already read past the HTTP response headers.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_found() {
        let msg = br#"{"type":"message","channel":"bench-0","data":{"t":123456,"seq":1}}"#;
        assert_eq!(delivery_stamp(msg), Some(123456));
        assert_eq!(
            delivery_stamp(br#"{"type":"subscribed","channel":"x"}"#),
            None
        );
        assert_eq!(delivery_stamp(br#"{"t":987,"seq":4}"#), Some(987));
        assert_eq!(delivery_stamp(br#"{"t":"x"}"#), None);
        assert!(starts_with_type(
            br#"{"type":"welcome","conn_id":"1"}"#,
            b"welcome"
        ));
        assert!(!starts_with_type(br#"{"type":"welcomed"}"#, b"welcome"));
    }

    #[test]
    fn urls_are_loopback_only() {
        let t = Target::parse("ws://127.0.0.1:8081/ws").unwrap();
        assert_eq!(t.addr.port(), 8081);
        assert_eq!(t.path, "/ws");
        assert!(Target::parse("ws://10.0.0.1:80/ws").is_err());
        assert_eq!(
            Target::parse("ws://localhost:9/x").unwrap().addr.ip(),
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        );
    }
}
