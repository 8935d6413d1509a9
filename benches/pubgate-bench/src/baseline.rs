//! The bare writer: the least a server must do to put the same frames on the same sockets, as a
//! yardstick for what this machine can do in the same run.
//!
//! Plain tokio TCP. After a minimal WebSocket handshake it speaks just enough of the pubgate
//! protocol for the load generator (welcome, subscribe, publish, ping, close). A publish is
//! encoded once into a complete WebSocket frame (`{"type":"message",...}`, byte for byte what
//! pubgate sends) held in one shared `Bytes`; each subscriber gets a reference-counted handle
//! pushed on its queue and its task woken if the queue was empty. The connection's task writes
//! everything queued in one syscall (a single frame as is, several concatenated), so a busy
//! connection batches by itself. No JSON per subscriber, no copies per subscriber, no
//! per-connection buffers while idle. Past `--send-queue` queued frames a connection is dropped
//! as slow.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::cli::BareArgs;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest client frame accepted.
const MAX_FRAME: usize = 1 << 20;

struct Conn {
    id: u64,
    pending: Mutex<Pending>,
    wake: Notify,
}

#[derive(Default)]
struct Pending {
    frames: Vec<Bytes>,
    dead: bool,
}

struct State {
    channels: RwLock<HashMap<String, Vec<Arc<Conn>>>>,
    send_queue: usize,
    next_id: AtomicU64,
}

impl Conn {
    /// Queues a complete frame; wakes the connection's task when its queue was empty.
    fn send(&self, frame: Bytes, limit: usize) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.dead {
            return;
        }
        if p.frames.len() >= limit {
            p.dead = true;
            p.frames = Vec::new();
            self.wake.notify_one();
            return;
        }
        p.frames.push(frame);
        if p.frames.len() == 1 {
            self.wake.notify_one();
        }
    }
}

/// Entry point of `pubgate-bench bare-server`.
pub fn main(args: BareArgs) -> std::process::ExitCode {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder.enable_all().build().expect("runtime");
    match runtime.block_on(serve(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bare-server: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(args: BareArgs) -> Result<(), String> {
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| format!("bind {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    if !addr.ip().is_loopback() {
        return Err("the bare writer listens on loopback addresses only".into());
    }
    println!("bare writer listening on {addr}");
    let state = Arc::new(State {
        channels: RwLock::default(),
        send_queue: args.send_queue.max(1),
        next_id: AtomicU64::new(1),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let _ = connection(stream, state).await;
        });
    }
}

/// Reads the upgrade request; answers plain GETs with 200 (health) and upgrades with 101.
async fn handshake(stream: &mut TcpStream) -> io::Result<bool> {
    let mut req = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(false);
        }
        req.extend_from_slice(&chunk[..n]);
        if req.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if req.len() > 8192 {
            return Ok(false);
        }
    }
    let text = String::from_utf8_lossy(&req);
    let key = text.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    });
    let Some(key) = key else {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")
            .await?;
        return Ok(false);
    };
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    stream.write_all(response.as_bytes()).await?;
    Ok(true)
}

async fn connection(mut stream: TcpStream, state: Arc<State>) -> io::Result<()> {
    if !handshake(&mut stream).await? {
        return Ok(());
    }
    let (mut read, mut write) = stream.into_split();
    let conn = Arc::new(Conn {
        id: state.next_id.fetch_add(1, Ordering::Relaxed),
        pending: Mutex::default(),
        wake: Notify::new(),
    });
    let welcome = format!(
        r#"{{"type":"welcome","conn_id":"{:016x}","node":"bare","ping_interval_ms":0}}"#,
        conn.id
    );
    conn.send(text_frame(welcome.as_bytes()), state.send_queue);
    let mut subscribed: Vec<String> = Vec::new();
    let result = session(&mut read, &mut write, &conn, &state, &mut subscribed).await;
    if !subscribed.is_empty() {
        let mut channels = state.channels.write().unwrap_or_else(|e| e.into_inner());
        for name in &subscribed {
            if let Some(list) = channels.get_mut(name) {
                list.retain(|c| c.id != conn.id);
                if list.is_empty() {
                    channels.remove(name);
                }
            }
        }
    }
    result
}

async fn session(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    conn: &Arc<Conn>,
    state: &State,
    subscribed: &mut Vec<String>,
) -> io::Result<()> {
    let mut inbuf: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            ready = read.readable() => {
                ready?;
                match read_some(read, &mut inbuf) {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e),
                }
                let mut at = 0;
                while let Some((opcode, payload, used)) = parse_frame(&inbuf[at..])? {
                    at += used;
                    match opcode {
                        0x1 => handle_text(&payload, conn, state, subscribed),
                        0x8 => {
                            let echo = close_frame(&payload[..payload.len().min(2)]);
                            conn.send(echo, usize::MAX);
                            flush(write, conn).await?;
                            return Ok(());
                        }
                        0x9 => conn.send(control_frame(0xA, &payload), state.send_queue),
                        _ => {}
                    }
                }
                inbuf.drain(..at);
                if inbuf.is_empty() {
                    inbuf = Vec::new();
                }
            }
            _ = conn.wake.notified() => {
                if !flush(write, conn).await? {
                    return Ok(());
                }
            }
        }
    }
}

