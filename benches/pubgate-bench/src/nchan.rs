//! The Nchan target: nginx with the Nchan module, started by the tool from a generated config in
//! a temporary directory, so pubgate, the bare writer and Nchan run the same scenario in one run.
//!
//! Each instance is `nginx -p <dir> -c <dir>/nginx.conf` in the foreground (`daemon off`) with a
//! master and `worker_processes auto` (one per core, as a pubgate node runs one runtime thread per
//! core; `--nchan-workers` sets a number), listening on a free loopback port with `reuseport` (the
//! kernel spreads connections evenly over the workers; without it one worker tends to take most
//! of them). `/sub/<channel>` is a WebSocket subscriber, `/pub/<channel>` an
//! HTTP publisher. One instance uses Nchan's memory store; with `--nodes N > 1` the N instances
//! share one Redis (`nchan_redis_url`, `nchan_use_redis on`), as pubgate's nodes do. CPU and RSS
//! are those of the master and its workers, read from /proc.
//!
//! This module only starts, watches and stops nginx; subscribing is in `client.rs`, publishing
//! in `publisher.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// How an instance is configured.
#[derive(Debug, Clone)]
pub struct NginxOptions {
    pub bin: PathBuf,
    pub module: PathBuf,
    /// Worker processes; None: `auto`.
    pub workers: Option<usize>,
    /// Connections the instance must hold (subscribers, publishers, Redis, margin added here).
    pub connections: usize,
    /// `redis://host:port` shared by every instance, or None for the memory store.
    pub redis_url: Option<String>,
    /// `nchan_message_buffer_length`.
    pub buffer: usize,
    /// WebSocket ping interval (`nchan_websocket_ping_interval`, whole seconds, 0 = none).
    pub ping_interval: Duration,
}

/// A running nginx instance.
pub struct Nginx {
    pub index: usize,
    pub addr: SocketAddr,
    child: Child,
    /// Master first, then its workers.
    pids: Vec<u32>,
    dir: PathBuf,
}

impl Nginx {
    /// The subscriber URL prefix: a connection appends its channel.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/sub/", self.addr)
    }

    /// Master and worker pids, for CPU and RSS.
    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// An error with the end of the error log if the master has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(format!(
                "nginx {} exited during the run ({status}):\n{}",
                self.index,
                log_tail(&self.dir)
            )),
            _ => Ok(()),
        }
    }

    /// SIGTERM to the master (a fast shutdown that ends the workers too), then SIGKILL to
    /// whatever is left after 5 s; removes the directory.
    pub async fn stop(mut self) {
        signal("TERM", &self.pids[..1]);
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            signal("KILL", &self.pids);
            let _ = self.child.wait().await;
        }
        // Workers exit after the master has reaped them; give stragglers a moment.
        let start = Instant::now();
        while self.pids[1..].iter().any(|p| alive(*p)) && start.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        signal("KILL", &self.pids[1..]);
        let _ = std::fs::remove_dir_all(&self.dir);
        self.pids.clear();
    }
}

