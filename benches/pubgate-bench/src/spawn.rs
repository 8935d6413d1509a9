//! Processes a run starts itself: pubgate nodes, a private redis-server, bare-writer servers.
//! Every child is killed when its handle is dropped; all listen on 127.0.0.1 only.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::procstat::http_get;

/// A running child server.
pub struct Spawned {
    pub name: String,
    pub child: Child,
    pub pid: u32,
    pub addr: SocketAddr,
    /// Last lines of its output, for error messages.
    pub tail: Arc<Mutex<Vec<String>>>,
}

impl Spawned {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// An error with the last lines of its output if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => {
                let tail = self
                    .tail
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .join("\n");
                Err(format!(
                    "{} exited during the run ({status}):\n{tail}",
                    self.name
                ))
            }
            _ => Ok(()),
        }
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
    }
}

/// The pubgate binary: the flag, else `pubgate` beside this executable, else target/release.
pub fn pubgate_bin(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Ok(me) = std::env::current_exe() {
        let beside = me.with_file_name("pubgate");
        if beside.exists() {
            return beside;
        }
    }
    PathBuf::from("target/release/pubgate")
}

/// Starts a child whose output announces `listening on <addr>`, and waits for that line.
async fn start_listening(name: &str, mut cmd: Command) -> Result<Spawned, String> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{name}: cannot start: {e}"))?;
    let pid = child.id().unwrap_or(0);
    let tail = Arc::new(Mutex::new(Vec::new()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    for pipe in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tail = tail.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let token = rest.split_whitespace().next().unwrap_or("");
                    if let Ok(addr) = token.trim_end_matches(',').parse::<SocketAddr>() {
                        let _ = tx.send(addr);
                    }
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() >= 20 {
                    t.remove(0);
                }
                t.push(line);
            }
        });
    }
    drop(tx);
    let addr = tokio::select! {
        a = rx.recv() => a,
        _ = tokio::time::sleep(Duration::from_secs(15)) => None,
    };
    let Some(addr) = addr else {
        let _ = child.start_kill();
        let lines = tail.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
        return Err(format!(
            "{name}: did not report its listen address:\n{lines}"
        ));
    };
    Ok(Spawned {
        name: name.to_string(),
        child,
        pid,
        addr,
        tail,
    })
}

/// Options for spawned pubgate nodes.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    pub bin: PathBuf,
    pub redis_url: Option<String>,
    pub send_queue: Option<usize>,
    pub ping_interval: Option<String>,
    pub extra_env: Vec<(String, String)>,
}

/// Starts one pubgate node on 127.0.0.1 and waits until /readyz answers 200.
pub async fn start_node(index: usize, opts: &NodeOptions) -> Result<Spawned, String> {
    let mut cmd = Command::new(&opts.bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PUBGATE_LISTEN", "127.0.0.1:0")
        .env("PUBGATE_NODE_ID", format!("bench-n{index}"))
        .env("PUBGATE_LOG_FORMAT", "text")
        .env("PUBGATE_RATE_LIMIT", "0")
        .env("PUBGATE_SHUTDOWN_TIMEOUT", "5s")
        .env("RUST_LOG", "info");
    if let Some(url) = &opts.redis_url {
        cmd.env("PUBGATE_REDIS_URL", url);
    }
    if let Some(q) = opts.send_queue {
        cmd.env("PUBGATE_SEND_QUEUE", q.to_string());
    }
    if let Some(p) = &opts.ping_interval {
        cmd.env("PUBGATE_PING_INTERVAL", p);
    }
    for (k, v) in &opts.extra_env {
        cmd.env(k, v);
    }
    let node = start_listening(&format!("pubgate node {index}"), cmd).await?;
    wait_ready(node.addr, Duration::from_secs(15))
        .await
        .map_err(|e| format!("pubgate node {index}: {e}"))?;
    Ok(node)
}

/// Polls `/readyz` until it answers 200.
pub async fn wait_ready(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < limit {
        match http_get(addr, "/readyz").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => last = format!("/readyz {code}: {}", body.trim()),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("not ready within {limit:?} ({last})"))
}

/// Starts a bare-writer server (this executable's `bare-server`).
pub async fn start_bare(index: usize, send_queue: usize) -> Result<Spawned, String> {
    let me = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(me);
    cmd.arg("bare-server")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--send-queue")
        .arg(send_queue.to_string());
    start_listening(&format!("bare writer {index}"), cmd).await
}

/// A private redis-server on a free loopback port, without persistence.
pub struct Redis {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    pub async fn start() -> Result<Redis, String> {
        let dir = std::env::temp_dir().join(format!(
            "pubgate-bench-redis-{}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        ));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut last = String::new();
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port();
            let mut cmd = Command::new("redis-server");
            cmd.args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--maxclients",
                "1000",
                "--client-output-buffer-limit",
                "pubsub 256mb 64mb 60",
            ])
            .current_dir(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .stdin(Stdio::null())
            .kill_on_drop(true);
            let mut child = cmd
                .spawn()
                .map_err(|e| format!("redis-server: cannot start ({e}); is it on PATH?"))?;
            let pid = child.id().unwrap_or(0);
            let url = format!("redis://127.0.0.1:{port}/");
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if ping(&url).await.is_ok() {
                    return Ok(Redis {
                        child,
                        pid,
                        port,
                        dir,
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            last = format!("redis-server on port {port} did not answer PING");
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(last)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn ping(url: &str) -> Result<(), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let call = async {
        let mut c = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut c).await
    };
    match tokio::time::timeout(Duration::from_secs(1), call).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".into()),
    }
}
