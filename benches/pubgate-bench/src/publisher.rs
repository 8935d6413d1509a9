//! The publisher: stamped messages at a set rate, round-robin over the channels, through Redis
//! `PUBLISH <prefix><channel>`, WebSocket `publish` requests, or (Nchan) HTTP `POST /pub/<channel>`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode, Payload, WebSocketWrite};
use tokio::io::WriteHalf;
use tokio::net::TcpStream;

use pubgate::redis_commands::CommandConnection;

use crate::client::{self, now_ns, starts_with_type, Prefixed, Target};
use crate::http_publish::HttpPublisher;
use crate::ipc::channel_name;

/// Longest pause between two publishing rounds.
const TICK: Duration = Duration::from_millis(1);
/// Most messages sent in one round (a publisher that falls behind catches up in bursts).
const MAX_BURST: u64 = 2000;

type WsWrite = WebSocketWrite<WriteHalf<Prefixed<TcpStream>>>;

/// Counts of one publishing step.
#[derive(Debug, Clone, Default)]
pub struct Published {
    pub sent: u64,
    pub errors: u64,
    /// Messages sent per channel index.
    pub per_channel: Vec<u64>,
    pub first_error: Option<String>,
}

#[derive(Default)]
pub struct Acks {
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

pub enum Publisher {
    Redis {
        /// One Redis, or a cluster (a pipeline is split per slot by pubgate's command connection).
        conn: CommandConnection,
        prefix: String,
        /// History on: `FCALL pubgate_publish` instead of `PUBLISH`.
        fcall: bool,
        /// Cluster: `SPUBLISH` (sharded pub/sub) instead of `PUBLISH`.
        sharded: bool,
    },
    Ws {
        conns: Vec<WsWrite>,
        /// Every message goes to every connection (independent bare-writer processes) rather
        /// than to one of them (gateway nodes share a broker).
        broadcast: bool,
        acks: Arc<Acks>,
    },
    /// Nchan: keep-alive connections to every instance, messages round-robin over them (instances
    /// on one Redis forward to each other, as pubgate's nodes do).
    Http { conns: Vec<HttpPublisher> },
}

impl Publisher {
    pub async fn redis(url: &str, prefix: &str, fcall: bool) -> Result<Publisher, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_async_connection(),
        )
        .await
        .map_err(|_| "redis connect timed out".to_string())?
        .map_err(|e| e.to_string())?;
        Ok(Publisher::Redis {
            conn: CommandConnection::Single(conn),
            prefix: prefix.to_string(),
            fcall,
            sharded: false,
        })
    }

    /// Publishes on a Redis Cluster known by its comma-separated seed URLs.
    pub async fn redis_cluster(
        seeds: &str,
        prefix: &str,
        fcall: bool,
    ) -> Result<Publisher, String> {
        let seeds: Vec<&str> = seeds
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let client = redis::cluster::ClusterClient::new(seeds).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_async_connection())
            .await
            .map_err(|_| "redis cluster connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        Ok(Publisher::Redis {
            conn: CommandConnection::Cluster(conn),
            prefix: prefix.to_string(),
            fcall,
            sharded: true,
        })
    }

    /// `count` connections spread over `urls` (at least one per url when `broadcast`).
    pub async fn ws(urls: &[String], count: usize, broadcast: bool) -> Result<Publisher, String> {
        let n = if broadcast { urls.len() } else { count.max(1) };
        let acks = Arc::new(Acks::default());
        let mut conns = Vec::new();
        for i in 0..n {
            let target = Target::parse(&urls[i % urls.len()])?;
            let mut ws =
                tokio::time::timeout(Duration::from_secs(10), client::connect(&target, None))
                    .await
                    .map_err(|_| "publisher connect timed out".to_string())?
                    .map_err(|e| format!("publisher connect: {e}"))?;
            client::wait_text(&mut ws, Duration::from_secs(10), |t| {
                starts_with_type(t, b"welcome")
            })
            .await?;
            let (mut read, write) = ws.split(tokio::io::split);
            read.set_auto_pong(false);
            read.set_auto_close(false);
            let acks = acks.clone();
            tokio::spawn(async move {
                let mut ignore = |_| async { Ok::<(), std::convert::Infallible>(()) };
                while let Ok(frame) = read.read_frame(&mut ignore).await {
                    match frame.opcode {
                        OpCode::Text if starts_with_type(&frame.payload, b"error") => {
                            acks.errors.fetch_add(1, Ordering::Relaxed);
                            let mut first =
                                acks.first_error.lock().unwrap_or_else(|e| e.into_inner());
                            first.get_or_insert_with(|| {
                                String::from_utf8_lossy(&frame.payload).into_owned()
                            });
                        }
                        OpCode::Close => break,
                        _ => {}
                    }
                }
            });
            conns.push(write);
        }
        Ok(Publisher::Ws {
            conns,
            broadcast,
            acks,
        })
    }

    /// Nchan's publisher locations on `addrs`, `per_addr` connections each.
    pub async fn http(addrs: &[SocketAddr], per_addr: usize) -> Result<Publisher, String> {
        let mut conns = Vec::new();
        for _ in 0..per_addr.max(1) {
            for &a in addrs {
                conns.push(HttpPublisher::connect(a).await?);
            }
        }
        Ok(Publisher::Http { conns })
    }

    pub fn via(&self) -> &'static str {
        match self {
            Publisher::Redis { .. } => "redis",
            Publisher::Ws { .. } => "ws",
            Publisher::Http { .. } => "http",
        }
    }

    /// Publishes at `rate` messages/s for `duration`, round-robin over `channels` channels.
    pub async fn run(
        &mut self,
        rate: f64,
        duration: Duration,
        channels: usize,
        base: &str,
        payload_size: usize,
    ) -> Published {
        let channels = channels.max(1);
        let names: Vec<String> = (0..channels).map(|c| channel_name(base, c)).collect();
        let mut out = Published {
            per_channel: vec![0; channels],
            ..Published::default()
        };
        if let Publisher::Ws { acks, .. } = self {
            acks.errors.store(0, Ordering::Relaxed);
            *acks.first_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        let start = Instant::now();
        let mut seq: u64 = 0;
        let mut next_conn = 0usize;
        let mut data = String::with_capacity(64 + payload_size);
        let mut text = String::with_capacity(128 + payload_size);
        while start.elapsed() < duration {
            let due = ((start.elapsed().as_secs_f64() * rate) as u64).saturating_sub(seq);
            let burst = due.min(MAX_BURST);
            if burst > 0 {
                match self {
                    Publisher::Redis {
                        conn,
                        prefix,
                        fcall,
                        sharded,
                    } => {
                        let mut pipe = redis::pipe();
                        for _ in 0..burst {
                            let c = (seq as usize) % channels;
                            stamp(&mut data, seq, payload_size);
                            let key = format!("{prefix}{}", names[c]);
                            if *fcall {
                                pipe.cmd("FCALL")
                                    .arg("pubgate_publish")
                                    .arg(1)
                                    .arg(key)
                                    .arg(data.as_bytes())
                                    .ignore();
                            } else {
                                let cmd = if *sharded { "SPUBLISH" } else { "PUBLISH" };
                                pipe.cmd(cmd).arg(key).arg(data.as_bytes()).ignore();
                            }
                            out.per_channel[c] += 1;
                            seq += 1;
                        }
                        let sent = tokio::time::timeout(
                            Duration::from_secs(5),
                            pipe.query_async::<()>(conn),
                        )
                        .await;
                        match sent {
                            Ok(Ok(())) => out.sent += burst,
                            Ok(Err(e)) => {
                                out.errors += burst;
                                out.first_error.get_or_insert(e.to_string());
                            }
                            Err(_) => {
                                out.errors += burst;
                                out.first_error.get_or_insert("PUBLISH timed out".into());
                            }
                        }
                    }
                    Publisher::Ws {
                        conns, broadcast, ..
                    } => {
                        for _ in 0..burst {
                            let c = (seq as usize) % channels;
                            stamp(&mut data, seq, payload_size);
                            text.clear();
                            let _ = write!(
                                text,
                                r#"{{"type":"publish","channel":"{}","data":{data}}}"#,
                                names[c]
                            );
                            let mut ok = true;
                            let range = if *broadcast {
                                0..conns.len()
                            } else {
                                next_conn = (next_conn + 1) % conns.len();
                                next_conn..next_conn + 1
                            };
                            for ws in &mut conns[range] {
                                let frame = Frame::new(
                                    true,
                                    OpCode::Text,
                                    None,
                                    Payload::Borrowed(text.as_bytes()),
                                );
                                if let Err(e) = ws.write_frame(frame).await {
                                    ok = false;
                                    out.first_error.get_or_insert(e.to_string());
                                }
                            }
                            out.per_channel[c] += 1;
                            if ok {
                                out.sent += 1;
                            } else {
                                out.errors += 1;
                            }
                            seq += 1;
                        }
                        for ws in conns.iter_mut() {
                            let _ = ws.flush().await;
                        }
                    }
                    Publisher::Http { conns } => {
                        for _ in 0..burst {
                            let c = (seq as usize) % channels;
                            stamp(&mut data, seq, payload_size);
                            next_conn = (next_conn + 1) % conns.len();
                            conns[next_conn].push(&names[c], data.as_bytes());
                            out.per_channel[c] += 1;
                            seq += 1;
                        }
                        for conn in conns.iter_mut() {
                            conn.send().await;
                        }
                        for conn in conns.iter_mut() {
                            let round = conn.finish().await;
                            out.sent += round.ok;
                            out.errors += round.failed;
                            if let Some(e) = round.first_error {
                                out.first_error.get_or_insert(e);
                            }
                        }
                    }
                }
            }
            tokio::time::sleep(TICK).await;
        }
        if let Publisher::Ws { acks, .. } = self {
            // Replies to the last publishes, briefly.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let errors = acks.errors.load(Ordering::Relaxed);
            out.errors += errors;
            out.sent = out.sent.saturating_sub(errors);
            if let Some(e) = acks
                .first_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
            {
                out.first_error.get_or_insert(e);
            }
        }
        out
    }
}

/// `{"t":<ns>,"seq":n}` padded to `size` bytes with a `pad` string.
fn stamp(out: &mut String, seq: u64, size: usize) {
    out.clear();
    let _ = write!(out, r#"{{"t":{},"seq":{seq}"#, now_ns());
    let rest = size.saturating_sub(out.len() + 10);
    if rest > 0 {
        out.push_str(r#","pad":""#);
        out.extend(std::iter::repeat_n('x', rest));
        out.push('"');
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_json_of_the_asked_size() {
        let mut s = String::new();
        stamp(&mut s, 7, 0);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["seq"], 7);
        stamp(&mut s, 7, 200);
        assert!(s.len() >= 199 && s.len() <= 202, "{}", s.len());
        serde_json::from_str::<serde_json::Value>(&s).unwrap();
    }
}
