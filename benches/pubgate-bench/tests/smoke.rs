//! Smoke run of every pubgate-bench scenario at small size against a node started in this test
//! process (and the bare-writer baseline the tool spawns itself): deliveries arrive, the JSON
//! report parses. Each run takes a couple of seconds.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use pubgate::{Config, Server};
use serde_json::Value;
use tokio::sync::oneshot;

/// A node on 127.0.0.1:0 in this test process, running until dropped.
struct TestNode {
    url: String,
    _stop: oneshot::Sender<()>,
}

impl TestNode {
    fn ws_url(&self) -> String {
        self.url.clone()
    }
}

/// The config the tool's runs need: loopback, port 0, no per-connection rate limit (the tool
/// publishes faster than the default).
fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        node_id: Some(format!("bench-smoke-{}", std::process::id())),
        rate_limit: 0,
        ..Config::default()
    }
}

async fn start_node(config: Config) -> TestNode {
    let server = Server::bind(config).await.expect("node binds");
    let url = format!("ws://{}/ws", server.local_addr());
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = rx.await;
    }));
    TestNode { url, _stop: tx }
}

/// Runs the tool in a blocking thread (the node keeps serving on the test's runtime) and returns
/// its JSON report.
async fn bench(name: &str, args: &[&str]) -> Value {
    let json: PathBuf = std::env::temp_dir().join(format!(
        "pubgate-bench-smoke-{name}-{}.json",
        std::process::id()
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pubgate-bench"));
    cmd.args(args)
        .args(["--quiet", "--settle", "200ms", "--json"])
        .arg(&json);
    let started = Instant::now();
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("pubgate-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "pubgate-bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{name} took {:?}",
        started.elapsed()
    );
    let text = std::fs::read_to_string(&json).expect("the JSON report is written");
    let _ = std::fs::remove_file(&json);
    let report: Value = serde_json::from_str(&text).expect("the JSON report parses");
    assert!(
        stdout.contains("pubgate-bench"),
        "the table is printed: {stdout}"
    );
    report
}

fn run<'a>(report: &'a Value, target: &str) -> &'a Value {
    report["runs"]
        .as_array()
        .expect("runs")
        .iter()
        .find(|r| r["target"] == target)
        .unwrap_or_else(|| panic!("no {target} run in {report}"))
}

