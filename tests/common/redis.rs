//! Redis-side test infrastructure: a private `redis-server` on a free loopback port, a TCP proxy
//! that can silently blackhole connections, and backend helpers (PUBLISH, PUBSUB, raw commands)
//! through the `redis` crate.
//!
//! Nothing here ever touches port 6379: every server is started by the test that uses it and is
//! killed when its [`RedisServer`] is dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::redis::aio::{MultiplexedConnection, PubSub};
use ::redis::{FromRedisValue, ToRedisArgs};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinHandle};

/// Upper bound for one backend command issued by a test.
const COMMAND_WAIT: Duration = Duration::from_secs(5);
/// How long a starting redis-server may take to answer PING.
const START_WAIT: Duration = Duration::from_secs(10);

/// A `redis-server` child process owned by one test.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts `redis-server` from PATH on a free loopback port and waits until it answers.
    pub async fn start() -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "pubgate-redis-{}-{:08x}",
            std::process::id(),
            super::rand_u32()
        ));
        std::fs::create_dir_all(&dir).expect("create the redis temp dir");
        let mut last_error = String::new();
        // A free port found by binding :0 may be taken again before redis binds it: retry.
        for _ in 0..5 {
            let port = free_port();
            match spawn_and_wait(port, &dir).await {
                Ok(child) => {
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                    }
                }
                Err(e) => last_error = e,
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("redis-server did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:P/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// The child's pid, `None` while killed.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the server (no shutdown, no save) and waits until the process is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty dataset) and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        let deadline = Instant::now() + START_WAIT;
        // The port is normally free at once (redis sets SO_REUSEADDR); retry briefly in case a
        // client's ephemeral port happens to hold it.
        while Instant::now() < deadline {
            match spawn_and_wait(self.port, &self.dir).await {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "redis-server did not restart on port {}: {last_error}",
            self.port
        );
    }

    /// A new multiplexed connection (the "backend").
    pub async fn connection(&self) -> MultiplexedConnection {
        let client = ::redis::Client::open(self.url()).expect("valid redis url");
        tokio::time::timeout(COMMAND_WAIT, client.get_multiplexed_async_connection())
            .await
            .unwrap_or_else(|_| panic!("connect to redis at {} timed out", self.url()))
            .unwrap_or_else(|e| panic!("connect to redis at {}: {e}", self.url()))
    }

    /// Runs one command, e.g. `cmd::<i64>(&["PUBSUB", "NUMSUB", "x"])`.
    pub async fn cmd<T: FromRedisValue>(&self, args: &[&str]) -> T {
        let mut conn = self.connection().await;
        let mut cmd = ::redis::cmd(args[0]);
        for arg in &args[1..] {
            cmd.arg(*arg);
        }
        tokio::time::timeout(COMMAND_WAIT, cmd.query_async::<T>(&mut conn))
            .await
            .unwrap_or_else(|_| panic!("redis command {args:?} timed out"))
            .unwrap_or_else(|e| panic!("redis command {args:?}: {e}"))
    }

    /// PUBLISHes `payload` to `<prefix><channel>` as a backend would; returns the number of
    /// receiving Redis connections (one per subscribed node).
    pub async fn publish(&self, prefix: &str, channel: &str, payload: impl ToRedisArgs) -> i64 {
        let mut conn = self.connection().await;
        let full = format!("{prefix}{channel}");
        tokio::time::timeout(
            COMMAND_WAIT,
            ::redis::cmd("PUBLISH")
                .arg(&full)
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await
        .unwrap_or_else(|_| panic!("PUBLISH {full} timed out"))
        .unwrap_or_else(|e| panic!("PUBLISH {full}: {e}"))
    }

    /// `PUBSUB NUMSUB <full channel>`: how many connections are subscribed to it.
    pub async fn numsub(&self, full_channel: &str) -> i64 {
        let (name, count): (String, i64) = self
            .cmd::<Vec<(String, i64)>>(&["PUBSUB", "NUMSUB", full_channel])
            .await
            .into_iter()
            .next()
            .expect("NUMSUB answers one pair per channel");
        assert_eq!(name, full_channel);
        count
    }

    /// `PUBSUB CHANNELS <pattern>`, sorted.
    pub async fn channels(&self, pattern: &str) -> Vec<String> {
        let mut channels: Vec<String> = self.cmd(&["PUBSUB", "CHANNELS", pattern]).await;
        channels.sort();
        channels
    }

    /// `KEYS <pattern>`, sorted (test datasets are tiny).
    pub async fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.cmd(&["KEYS", pattern]).await;
        keys.sort();
        keys
    }

    /// A backend that keeps one connection for many commands (quick successive PUBLISHes).
    pub async fn backend(&self) -> Backend {
        Backend {
            conn: self.connection().await,
        }
    }

    /// A backend subscriber on one full (prefixed) channel name.
    pub async fn subscriber(&self, full_channel: &str) -> RawSubscriber {
        let client = ::redis::Client::open(self.url()).expect("valid redis url");
        let mut pubsub = tokio::time::timeout(COMMAND_WAIT, client.get_async_pubsub())
            .await
            .expect("pubsub connect timed out")
            .expect("pubsub connect");
        tokio::time::timeout(COMMAND_WAIT, pubsub.subscribe(full_channel))
            .await
            .expect("SUBSCRIBE timed out")
            .expect("SUBSCRIBE");
        RawSubscriber { pubsub }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A backend application's connection: PUBLISH and PUBSUB queries without a connect each time.
pub struct Backend {
    conn: MultiplexedConnection,
}

impl Backend {
    /// PUBLISHes `payload` to `<prefix><channel>`; returns the number of receiving connections.
    pub async fn publish(&mut self, prefix: &str, channel: &str, payload: impl ToRedisArgs) -> i64 {
        let full = format!("{prefix}{channel}");
        tokio::time::timeout(
            COMMAND_WAIT,
            ::redis::cmd("PUBLISH")
                .arg(&full)
                .arg(payload)
                .query_async::<i64>(&mut self.conn),
        )
        .await
        .unwrap_or_else(|_| panic!("PUBLISH {full} timed out"))
        .unwrap_or_else(|e| panic!("PUBLISH {full}: {e}"))
    }

    /// `PUBSUB NUMSUB <full channel>`.
    pub async fn numsub(&mut self, full_channel: &str) -> i64 {
        let pairs: Vec<(String, i64)> = tokio::time::timeout(
            COMMAND_WAIT,
            ::redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(full_channel)
                .query_async(&mut self.conn),
        )
        .await
        .expect("PUBSUB NUMSUB timed out")
        .expect("PUBSUB NUMSUB");
        pairs[0].1
    }
}

/// A backend's pub/sub connection.
pub struct RawSubscriber {
    pubsub: PubSub,
}

impl RawSubscriber {
    /// The next message as (full channel, payload bytes), `None` if none arrives within `wait`.
    pub async fn next_within(&mut self, wait: Duration) -> Option<(String, Vec<u8>)> {
        let msg = tokio::time::timeout(wait, self.pubsub.on_message().next())
            .await
            .ok()?
            .expect("backend pub/sub connection closed");
        Some((
            msg.get_channel_name().to_owned(),
            msg.get_payload_bytes().to_vec(),
        ))
    }
}

/// A loopback port that was free a moment ago (never 6379).
fn free_port() -> u16 {
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().unwrap().port();
        if port != 6379 {
            return port;
        }
    }
}

/// Spawns redis-server on `port` and waits until it answers PING and reports its own pid (so a
/// server of another test that holds the port is never mistaken for ours).
async fn spawn_and_wait(port: u16, dir: &Path) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let mut child = match Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not on PATH: install the `redis-server` package \
             (apt-get install redis-server); the Redis tests start their own server"
        ),
        Err(e) => panic!("cannot run redis-server: {e}"),
    };
    let pid = child.id();
    let deadline = Instant::now() + START_WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            return Err(format!(
                "redis-server on port {port} exited with {status}: {:?}",
                tail
            ));
        }
        if ping(port).await && server_pid(port).await == Some(pid) {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!(
                "redis-server on port {port} did not answer PING within {START_WAIT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A raw `PING\r\n` that expects `+PONG`.
async fn ping(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        stream.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), attempt).await,
        Ok(Some(true))
    )
}