impl Drop for Nginx {
    /// A run that fails half-way must not leave workers behind: killing the master alone (what
    /// `kill_on_drop` does) would orphan them.
    fn drop(&mut self) {
        if !self.pids.is_empty() {
            signal("KILL", &self.pids);
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts instance `index` on a free loopback port and waits until it accepts connections and
/// all its workers are up.
pub async fn start(index: usize, opts: &NginxOptions) -> Result<Nginx, String> {
    let mut last = String::new();
    // The port is picked by binding port 0 and released before nginx binds it: retry on a race.
    for _ in 0..5 {
        let dir = std::env::temp_dir().join(format!(
            "pubgate-bench-nchan-{}-{index}-{:06x}",
            std::process::id(),
            rand::random::<u32>() & 0xff_ffff
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        std::fs::write(dir.join("nginx.conf"), config(opts, &dir, addr))
            .map_err(|e| e.to_string())?;
        let stderr = std::fs::File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&opts.bin);
        // -e: the log of the start-up, before nginx.conf's error_log applies (else the
        // compiled-in /var/log/nginx/error.log).
        cmd.arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: cannot start: {e}", opts.bin.display()))?;
        let master = child.id().unwrap_or(0);
        let mut nginx = Nginx {
            index,
            addr,
            child,
            pids: vec![master],
            dir,
        };
        match wait_up(&mut nginx, opts.workers).await {
            Ok(()) => return Ok(nginx),
            Err(e) => {
                last = e;
                nginx.stop().await;
            }
        }
    }
    Err(last)
}

/// Waits until the port accepts and the master has its workers: `workers` of them, or under
/// `auto` (a count only nginx knows) the same children for 300 ms.
async fn wait_up(nginx: &mut Nginx, workers: Option<usize>) -> Result<(), String> {
    let start = Instant::now();
    let mut seen = Vec::new();
    let mut since = Instant::now();
    while start.elapsed() < Duration::from_secs(15) {
        if let Ok(Some(status)) = nginx.child.try_wait() {
            return Err(format!(
                "nginx {} exited at start ({status}):\n{}",
                nginx.index,
                log_tail(&nginx.dir)
            ));
        }
        let children = children_of(nginx.pids[0]);
        if children != seen {
            seen = children.clone();
            since = Instant::now();
        }
        let complete = match workers {
            Some(n) => children.len() >= n,
            None => !children.is_empty() && since.elapsed() >= Duration::from_millis(300),
        };
        if complete && tokio::net::TcpStream::connect(nginx.addr).await.is_ok() {
            nginx.pids.truncate(1);
            nginx.pids.extend(children);
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!(
        "nginx {} did not come up within 15 s:\n{}",
        nginx.index,
        log_tail(&nginx.dir)
    ))
}

/// The generated nginx.conf. Logs, pid file and temp paths stay in `dir`.
pub fn config(opts: &NginxOptions, dir: &Path, addr: SocketAddr) -> String {
    let d = dir.display();
    // Every worker could be handed every connection; +512 for publishers, Redis and spares.
    let worker_connections = opts.connections + 512;
    // Root-run masters switch workers to `nobody` by default, which could not write the temp
    // paths in `dir`; keep the tool's user.
    let user = if running_as_root() {
        "user root;\n"
    } else {
        ""
    };
    let store = match &opts.redis_url {
        Some(url) => format!(
            "    nchan_redis_url \"{}\";\n    nchan_use_redis on;\n",
            url.trim_end_matches('/')
        ),
        None => String::new(),
    };
    format!(
        "# Generated by pubgate-bench (src/nchan.rs) for one run.
load_module {module};
daemon off;
master_process on;
worker_processes {workers};
# Each worker may hold every connection; as root the limit can exceed the shell's hard limit.
worker_rlimit_nofile {rlimit};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
{user}
events {{
    worker_connections {worker_connections};
    multi_accept on;
}}

http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # One keep-alive connection per publisher for the whole run.
    keepalive_requests 1000000000;
    keepalive_timeout 3600s;
    nchan_message_buffer_length {buffer};
{store}
    server {{
        listen {addr} reuseport backlog=4096;
        location ~ ^/sub/(.+)$ {{
            nchan_subscriber websocket;
            nchan_channel_id $1;
            nchan_websocket_ping_interval {ping};
        }}
        location ~ ^/pub/(.+)$ {{
            nchan_publisher http;
            nchan_channel_id $1;
        }}
    }}
}}
",
        module = opts.module.display(),
        workers = opts
            .workers
            .map_or("auto".to_string(), |n| n.max(1).to_string()),
        rlimit = worker_connections + 1024,
        buffer = opts.buffer,
        ping = opts.ping_interval.as_secs(),
    )
}

/// An error naming what to install when the nginx binary or the Nchan module is missing.
pub fn check_installed(bin: &Path, module: &Path) -> Result<(), String> {
    let found = if bin.components().count() > 1 {
        bin.is_file()
    } else {
        std::env::var_os("PATH")
            .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(bin).is_file()))
    };
    let install = "the nchan target needs Debian's nginx with the Nchan module \
                   (apt-get install nginx libnginx-mod-nchan)";
    if !found {
        return Err(format!(
            "{}: no such nginx binary; {install}, or pass --nginx-bin",
            bin.display()
        ));
    }
    if !module.is_file() {
        return Err(format!(
            "{}: no such module; {install}, or pass --nchan-module",
            module.display()
        ));
    }
    Ok(())
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        == Some("0")
}

/// Pids whose parent is `pid` (from /proc/<n>/stat).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|n| {
            let stat = std::fs::read_to_string(format!("/proc/{n}/stat")).unwrap_or_default();
            // Field 4 (the first after the state, past the parenthesised name) is the parent.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok())
                == Some(pid)
        })
        .collect();
    out.sort_unstable();
    out
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Sends a signal with kill(1): tokio's `Child` can only SIGKILL its own child.
fn signal(name: &str, pids: &[u32]) {
    let pids: Vec<String> = pids
        .iter()
        .filter(|p| **p > 0)
        .map(u32::to_string)
        .collect();
    if pids.is_empty() {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .args(&pids)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The last lines nginx wrote (its stderr, then its error log).
fn log_tail(dir: &Path) -> String {
    let mut log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
    log += &std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_has_one_store_and_the_limits() {
        let mut opts = NginxOptions {
            bin: "nginx".into(),
            module: "/m.so".into(),
            workers: Some(2),
            connections: 19_000,
            redis_url: None,
            buffer: 0,
            ping_interval: Duration::from_secs(300),
        };
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let c = config(&opts, Path::new("/tmp/x"), addr);
        assert!(c.contains("worker_processes 2;"), "{c}");
        assert!(c.contains("worker_connections 19512;"), "{c}");
        assert!(c.contains("worker_rlimit_nofile 20536;"), "{c}");
        assert!(c.contains("listen 127.0.0.1:9 reuseport"), "{c}");
        assert!(c.contains("nchan_websocket_ping_interval 300;"), "{c}");
        assert!(!c.contains("nchan_use_redis"), "{c}");
        opts.workers = None;
        let c = config(&opts, Path::new("/tmp/x"), addr);
        assert!(c.contains("worker_processes auto;"), "{c}");
        opts.redis_url = Some("redis://127.0.0.1:7/".into());
        let c = config(&opts, Path::new("/tmp/x"), addr);
        assert!(
            c.contains("nchan_redis_url \"redis://127.0.0.1:7\";"),
            "{c}"
        );
        assert!(c.contains("nchan_use_redis on;"), "{c}");
    }

    #[test]
    fn a_missing_nginx_or_module_names_the_packages() {
        let e = check_installed(Path::new("/nonexistent/nginx"), Path::new("/m.so")).unwrap_err();
        assert!(
            e.contains("--nginx-bin") && e.contains("libnginx-mod-nchan"),
            "{e}"
        );
        let e = check_installed(Path::new("sh"), Path::new("/nonexistent/m.so")).unwrap_err();
        assert!(e.contains("--nchan-module") && e.contains("apt-get"), "{e}");
    }
}
