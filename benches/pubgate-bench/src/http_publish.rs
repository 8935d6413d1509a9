//! Publishing to Nchan: `POST /pub/<channel>` over one keep-alive HTTP/1.1 connection per
//! publisher. The requests of one publishing round go out pipelined in one write and their
//! responses are read back in order, as the Redis publisher pipelines a round's PUBLISHes.
//! Hand-written (as the WebSocket upgrade in `client.rs`): a request is a few header lines, and
//! a response is a status line, headers and a `Content-Length` body.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::find;

/// Longest wait for one round's responses.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// One publisher connection to one Nchan instance.
pub struct HttpPublisher {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    /// Requests of the round being built.
    out: Vec<u8>,
    /// Requests in `out`.
    pending: u64,
    /// Requests `send` wrote (or failed to write: `failure`) whose responses `finish` reads.
    awaiting: u64,
    failure: Option<String>,
    /// Bytes read past the last complete response.
    buf: Vec<u8>,
}

/// The outcome of one round.
#[derive(Debug, Default)]
pub struct Round {
    /// Requests answered 2xx (Nchan: 201 with subscribers, 202 without).
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
}

impl HttpPublisher {
    /// Connects to `addr`; later rounds reconnect if the server closed the connection.
    pub async fn connect(addr: SocketAddr) -> Result<HttpPublisher, String> {
        let mut p = HttpPublisher {
            addr,
            stream: None,
            out: Vec::with_capacity(4096),
            pending: 0,
            awaiting: 0,
            failure: None,
            buf: Vec::with_capacity(4096),
        };
        p.reconnect().await?;
        Ok(p)
    }

    async fn reconnect(&mut self) -> Result<(), String> {
        let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(self.addr))
            .await
            .map_err(|_| format!("publisher connect to {} timed out", self.addr))?
            .map_err(|e| format!("publisher connect to {}: {e}", self.addr))?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        self.stream = Some(s);
        self.buf.clear();
        Ok(())
    }

    /// Adds `POST /pub/<channel>` with `body` to the round.
    pub fn push(&mut self, channel: &str, body: &[u8]) {
        self.out.extend_from_slice(
            format!(
                "POST /pub/{channel} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\n\r\n",
                self.addr,
                body.len()
            )
            .as_bytes(),
        );
        self.out.extend_from_slice(body);
        self.pending += 1;
    }

    /// Writes the round's requests. Call `finish` for the outcome: with several instances, every
    /// round is written to all of them before any response is awaited, so no message waits for
    /// another instance's answers before it is sent.
    pub async fn send(&mut self) {
        self.awaiting = std::mem::take(&mut self.pending);
        if self.awaiting == 0 {
            return;
        }
        let result = tokio::time::timeout(ROUND_TIMEOUT, self.write_round()).await;
        self.out.clear();
        self.failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e),
            Err(_) => Some("publish requests timed out".to_string()),
        };
    }

    /// Reads the responses to the round `send` wrote.
    pub async fn finish(&mut self) -> Round {
        let count = std::mem::take(&mut self.awaiting);
        let mut round = Round::default();
        if count == 0 {
            return round;
        }
        let error = match self.failure.take() {
            Some(e) => Some(e),
            None => match tokio::time::timeout(ROUND_TIMEOUT, self.read_round(count, &mut round))
                .await
            {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e),
                Err(_) => Some("publish responses timed out".to_string()),
            },
        };
        if let Some(e) = error {
            // Whatever was not answered counts as failed; the next round starts afresh.
            round.failed = count - round.ok;
            round.first_error.get_or_insert(e);
            self.stream = None;
        }
        round
    }

    async fn write_round(&mut self) -> Result<(), String> {
        if self.stream.is_none() {
            self.reconnect().await?;
        }
        let Some(stream) = self.stream.as_mut() else {
            return Err("not connected".into());
        };
        stream
            .write_all(&self.out)
            .await
            .map_err(|e| format!("publish: {e}"))
    }

    async fn read_round(&mut self, count: u64, round: &mut Round) -> Result<(), String> {
        let Some(stream) = self.stream.as_mut() else {
            return Err("not connected".into());
        };
        let mut answered = 0;
        let mut close_after = false;
        while answered < count {
            let Some(h) = parse_head(&self.buf)? else {
                read_more(stream, &mut self.buf).await?;
                continue;
            };
            let end = h.head_len + h.body_len;
            while self.buf.len() < end {
                read_more(stream, &mut self.buf).await?;
            }
            if (200..300).contains(&h.status) {
                round.ok += 1;
            } else {
                round.failed += 1;
                round.first_error.get_or_insert_with(|| {
                    format!(
                        "HTTP {}: {}",
                        h.status,
                        String::from_utf8_lossy(&self.buf[h.head_len..end]).trim()
                    )
                });
            }
            self.buf.drain(..end);
            answered += 1;
            close_after |= h.close;
        }
        if close_after {
            self.stream = None;
        }
        Ok(())
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    let n = stream
        .read(&mut chunk)
        .await
        .map_err(|e| format!("publish: {e}"))?;
    if n == 0 {
        return Err("publish: the server closed the connection".into());
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The head of one response.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    /// Bytes up to and including the blank line.
    head_len: usize,
    /// `Content-Length`.
    body_len: usize,
    /// `Connection: close`.
    close: bool,
}

/// The head of the response at the start of `buf`, or None while it is incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, String> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err("publish: response head too long".into());
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "publish: response head not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("publish: no status line in {head:?}"))?;
    let mut body = 0;
    let mut close = false;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            body = value
                .parse()
                .map_err(|_| format!("publish: bad Content-Length {value:?}"))?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(format!("publish: unsupported Transfer-Encoding {value}"));
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    Ok(Some(Head {
        status,
        head_len: end + 4,
        body_len: body,
        close,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_parse() {
        let r = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello";
        let head = |status, head_len, body_len, close| Head {
            status,
            head_len,
            body_len,
            close,
        };
        assert_eq!(
            parse_head(r).unwrap(),
            Some(head(201, r.len() - 5, 5, false))
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 201 Created\r\nContent-").unwrap(),
            None
        );
        let c = b"HTTP/1.1 403 Forbidden\r\nconnection: close\r\n\r\n";
        assert_eq!(parse_head(c).unwrap(), Some(head(403, c.len(), 0, true)));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }
}
