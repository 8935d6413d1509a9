//! Command line: `pubgate-bench <scenario> [options]`, plus the bare-writer server and the hidden
//! worker entry point the tool re-executes itself as.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "pubgate-bench",
    version,
    about = "Load generator for pubgate: fan-out, latency, memory and connection capacity, \
             side by side with a bare-writer baseline"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One channel, N subscribers; messages published at --rate.
    Fanout(RunArgs),
    /// N connections over M channels (conn i subscribes channel i mod M); --rate spread over them.
    Channels(RunArgs),
    /// N idle subscribed connections: memory per connection.
    Idle(RunArgs),
    /// Connect + subscribe + disconnect cycles at --rate per second (beside --connections standing).
    Churn(RunArgs),
    /// Run the bare-writer baseline server alone (what `--target baseline` spawns).
    BareServer(BareArgs),
    /// Internal: a load-generating worker process driven over stdin/stdout.
    #[command(name = "__worker", hide = true)]
    Worker,
}

/// A server a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Target {
    /// The pubgate gateway (spawned or --url).
    Pubgate,
    /// The bare writer built into this tool.
    Baseline,
    /// Nginx with the Nchan module, spawned by the tool (src/nchan.rs).
    Nchan,
}

impl Target {
    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Target::Pubgate => "pubgate",
            Target::Baseline => "baseline",
            Target::Nchan => "nchan",
        }
    }
}

/// A value of `--target` (a comma list of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetArg {
    /// The pubgate gateway (spawned or --url).
    Pubgate,
    /// The bare writer built into this tool.
    Baseline,
    /// Nginx + Nchan (Debian `nginx` and `libnginx-mod-nchan`), spawned by the tool.
    Nchan,
    /// pubgate and the bare writer.
    Both,
    /// pubgate, the bare writer and Nchan.
    All,
}