fn assert_all_delivered(run: &Value, connections: u64) {
    assert_eq!(run["connections_open"], connections, "{run}");
    let step = &run["steps"][0];
    let deliveries = step["deliveries"].as_u64().unwrap();
    let expected = step["expected_deliveries"].as_u64().unwrap();
    assert!(deliveries > 0, "no deliveries: {step}");
    assert_eq!(
        deliveries, expected,
        "every published message reached every subscriber: {step}"
    );
    assert!(step["latency"]["p99_us"].as_f64().unwrap() > 0.0, "{step}");
    assert!(
        step["latency"]["count"].as_u64().unwrap() == deliveries,
        "{step}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_against_an_in_process_node_and_the_baseline() {
    let node = start_node(test_config()).await;
    let url = node.ws_url();
    let report = bench(
        "fanout",
        &[
            "fanout",
            "--url",
            &url,
            "-c",
            "50",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--target",
            "both",
        ],
    )
    .await;
    assert_eq!(report["scenario"], "fanout");
    assert_all_delivered(run(&report, "pubgate"), 50);
    assert_all_delivered(run(&report, "baseline"), 50);
    // CPU and RSS of the in-process node come from its /metrics.
    assert_eq!(
        run(&report, "pubgate")["steps"][0]["server"]["source"],
        "metrics"
    );
    assert!(report["ratios"]["deliveries_per_s"][0].as_f64().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_spreads_connections_over_channels() {
    let node = start_node(test_config()).await;
    let url = node.ws_url();
    let report = bench(
        "channels",
        &[
            "channels",
            "--url",
            &url,
            "-c",
            "50",
            "--channels",
            "5",
            "--rate",
            "50",
            "--duration",
            "1s",
            "--sources",
            "2",
        ],
    )
    .await;
    assert_eq!(report["channels"], 5);
    assert_all_delivered(run(&report, "pubgate"), 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_reports_memory_per_connection() {
    let node = start_node(test_config()).await;
    let url = node.ws_url();
    let report = bench(
        "idle",
        &[
            "idle",
            "--url",
            &url,
            "-c",
            "50",
            "--duration",
            "500ms",
            "--workers",
            "2",
        ],
    )
    .await;
    let run = run(&report, "pubgate");
    assert_eq!(run["connections_open"], 50);
    assert_eq!(run["connect_errors"], 0);
    assert!(run["connect_rate_per_s"].as_f64().unwrap() > 0.0);
    assert!(run["rss_connected_bytes"].as_u64().unwrap() > 0, "{run}");
    assert_eq!(run["steps"][0]["open_at_end"], 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_cycles_connections() {
    let node = start_node(test_config()).await;
    let url = node.ws_url();
    let report = bench(
        "churn",
        &[
            "churn",
            "--url",
            &url,
            "-c",
            "10",
            "--rate",
            "40",
            "--duration",
            "1s",
            "--target",
            "both",
        ],
    )
    .await;
    for target in ["pubgate", "baseline"] {
        let step = &run(&report, target)["steps"][0];
        let cycles = step["cycles"].as_u64().unwrap();
        assert!(cycles >= 20, "{target}: {step}");
        assert_eq!(step["cycle_errors"], 0, "{target}: {step}");
        assert!(step["cycle_latency"]["p99_us"].as_f64().unwrap() > 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_node_with_redis_publishing() {
    // --nodes 2 spawns target/release/pubgate... only when it exists and redis-server is on PATH;
    // the in-process runs above cover the tool itself.
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_pubgate-bench")).with_file_name("pubgate");
    let redis = Command::new("redis-server")
        .arg("--version")
        .output()
        .is_ok();
    if !bin.exists() || !redis {
        eprintln!("skipped: no {} or no redis-server", bin.display());
        return;
    }
    let report = bench(
        "spawned",
        &[
            "fanout",
            "--nodes",
            "2",
            "-c",
            "40",
            "--rate",
            "20",
            "--duration",
            "1s",
        ],
    )
    .await;
    let run = run(&report, "pubgate");
    assert_eq!(run["publish_via"], "redis");
    assert_eq!(run["nodes"], 2);
    assert_all_delivered(run, 40);
    assert!(run["steps"][0]["redis"]["cpu_s"].as_f64().is_some());
}

/// Whether Debian's nginx with the Nchan module is installed (.ci/run installs it).
fn nchan_installed() -> bool {
    let found = std::path::Path::new("/usr/sbin/nginx").is_file()
        && std::path::Path::new("/usr/lib/nginx/modules/ngx_nchan_module.so").is_file();
    if !found {
        eprintln!("skipped: no nginx with Nchan (apt-get install nginx libnginx-mod-nchan)");
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nchan_on_two_nodes_sharing_redis() {
    if !nchan_installed() {
        return;
    }
    let report = bench(
        "nchan-fanout",
        &[
            "fanout",
            "--target",
            "nchan",
            "--nodes",
            "2",
            "-c",
            "40",
            "--rate",
            "20",
            "--duration",
            "1s",
        ],
    )
    .await;
    let run = run(&report, "nchan");
    assert_eq!(run["publish_via"], "http");
    assert_eq!(run["nodes"], 2);
    // Half the messages are posted to each instance: they reach the other's subscribers only
    // through Redis.
    assert_all_delivered(run, 40);
    let step = &run["steps"][0];
    assert!(step["redis"]["cpu_s"].as_f64().is_some(), "{step}");
    // Two masters with at least one worker each.
    let pids = step["server"]["pids"].as_array().unwrap();
    assert!(pids.len() >= 4, "{step}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nchan_alone_on_its_memory_store() {
    if !nchan_installed() {
        return;
    }
    let report = bench(
        "nchan-channels",
        &[
            "channels",
            "--target",
            "nchan",
            "-c",
            "50",
            "--channels",
            "5",
            "--rate",
            "50",
            "--duration",
            "1s",
            "--nchan-workers",
            "2",
        ],
    )
    .await;
    let run = run(&report, "nchan");
    assert_eq!(run["nodes"], 1);
    assert_all_delivered(run, 50);
    assert!(run["steps"][0]["redis"].is_null(), "{run}");
    assert_eq!(
        run["steps"][0]["server"]["pids"].as_array().unwrap().len(),
        3
    );
}
