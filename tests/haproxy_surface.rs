//! The shipped HAProxy config (deploy/haproxy/haproxy.cfg, rendered for loopback by
//! render-local.sh) in front of a real node: only `/ws` is forwarded, everything else is refused
//! by HAProxy itself, and the log line of `/ws?token=<jwt>` carries no token.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use pubgate::Config;
use serde_json::json;
use tokio::process::Command;
use tokio::time::{sleep, Instant};

use common::tokens::{hs256, now, SECRET};
use common::{http_get, rand_u32, start_node, test_config, Client, WAIT};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn haproxy_forwards_only_ws_and_never_logs_the_token() {
    let node = start_node(Config {
        jwt_secret: Some(SECRET.into()),
        internal_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..test_config()
    })
    .await;
    let dir = std::env::temp_dir().join(format!("pubgate-haproxy-surface-{:08x}", rand_u32()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port, stats_port) = (free_port(), free_port());
    let rendered = std::process::Command::new("bash")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/haproxy/render-local.sh"))
        .args([
            port.to_string(),
            stats_port.to_string(),
            node.addr.port().to_string(),
        ])
        .env("HAPROXY_CHECK_INTER", "250ms")
        .output()
        .expect("run render-local.sh");
    assert!(rendered.status.success());
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, &rendered.stdout).unwrap();
    // `log stdout` in the shipped config: the access log is HAProxy's stdout.
    let log = dir.join("access.log");
    let mut haproxy = Command::new("haproxy")
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("haproxy on PATH (Debian package haproxy; .ci/run installs it)");
    let lb = format!("127.0.0.1:{port}").parse().unwrap();
    let stats = format!("127.0.0.1:{stats_port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let up = match tokio::net::TcpStream::connect(stats).await {
            Ok(_) => http_get(stats, "/;csv").await.1.contains(",UP,"),
            Err(_) => false,
        };
        if up {
            break;
        }
        assert!(Instant::now() < deadline, "haproxy backend never UP");
        sleep(Duration::from_millis(100)).await;
    }

    // Refused by HAProxy itself: nothing of the node's answers comes back.
    for path in [
        "/metrics",
        "/api/publish",
        "/healthz",
        "/readyz",
        "/",
        "/ws/../metrics",
    ] {
        let (status, body) = http_get(lb, path).await;
        assert_eq!(status, 404, "{path} through the LB: {body}");
        assert!(!body.contains("pubgate_"), "{path}: {body}");
    }
    // The node itself still serves them where they belong.
    assert_eq!(http_get(node.internal.unwrap(), "/metrics").await.0, 200);

    let token = hs256(&json!({"sub":"alice","exp":now()+60,"subscribe":["*"]}));
    let mut client = Client::connect(&format!("ws://{lb}/ws?token={token}")).await;
    client.subscribe("news").await;
    drop(client);

    // HTTP log lines are written when the session ends: wait for the /ws one.
    let signature = token.rsplit('.').next().unwrap().to_owned();
    let deadline = Instant::now() + WAIT;
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.lines().any(|l| l.contains("GET /ws ")) {
            break text;
        }
        assert!(Instant::now() < deadline, "no log line for /ws in:\n{text}");
        sleep(Duration::from_millis(50)).await;
    };
    assert!(
        text.lines()
            .any(|l| l.contains("GET /metrics ") && l.contains(" 404 ")),
        "{text}"
    );
    for line in text.lines() {
        assert!(
            !line.contains("token") && !line.contains(&signature) && !line.contains('?'),
            "a log line carries the query string: {line}"
        );
    }
    haproxy.kill().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