/// The `process_id` from `INFO server`.
async fn server_pid(port: u16) -> Option<u32> {
    let attempt = async {
        let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = ::redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn)
            .await
            .ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .ok()
        .flatten()
}

/// What the proxy currently forwards.
#[derive(Debug, Clone, Copy, Default)]
struct Mode {
    /// Forward nothing at all.
    all: bool,
    /// Forward nothing on connections that issued SUBSCRIBE/PSUBSCRIBE (pub/sub connections).
    pubsub: bool,
}

struct ProxyShared {
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    conns: Mutex<Vec<AbortHandle>>,
    accepted: AtomicUsize,
}

/// A loopback TCP proxy in front of `target` that can go silent.
///
/// While blackholed it forwards nothing in either direction and closes nothing: bytes are left
/// unread in the kernel (or held), so the peers see an open but silent connection, as with a
/// dropped route. Lifting the blackhole resumes forwarding on existing connections (nothing was
/// lost, so the byte streams stay consistent) and for new ones.
pub struct TcpProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept_task: JoinHandle<()>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy binds 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let (mode, _) = watch::channel(Mode::default());
        let shared = Arc::new(ProxyShared {
            target,
            mode,
            conns: Mutex::new(Vec::new()),
            accepted: AtomicUsize::new(0),
        });
        let accept_shared = shared.clone();
        let accept_task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                accept_shared.accepted.fetch_add(1, Ordering::SeqCst);
                let task = tokio::spawn(serve(accept_shared.clone(), client));
                let mut conns = accept_shared.conns.lock().unwrap();
                conns.retain(|h| !h.is_finished());
                conns.push(task.abort_handle());
            }
        });
        TcpProxy {
            addr,
            shared,
            accept_task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://<proxy addr>/`
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// From now on forward nothing in either direction on any connection (`true`), or resume
    /// forwarding on every connection (`false`). Nothing is closed either way.
    pub fn set_blackhole(&self, on: bool) {
        self.shared.mode.send_modify(|m| m.all = on);
    }

    /// Like [`set_blackhole`](Self::set_blackhole) but only for the connections that have sent
    /// SUBSCRIBE or PSUBSCRIBE: a silent pub/sub connection while commands keep working.
    pub fn set_blackhole_pubsub(&self, on: bool) {
        self.shared.mode.send_modify(|m| m.pubsub = on);
    }

    /// Drops every proxied connection (both sides see the connection close).
    pub fn close_all(&self) {
        for conn in self.shared.conns.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept_task.abort();
        self.close_all();
    }
}