impl RunArgs {
    /// The targets to measure, each once, in a fixed order: pubgate first (under --saturate the
    /// others run their half-peak step at pubgate's rate), then the bare writer, then Nchan.
    pub fn targets(&self) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .target
            .iter()
            .flat_map(|t| match t {
                TargetArg::Pubgate => vec![Target::Pubgate],
                TargetArg::Baseline => vec![Target::Baseline],
                TargetArg::Nchan => vec![Target::Nchan],
                TargetArg::Both => vec![Target::Pubgate, Target::Baseline],
                TargetArg::All => vec![Target::Pubgate, Target::Baseline, Target::Nchan],
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// How messages are published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// Redis when the gateway has Redis (spawned --nodes > 1 or --redis-url), else WebSocket.
    Auto,
    /// `PUBLISH <prefix><channel>` on Redis.
    Redis,
    /// `{"type":"publish"}` over a WebSocket connection.
    Ws,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// Gateway WebSocket URL (repeatable; connections are spread round-robin). Without it the
    /// tool spawns its own nodes (--nodes).
    #[arg(long)]
    pub url: Vec<String>,

    /// Spawn this many local pubgate nodes (memory broker for 1, a private redis-server for more).
    #[arg(long, visible_alias = "spawn", default_value_t = 1)]
    pub nodes: usize,

    /// What to measure: a comma list of pubgate, baseline, nchan; `both` is pubgate,baseline and
    /// `all` is all three. Each is measured in turn under the same scenario, with ratios.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "pubgate")]
    pub target: Vec<TargetArg>,

    /// Connections (subscribers). Default: 1000 (fanout, idle), 10000 (channels), 100 (churn).
    #[arg(long, short = 'c')]
    pub connections: Option<usize>,

    /// Channels. Default: 1 (fanout, idle), 1000 (channels), 10 (churn).
    #[arg(long)]
    pub channels: Option<usize>,

    /// Messages per second in total (comma list: one measured step per rate on the same
    /// connections); churn: cycles per second. Default 100 (fanout), 1000 (channels), 50 (churn).
    #[arg(long, value_delimiter = ',')]
    pub rate: Vec<f64>,

    /// Ramp the rate x1.5 per step from the first --rate until deliveries/s stop growing, then run
    /// one more step at half the peak rate (the latency figure).
    #[arg(long)]
    pub saturate: bool,

    /// Measured time of each step (idle: how long connections are held).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Pad each published payload to at least this many bytes.
    #[arg(long, default_value_t = 0)]
    pub payload_size: usize,

    /// How to publish.
    #[arg(long, value_enum, default_value_t = PublishVia::Auto)]
    pub publish_via: PublishVia,

    /// Publisher connections: WebSocket ones (ws publishing, default 1), or HTTP ones per Nchan
    /// instance (default 4: nginx answers a connection's pipelined POSTs one after the other, each
    /// after its fan-out, so one connection would cap Nchan's publish rate).
    #[arg(long)]
    pub publishers: Option<usize>,

    /// Redis of an external gateway (--url), for --publish-via redis; with spawned nodes, the
    /// Redis they use instead of a private one.
    #[arg(long)]
    pub redis_url: Option<String>,

    /// Seed URLs (comma list) of a Redis Cluster: spawned nodes run in cluster mode on it
    /// (PUBGATE_REDIS_CLUSTER_URLS) and Redis publishing uses SPUBLISH, routed by slot.
    #[arg(long)]
    pub redis_cluster: Option<String>,

    /// The gateway's PUBGATE_CHANNEL_PREFIX.
    #[arg(long, default_value = "pubgate:")]
    pub channel_prefix: String,

    /// Channel names are `<name>-<n>`.
    #[arg(long, default_value = "bench")]
    pub channel_name: String,

    /// Worker processes (each under the 20k fd limit). Default: enough for 15k connections each,
    /// at least 2 from 1000 connections on.
    #[arg(long)]
    pub workers: Option<usize>,

    /// Most connections one worker process opens.
    #[arg(long, default_value_t = 15000)]
    pub per_worker: usize,

    /// Loopback source addresses 127.0.0.2.. to bind connections to (0: let the OS choose).
    #[arg(long, default_value_t = 8)]
    pub sources: usize,

    /// Handshakes in flight per worker.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,

    /// Upper bound for opening all connections.
    #[arg(long, default_value = "180s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// Wait after connecting before memory is read and publishing starts.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub settle: Duration,

    /// Pid of an external gateway process (repeatable) for RSS and CPU; without it they are read
    /// from each --url's /metrics.
    #[arg(long)]
    pub gateway_pid: Vec<u32>,

    /// The pubgate binary to spawn. Default: `pubgate` beside this tool, else target/release/pubgate.
    #[arg(long)]
    pub pubgate_bin: Option<PathBuf>,

    /// PUBGATE_SEND_QUEUE of spawned nodes (and the baseline's queue).
    #[arg(long)]
    pub send_queue: Option<usize>,

    /// PUBGATE_PING_INTERVAL of spawned nodes (e.g. 5m for idle runs).
    #[arg(long)]
    pub ping_interval: Option<String>,

    /// History on: PUBGATE_HISTORY_SIZE of spawned nodes, and Redis publishing goes through
    /// `FCALL pubgate_publish` (positioned, kept) instead of `PUBLISH`. 0 = off.
    #[arg(long, default_value_t = 0)]
    pub history_size: usize,

    /// Extra environment of spawned nodes, KEY=VALUE (repeatable).
    #[arg(long)]
    pub node_env: Vec<String>,

    /// Nchan target: the nginx binary (Debian's `nginx` package).
    #[arg(long, default_value = "/usr/sbin/nginx")]
    pub nginx_bin: PathBuf,

    /// Nchan target: the module nginx loads (Debian's libnginx-mod-nchan path by default).
    #[arg(long, default_value = "/usr/lib/nginx/modules/ngx_nchan_module.so")]
    pub nchan_module: PathBuf,

    /// Nchan target: nginx worker processes per instance. Default: `worker_processes auto`, one
    /// per core, as a pubgate node's runtime has one worker thread per core.
    #[arg(long)]
    pub nchan_workers: Option<usize>,

    /// Nchan target: messages each channel keeps (`nchan_message_buffer_length`). 0 keeps none,
    /// as pubgate without history; a new subscriber then gets live messages only.
    #[arg(long, default_value_t = 0)]
    pub nchan_buffer: usize,

    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// No progress line.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

#[derive(Args, Debug, Clone)]
pub struct BareArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Frames queued per connection when its socket is full before it is dropped as slow.
    #[arg(long, default_value_t = 1024)]
    pub send_queue: usize,
    /// Runtime worker threads (default: one per core, as pubgate).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        if secs >= 0.0 && secs.is_finite() {
            return Ok(Duration::from_secs_f64(secs));
        }
    }
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// A scenario with its defaults resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Fanout,
    Channels,
    Idle,
    Churn,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Fanout => "fanout",
            Scenario::Channels => "channels",
            Scenario::Idle => "idle",
            Scenario::Churn => "churn",
        }
    }

    pub fn default_connections(self) -> usize {
        match self {
            Scenario::Fanout | Scenario::Idle => 1000,
            Scenario::Channels => 10_000,
            Scenario::Churn => 100,
        }
    }

    pub fn default_channels(self) -> usize {
        match self {
            Scenario::Fanout | Scenario::Idle => 1,
            Scenario::Channels => 1000,
            Scenario::Churn => 10,
        }
    }

    pub fn default_rate(self) -> f64 {
        match self {
            Scenario::Fanout => 100.0,
            Scenario::Channels => 1000.0,
            Scenario::Idle => 0.0,
            Scenario::Churn => 50.0,
        }
    }

    /// Whether the scenario publishes messages.
    pub fn publishes(self) -> bool {
        matches!(self, Scenario::Fanout | Scenario::Channels)
    }
}
