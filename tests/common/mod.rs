//! Shared helpers for the integration tests: real nodes started in-process on 127.0.0.1:0 and a
//! WebSocket client that is not the server's implementation (tokio-tungstenite).
//!
//! Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod cluster;
pub mod raw;
pub mod redis;
pub mod tokens;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pubgate::{Config, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long a test waits for something that should happen promptly.
pub const WAIT: Duration = Duration::from_secs(5);

/// A configuration for tests: loopback, port 0, a node id, short intervals.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        node_id: Some(format!("test-{:08x}", rand_u32())),
        shutdown_timeout: Duration::from_secs(5),
        broker_probe_interval: Duration::from_millis(500),
        presence_ttl: Duration::from_secs(3),
        // The suites that predate v1.1 send faster than the default 100/s; tests/limits.rs sets
        // the rate limit it exercises.
        rate_limit: 0,
        ..Config::default()
    }
}

pub fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    h.finish() as u32
}

/// A node running in this test process.
pub struct TestNode {
    pub addr: SocketAddr,
    /// The internal listener (`PUBGATE_INTERNAL_LISTEN`), when the config sets one.
    pub internal: Option<SocketAddr>,
    pub node_id: String,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), pubgate::Error>>>,
}

/// Binds a node and runs it in a task; the node stops when `stop` is called or on drop.
pub async fn start_node(config: Config) -> TestNode {
    let node_id = config.node_id.clone().expect("test configs set a node id");
    let server = Server::bind(config).await.expect("node binds");
    let addr = server.local_addr();
    let internal = server.internal_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    TestNode {
        addr,
        internal,
        node_id,
        stop: Some(tx),
        handle: Some(handle),
    }
}

impl TestNode {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Triggers the graceful shutdown without waiting for it.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Triggers the graceful shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), pubgate::Error> {
        self.signal_stop();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("node stops within 30 s")
            .expect("node task did not panic")
    }

    /// A plain HTTP/1.1 GET; returns the status code and the body.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        http_get(self.addr, path).await
    }

    /// The value of one sample of `/metrics`, e.g. `pubgate_connections` or
    /// `pubgate_messages_dropped_total{reason="slow_consumer"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = http_get(self.internal.unwrap_or(self.addr), "/metrics").await;
        metric_value(&body, sample)
    }

    /// Connects a client and reads its welcome.
    pub async fn client(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

/// Finds one sample in Prometheus text output.
pub fn metric_value(body: &str, sample: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse().ok())?
    })
}

pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Sends a raw HTTP request and reads the response until the server closes.
pub async fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf))
        .await
        .expect("response within the wait")
        .unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tokio-tungstenite client that speaks the pubgate protocol.
pub struct Client {
    pub ws: Ws,
    pub welcome: Value,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::connect_request(url.into_client_request().unwrap()).await
    }

    /// Connects with `Authorization: Bearer <token>`.
    pub async fn connect_bearer(url: &str, token: &str) -> Client {
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        Self::connect_request(request).await
    }

    /// Connects with a prepared request (extra headers) and reads the welcome.
    pub async fn connect_request(request: Request) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect within the wait")
            .expect("upgrade succeeds");
        Self::welcomed(ws).await
    }

    /// Wraps an open WebSocket and reads the welcome.
    pub async fn welcomed(ws: Ws) -> Client {
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        let welcome = client.recv().await;
        assert_eq!(welcome["type"], "welcome", "first message is the welcome");
        client.welcome = welcome;
        client
    }

    pub fn conn_id(&self) -> &str {
        self.welcome["conn_id"].as_str().unwrap()
    }

    pub fn node(&self) -> &str {
        self.welcome["node"].as_str().unwrap()
    }

    pub async fn send(&mut self, msg: Value) {
        self.ws.send(Message::text(msg.to_string())).await.unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text.to_owned())).await.unwrap();
    }

    /// The next JSON message (pings and pongs are skipped); panics after [`WAIT`].
    pub async fn recv(&mut self) -> Value {
        self.recv_within(WAIT)
            .await
            .expect("a message within the wait")
    }

    /// The next JSON message, or `None` if none arrives within `wait`.
    pub async fn recv_within(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Some(serde_json::from_str(&t).expect("server sends JSON"))
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text message, got {other:?}"),
            }
        }
    }

    /// Sends a request and returns the next message (the reply, unless deliveries interleave).
    pub async fn request(&mut self, msg: Value) -> Value {
        self.send(msg).await;
        self.recv().await
    }

    pub async fn subscribe(&mut self, channel: &str) {
        let reply = self
            .request(json!({"type":"subscribe","channel":channel,"id":"s"}))
            .await;
        assert_eq!(
            reply,
            json!({"type":"subscribed","channel":channel,"id":"s"})
        );
    }

    pub async fn publish(&mut self, channel: &str, data: Value) {
        let reply = self
            .request(json!({"type":"publish","channel":channel,"data":data,"id":"p"}))
            .await;
        assert_eq!(
            reply,
            json!({"type":"published","channel":channel,"id":"p"})
        );
    }

    /// Reads until the server closes; returns the close frame (None for a close without one,
    /// or a connection dropped without a close frame).
    pub async fn expect_close(&mut self) -> Option<CloseFrame> {
        self.expect_close_within(WAIT).await
    }

    pub async fn expect_close_within(&mut self, wait: Duration) -> Option<CloseFrame> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close within {wait:?}"),
                Ok(Some(Ok(Message::Close(frame)))) => return frame,
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(_))) | Ok(None) => return None,
            }
        }
    }
}

/// The close code of a close frame, as a number.
pub fn close_code(frame: &Option<CloseFrame>) -> Option<u16> {
    frame.as_ref().map(|f| u16::from(f.code))
}

pub fn code(c: u16) -> CloseCode {
    CloseCode::from(c)
}