/// A non-blocking read appended to `inbuf`. The scratch buffer lives on this (synchronous)
/// function's stack, not in the connection's future, so an idle connection does not keep it.
fn read_some(read: &OwnedReadHalf, inbuf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 4096];
    let n = read.try_read(&mut chunk)?;
    inbuf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

/// Writes everything queued, one syscall per batch; false when the connection is dead.
async fn flush(write: &mut OwnedWriteHalf, conn: &Conn) -> io::Result<bool> {
    loop {
        let frames = {
            let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.dead {
                return Ok(false);
            }
            if p.frames.is_empty() {
                return Ok(true);
            }
            std::mem::take(&mut p.frames)
        };
        if let [one] = frames.as_slice() {
            write.write_all(one).await?;
        } else {
            let mut batch = Vec::with_capacity(frames.iter().map(|f| f.len()).sum());
            for f in &frames {
                batch.extend_from_slice(f);
            }
            write.write_all(&batch).await?;
        }
    }
}

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(default)]
    channel: Option<&'a str>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
}

fn handle_text(payload: &[u8], conn: &Arc<Conn>, state: &State, subscribed: &mut Vec<String>) {
    let reply = |kind: &str, channel: &str, id: Option<&RawValue>| {
        let id = id
            .map(|v| format!(r#","id":{}"#, v.get()))
            .unwrap_or_default();
        let text = format!(r#"{{"type":"{kind}","channel":"{channel}"{id}}}"#);
        conn.send(text_frame(text.as_bytes()), usize::MAX);
    };
    let Ok(req) = serde_json::from_slice::<Request>(payload) else {
        conn.send(
            text_frame(br#"{"type":"error","code":"bad_request","message":"bad request"}"#),
            usize::MAX,
        );
        return;
    };
    let channel = req.channel.unwrap_or("");
    match req.kind {
        "subscribe" => {
            if !subscribed.iter().any(|c| c == channel) {
                subscribed.push(channel.to_string());
                let mut channels = state.channels.write().unwrap_or_else(|e| e.into_inner());
                channels
                    .entry(channel.to_string())
                    .or_default()
                    .push(conn.clone());
            }
            reply("subscribed", channel, req.id);
        }
        "unsubscribe" => {
            subscribed.retain(|c| c != channel);
            let mut channels = state.channels.write().unwrap_or_else(|e| e.into_inner());
            if let Some(list) = channels.get_mut(channel) {
                list.retain(|c| c.id != conn.id);
            }
            reply("unsubscribed", channel, req.id);
        }
        "publish" => {
            let data = req.data.map(|d| d.get()).unwrap_or("null");
            let mut body = Vec::with_capacity(40 + channel.len() + data.len());
            body.extend_from_slice(br#"{"type":"message","channel":""#);
            body.extend_from_slice(channel.as_bytes());
            body.extend_from_slice(br#"","data":"#);
            body.extend_from_slice(data.as_bytes());
            body.push(b'}');
            let frame = text_frame(&body);
            {
                let channels = state.channels.read().unwrap_or_else(|e| e.into_inner());
                if let Some(list) = channels.get(channel) {
                    for sub in list {
                        sub.send(frame.clone(), state.send_queue);
                    }
                }
            }
            if req.id.is_some() {
                reply("published", channel, req.id);
            }
        }
        "ping" => {
            let id = req
                .id
                .map(|v| format!(r#","id":{}"#, v.get()))
                .unwrap_or_default();
            conn.send(
                text_frame(format!(r#"{{"type":"pong"{id}}}"#).as_bytes()),
                usize::MAX,
            );
        }
        _ => conn.send(
            text_frame(br#"{"type":"error","code":"unknown_type","message":"unknown type"}"#),
            usize::MAX,
        ),
    }
}

/// One complete (masked or not) client frame: (opcode, unmasked payload, bytes used).
fn parse_frame(buf: &[u8]) -> io::Result<Option<(u8, Vec<u8>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let opcode = buf[0] & 0x0f;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b) as usize, 10)
        }
        126 | 127 => return Ok(None),
        n => (n as usize, 2),
    };
    if len > MAX_FRAME {
        return Err(io::Error::other("frame too large"));
    }
    let mask = if masked {
        if buf.len() < at + 4 {
            return Ok(None);
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    if buf.len() < at + len {
        return Ok(None);
    }
    let mut payload = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Ok(Some((opcode, payload, at + len)))
}

fn control_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(2 + payload.len());
    f.push(0x80 | opcode);
    f.push(payload.len().min(125) as u8);
    f.extend_from_slice(&payload[..payload.len().min(125)]);
    Bytes::from(f)
}

fn close_frame(code: &[u8]) -> Bytes {
    control_frame(0x8, code)
}

/// An unmasked final text frame.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(payload.len() + 10);
    f.push(0x81);
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n < 65536 => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    Bytes::from(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let f = text_frame(b"hello");
        let (op, payload, used) = parse_frame(&f).unwrap().unwrap();
        assert_eq!((op, payload.as_slice(), used), (1, &b"hello"[..], 7));
        let big = vec![b'x'; 300];
        let f = text_frame(&big);
        assert_eq!(parse_frame(&f).unwrap().unwrap().1.len(), 300);
        assert!(parse_frame(&f[..100]).unwrap().is_none());
        // A masked client frame.
        let mut masked = vec![0x81, 0x85, 1, 2, 3, 4];
        masked.extend(
            b"hello"
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4]),
        );
        assert_eq!(parse_frame(&masked).unwrap().unwrap().1, b"hello");
    }
}
