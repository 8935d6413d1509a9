//! A local Redis Cluster for tests: 6 `redis-server` processes (3 masters + 3 replicas) on free
//! loopback ports, joined with `redis-cli --cluster create`, torn down on drop.
//!
//! Each node also listens on its cluster bus port (port + 10000), so ports are picked below 55535
//! with both free. `--cluster-node-timeout 1500` and `--cluster-replica-validity-factor 0` let a
//! replica take over a killed master within a few seconds (see the library facts).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{FromRedisValue, Value};

const START_WAIT: Duration = Duration::from_secs(30);
const COMMAND_WAIT: Duration = Duration::from_secs(5);

/// One redis-server of the cluster.
pub struct ClusterNode {
    pub port: u16,
    child: Option<Child>,
}

impl ClusterNode {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// One command to this node only.
    pub async fn cmd<T: FromRedisValue>(&self, args: &[&str]) -> ::redis::RedisResult<T> {
        let client = ::redis::Client::open(self.url())?;
        let mut conn =
            tokio::time::timeout(COMMAND_WAIT, client.get_multiplexed_async_connection())
                .await
                .map_err(|_| {
                    ::redis::RedisError::from(std::io::Error::other("connect timed out"))
                })??;
        let mut cmd = ::redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        tokio::time::timeout(COMMAND_WAIT, cmd.query_async(&mut conn))
            .await
            .map_err(|_| ::redis::RedisError::from(std::io::Error::other("command timed out")))?
    }
}

/// The running cluster.
pub struct RedisCluster {
    pub nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

/// A free port `p < 55535` whose bus port `p + 10000` is free too.
fn free_cluster_port(taken: &[u16]) -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if !(1024..55535).contains(&p) || p == 6379 || taken.contains(&p) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            return p;
        }
    }
}

impl RedisCluster {
    /// Starts 6 nodes and creates the cluster; returns once every slot is served and every node
    /// reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        let dir = std::env::temp_dir().join(format!(
            "pubgate-cluster-{}-{:08x}",
            std::process::id(),
            super::rand_u32() ^ rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..6 {
            let port = free_cluster_port(&ports);
            ports.push(port);
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "1500"])
                .args(["--cluster-replica-validity-factor", "0"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(&node_dir)
                .arg("--logfile")
                .arg(node_dir.join("redis.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server on PATH");
            nodes.push(ClusterNode {
                port,
                child: Some(child),
            });
        }
        let cluster = RedisCluster { nodes, dir };
        let deadline = Instant::now() + START_WAIT;
        for node in &cluster.nodes {
            while node.cmd::<String>(&["PING"]).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "node {} did not start",
                    node.port
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let addrs: Vec<String> = cluster.nodes.iter().map(ClusterNode::addr).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(deadline).await;
        cluster
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees on 3 masters.
    pub async fn wait_ok(&self, deadline: Instant) {
        loop {
            let mut ok = true;
            for node in self.nodes.iter().filter(|n| n.child.is_some()) {
                let info: String = node.cmd(&["CLUSTER", "INFO"]).await.unwrap_or_default();
                ok &= info.contains("cluster_state:ok");
            }
            if ok && self.masters().await.len() == 3 {
                return;
            }
            assert!(Instant::now() < deadline, "cluster did not become ok");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Comma list of seed URLs (`PUBGATE_REDIS_CLUSTER_URLS`).
    pub fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(ClusterNode::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first live node.
    pub fn any(&self) -> &ClusterNode {
        self.nodes.iter().find(|n| n.child.is_some()).unwrap()
    }

    /// `(first, last, master port)` of every slot range, per a live node's `CLUSTER SLOTS`.
    pub async fn slot_ranges(&self) -> Vec<(u16, u16, u16)> {
        let reply: Value = self
            .any()
            .cmd(&["CLUSTER", "SLOTS"])
            .await
            .unwrap_or(Value::Nil);
        let mut out = Vec::new();
        if let Value::Array(entries) = reply {
            for e in entries {
                if let Value::Array(f) = e {
                    if let (Value::Int(a), Value::Int(b), Value::Array(m)) = (&f[0], &f[1], &f[2]) {
                        if let Value::Int(p) = &m[1] {
                            out.push((*a as u16, *b as u16, *p as u16));
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Ports of the masters that own slots.
    pub async fn masters(&self) -> Vec<u16> {
        let mut m: Vec<u16> = self.slot_ranges().await.into_iter().map(|r| r.2).collect();
        m.sort();
        m.dedup();
        m
    }

    /// The master port owning `slot`.
    pub async fn owner(&self, slot: u16) -> u16 {
        self.slot_ranges()
            .await
            .into_iter()
            .find(|(a, b, _)| *a <= slot && slot <= *b)
            .map(|r| r.2)
            .expect("slot served")
    }

    pub fn node(&mut self, port: u16) -> &mut ClusterNode {
        self.nodes.iter_mut().find(|n| n.port == port).unwrap()
    }

    /// A cluster connection (the "backend").
    pub async fn connection(&self) -> ClusterConnection {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(ClusterNode::url)
            .collect();
        let client = ClusterClient::builder(urls)
            .connection_timeout(COMMAND_WAIT)
            .response_timeout(COMMAND_WAIT)
            .build()
            .unwrap();
        tokio::time::timeout(COMMAND_WAIT, client.get_async_connection())
            .await
            .expect("cluster connect timed out")
            .expect("cluster connect")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