fn blocked(mode: &Mode, is_pubsub: &AtomicBool) -> bool {
    mode.all || (mode.pubsub && is_pubsub.load(Ordering::SeqCst))
}

async fn serve(shared: Arc<ProxyShared>, client: TcpStream) {
    let is_pubsub = Arc::new(AtomicBool::new(false));
    let mut mode = shared.mode.subscribe();
    // A connection made while blackholed gets no further than the proxy.
    if mode.wait_for(|m| !blocked(m, &is_pubsub)).await.is_err() {
        return;
    }
    let Ok(upstream) = TcpStream::connect(shared.target).await else {
        return; // target down: the client sees its connection close, as without a proxy
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let to_upstream = pump(
        client_read,
        upstream_write,
        shared.clone(),
        is_pubsub.clone(),
        true,
    );
    let to_client = pump(upstream_read, client_write, shared, is_pubsub, false);
    tokio::join!(to_upstream, to_client);
}

/// Copies `from` to `to` while the connection is not blackholed; on EOF or error shuts `to` down.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<ProxyShared>,
    is_pubsub: Arc<AtomicBool>,
    sniff_subscribe: bool,
) {
    let mut mode = shared.mode.subscribe();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if mode.wait_for(|m| !blocked(m, &is_pubsub)).await.is_err() {
            return;
        }
        let read = tokio::select! {
            read = from.read(&mut buf) => Some(read),
            // Stop reading the moment the blackhole starts (read is cancel-safe).
            started = mode.wait_for(|m| blocked(m, &is_pubsub)) => {
                drop(started);
                None
            }
        };
        let n = match read {
            None => continue,
            Some(Ok(0)) | Some(Err(_)) => {
                let _ = to.shutdown().await;
                return;
            }
            Some(Ok(n)) => n,
        };
        if sniff_subscribe && !is_pubsub.load(Ordering::SeqCst) && mentions_subscribe(&buf[..n]) {
            is_pubsub.store(true, Ordering::SeqCst);
            // Wake both directions so they re-evaluate the blackhole for this connection.
            shared.mode.send_modify(|_| {});
        }
        // Bytes read just as the blackhole started are held, not forwarded, until it lifts.
        if mode.wait_for(|m| !blocked(m, &is_pubsub)).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

fn mentions_subscribe(bytes: &[u8]) -> bool {
    const NEEDLE: &[u8] = b"SUBSCRIBE";
    bytes
        .windows(NEEDLE.len())
        .any(|w| w.eq_ignore_ascii_case(NEEDLE))
}
