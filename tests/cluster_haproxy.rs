//! The docker-compose topology as native processes: a private redis-server, three `pubgate`
//! processes and a real HAProxy whose config is rendered from deploy/haproxy/haproxy.cfg (same
//! balance, health check and timeouts; only the addresses and a faster check interval differ).
//! Proves what a rolling restart and a crash look like to clients behind the load balancer.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::redis::RedisServer;
use common::{close_code, http_get, Client, WAIT};
use serde_json::{json, Value};
use tokio::process::{Child, Command};
use tokio::time::{sleep, timeout, Instant};

/// Health checks every 250 ms, DOWN after 2 failures: out of rotation within ~0.5 s.
const CHECK_INTER: &str = "250ms";
/// Longer than CHECK_INTER x fall, as deploy/ sets it, so the LB notices before clients close.
const DRAIN_DELAY: &str = "1500ms";
const PRESENCE_TTL: Duration = Duration::from_secs(3);
const CLIENTS: usize = 60;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Gateway {
    id: String,
    addr: SocketAddr,
    child: Child,
}

impl Gateway {
    async fn start(id: &str, redis_url: &str, prefix: &str, logs: &Path) -> Gateway {
        let port = free_port();
        let log = std::fs::File::create(logs.join(format!("{id}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_pubgate"))
            .env_clear()
            .env("PUBGATE_LISTEN", format!("127.0.0.1:{port}"))
            .env("PUBGATE_REDIS_URL", redis_url)
            .env("PUBGATE_CHANNEL_PREFIX", prefix)
            .env("PUBGATE_NODE_ID", id)
            .env("PUBGATE_DRAIN_DELAY", DRAIN_DELAY)
            .env("PUBGATE_SHUTDOWN_TIMEOUT", "6s")
            .env("PUBGATE_PRESENCE_TTL", "3s")
            .env("PUBGATE_BROKER_PROBE_INTERVAL", "500ms")
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start target/*/pubgate");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok((200, _)) =
                timeout(Duration::from_millis(500), try_get(addr, "/readyz")).await
            {
                break;
            }
            assert!(Instant::now() < deadline, "{id} did not become ready");
            sleep(Duration::from_millis(50)).await;
        }
        Gateway {
            id: id.to_owned(),
            addr,
            child,
        }
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

async fn try_get(addr: SocketAddr, path: &str) -> (u16, String) {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(_) => http_get(addr, path).await,
        Err(_) => (0, String::new()),
    }
}

struct Haproxy {
    addr: SocketAddr,
    stats: SocketAddr,
    _child: Child,
}

impl Haproxy {
    async fn start(backends: &[&Gateway], dir: &Path) -> Haproxy {
        let (port, stats_port) = (free_port(), free_port());
        let mut args = vec![port.to_string(), stats_port.to_string()];
        args.extend(backends.iter().map(|g| g.addr.port().to_string()));
        let rendered = std::process::Command::new("bash")
            .arg(repo().join("deploy/haproxy/render-local.sh"))
            .args(&args)
            .env("HAPROXY_CHECK_INTER", CHECK_INTER)
            .output()
            .expect("run render-local.sh");
        assert!(
            rendered.status.success(),
            "render-local.sh: {}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, &rendered.stdout).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("haproxy.log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("haproxy on PATH (Debian package haproxy; .ci/run installs it)");
        let lb = Haproxy {
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            stats: format!("127.0.0.1:{stats_port}").parse().unwrap(),
            _child: child,
        };
        lb.wait_up(backends.len()).await;
        lb
    }

    /// Backend server states from the stats CSV: name -> status (UP, DOWN, ...).
    async fn states(&self) -> HashMap<String, String> {
        let (_, csv) = try_get(self.stats, "/;csv").await;
        csv.lines()
            .filter(|l| l.starts_with("gateways,gw"))
            .map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f[1].to_owned(), f[17].to_owned())
            })
            .collect()
    }

    async fn wait_up(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let states = self.states().await;
            if states.values().filter(|s| s.as_str() == "UP").count() == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy backends not all UP: {states:?}"
            );
            sleep(Duration::from_millis(100)).await;
        }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }
}

/// Connects through the LB, retrying refusals while it reroutes (what a real client does).
async fn connect(lb: &Haproxy) -> Client {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match timeout(WAIT, tokio_tungstenite::connect_async(lb.ws_url())).await {
            Ok(Ok((ws, _))) => {
                let mut client = Client {
                    ws,
                    welcome: Value::Null,
                };
                client.welcome = client.recv().await;
                assert_eq!(client.welcome["type"], "welcome");
                return client;
            }
            other => {
                assert!(
                    Instant::now() < deadline,
                    "could not reconnect through the LB: {other:?}"
                );
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn subscribed(lb: &Haproxy, channel: &str) -> Client {
    let mut client = connect(lb).await;
    client.subscribe(channel).await;
    client
}

fn spread(clients: &[Client]) -> HashMap<String, usize> {
    let mut by_node = HashMap::new();
    for c in clients {
        *by_node.entry(c.node().to_owned()).or_insert(0) += 1;
    }
    by_node
}

/// Publishes one message and checks that every client receives it.
async fn publish_reaches_all(clients: &mut [Client], publisher: usize, n: u64) {
    let data = json!({ "n": n });
    let delivery = json!({"type":"message","channel":"room","data":data});
    let p = &mut clients[publisher];
    p.send(json!({"type":"publish","channel":"room","data":data,"id":"p"}))
        .await;
    // The publisher is subscribed too: its reply and its delivery may come in either order.
    let mut got = vec![p.recv().await, p.recv().await];
    got.sort_by_key(|m| m["type"].as_str().map(str::to_owned));
    assert_eq!(
        got,
        vec![
            delivery.clone(),
            json!({"type":"published","channel":"room","id":"p"})
        ]
    );
    for (i, c) in clients.iter_mut().enumerate() {
        if i != publisher {
            assert_eq!(c.recv().await, delivery, "client {i} on {}", c.node());
        }
    }
}

async fn presence(client: &mut Client) -> Vec<Value> {
    let reply = client
        .request(json!({"type":"presence","channel":"room","id":"q"}))
        .await;
    assert_eq!(reply["type"], "presence", "{reply}");
    reply["members"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_and_crash_behind_haproxy() {
    let dir = tempdir();
    let redis = RedisServer::start().await;
    let prefix = format!("lb{}:", std::process::id());
    let mut gateways = Vec::new();
    for id in ["gw-a", "gw-b", "gw-c"] {
        gateways.push(Gateway::start(id, &redis.url(), &prefix, &dir).await);
    }
    let lb = Haproxy::start(&gateways.iter().collect::<Vec<_>>(), &dir).await;

    // 60 clients through the LB land on all three nodes (leastconn evens them out).
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(subscribed(&lb, "room").await);
    }
    let by_node = spread(&clients);
    assert_eq!(
        by_node.len(),
        3,
        "clients spread over every node: {by_node:?}"
    );
    for (node, n) in &by_node {
        assert!(*n >= 10, "leastconn keeps {node} near a third: {by_node:?}");
    }
    publish_reaches_all(&mut clients, 0, 1).await;

    // Rolling restart of gw-a: SIGTERM, its clients get 1001 after the drain delay, reconnect
    // through the LB onto the other nodes, and a message published then reaches everyone.
    let a = gateways.remove(0);
    let started = Instant::now();
    a.signal("TERM");
    let mut reconnect = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        if c.node() == a.id {
            let frame = c.expect_close_within(Duration::from_secs(10)).await;
            assert_eq!(
                close_code(&frame),
                Some(1001),
                "client {i} of the draining node"
            );
            reconnect.push(i);
        }
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "clients were served through the drain delay"
    );
    for i in &reconnect {
        clients[*i] = subscribed(&lb, "room").await;
        assert_ne!(
            clients[*i].node(),
            a.id,
            "no client is routed to the draining node"
        );
    }
    let mut a = a;
    let status = timeout(Duration::from_secs(10), a.child.wait())
        .await
        .expect("the drained node exits within its shutdown timeout")
        .unwrap();
    assert!(status.success(), "exit status 0 after SIGTERM: {status:?}");
    publish_reaches_all(&mut clients, 1, 2).await;
    assert_eq!(spread(&clients).len(), 2);

    // Crash of gw-b: SIGKILL. HAProxy stops routing to it, its clients reconnect onto gw-c, and
    // its presence members vanish within the presence TTL.
    let mut b = gateways.remove(0);
    b.signal("KILL");
    let _ = b.child.wait().await;
    let killed_at = Instant::now();
    let mut reconnect = Vec::new();
    for (i, c) in clients.iter_mut().enumerate() {
        if c.node() == b.id {
            let frame = c.expect_close_within(Duration::from_secs(5)).await;
            assert_eq!(frame, None, "a killed node sends no close frame");
            reconnect.push(i);
        }
    }
    for i in &reconnect {
        clients[*i] = subscribed(&lb, "room").await;
        assert_eq!(clients[*i].node(), "gw-c");
    }
    // HAProxy takes the dead node out of rotation after `fall` failed checks.
    let deadline = killed_at + Duration::from_secs(3);
    loop {
        let states = lb.states().await;
        if states.get("gw2").is_some_and(|s| s.starts_with("DOWN")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gw2 still in rotation: {states:?}"
        );
        sleep(Duration::from_millis(100)).await;
    }
    publish_reaches_all(&mut clients, 2, 3).await;

    let deadline = killed_at + PRESENCE_TTL + Duration::from_secs(3);
    loop {
        let members = presence(&mut clients[0]).await;
        let nodes: HashSet<&str> = members
            .iter()
            .map(|m| m["node"].as_str().unwrap())
            .collect();
        if members.len() == CLIENTS && nodes == HashSet::from(["gw-c"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "presence still lists the dead nodes' members after the TTL: {} members on {nodes:?}",
            members.len()
        );
        sleep(Duration::from_millis(200)).await;
    }
    println!(
        "killed node's presence members gone {:?} after the kill (ttl {PRESENCE_TTL:?})",
        killed_at.elapsed()
    );
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "pubgate-lb-{}-{}",
        std::process::id(),
        common::rand_u32()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
