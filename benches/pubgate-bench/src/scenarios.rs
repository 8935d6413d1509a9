//! Runs a scenario against each target: servers up, connections open through the worker pool,
//! memory read, measured steps (publishing, holding idle, or churning), servers down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cli::{self, PublishVia, RunArgs, Scenario, Target};
use crate::client::{self, now_ns, Protocol};
use crate::ipc::{Cmd, Counters, Job};
use crate::nchan::{self, Nginx, NginxOptions};
use crate::pool::{self, Pool};
use crate::procstat::{self, Probe, Sample};
use crate::publisher::Publisher;
use crate::spawn::{self, NodeOptions, Redis, Spawned};
use crate::stats::{decode_hist, new_hist, Latency, Machine, Report, Run, Step};

/// Most steps of a --saturate ramp (the half-peak step comes on top).
const MAX_RAMP_STEPS: usize = 14;
/// A ramp step must beat the best so far by this factor to continue.
const RAMP_GAIN: f64 = 1.05;
/// Send queue of spawned servers under --saturate (unless --send-queue): an overloaded step
/// should show in latency and deliveries/s, not in slow-consumer disconnects.
const SATURATE_SEND_QUEUE: usize = 65_536;
/// Longest wait for deliveries still in flight after a step's publishing ends.
const MAX_DRAIN: Duration = Duration::from_secs(15);
/// HTTP publisher connections per Nchan instance without --publishers (see there).
const NCHAN_PUBLISHERS: usize = 4;
/// Nchan's WebSocket ping interval without --ping-interval: pubgate's default.
const NCHAN_DEFAULT_PING: Duration = Duration::from_secs(25);

/// Everything resolved from the command line.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub connections: usize,
    pub channels: usize,
    pub rates: Vec<f64>,
    pub workers: usize,
    pub args: RunArgs,
}

impl Plan {
    pub fn new(scenario: Scenario, args: RunArgs) -> Result<Plan, String> {
        let connections = args
            .connections
            .unwrap_or_else(|| scenario.default_connections());
        let channels = args
            .channels
            .unwrap_or_else(|| scenario.default_channels())
            .max(1);
        let mut rates = args.rate.clone();
        if rates.is_empty() {
            rates.push(scenario.default_rate());
        }
        if rates.iter().any(|r| !r.is_finite() || *r < 0.0) {
            return Err("--rate must be non-negative numbers".into());
        }
        if scenario.publishes() && rates.iter().any(|r| *r <= 0.0) {
            return Err(format!("{} needs a --rate above 0", scenario.name()));
        }
        if scenario.publishes() && connections == 0 {
            return Err("--connections must be at least 1".into());
        }
        let per = args.per_worker.clamp(1, 19_000);
        let needed = connections.div_ceil(per).max(1);
        let workers = args
            .workers
            .unwrap_or(if connections >= 1000 {
                needed.max(2)
            } else {
                needed
            })
            .max(needed)
            .max(1);
        if args.sources > 250 {
            return Err("--sources is at most 250 (127.0.0.2..127.0.0.251)".into());
        }
        if args.nodes == 0 {
            return Err("--nodes must be at least 1".into());
        }
        for url in &args.url {
            client::Target::parse(url)?;
        }
        if args.targets().contains(&Target::Nchan) {
            if args.redis_cluster.is_some() {
                return Err("the nchan target does not run on a Redis Cluster".into());
            }
            if args.history_size > 0 {
                return Err("the nchan target has no pubgate history: drop --history-size".into());
            }
            nchan::check_installed(&args.nginx_bin, &args.nchan_module)?;
        }
        Ok(Plan {
            scenario,
            connections,
            channels,
            rates,
            workers,
            args,
        })
    }

    fn jobs(&self, urls: &[String], protocol: Protocol) -> Vec<Job> {
        let base = self.connections / self.workers;
        let extra = self.connections % self.workers;
        let mut first = 0;
        (0..self.workers)
            .map(|w| {
                let count = base + usize::from(w < extra);
                let job = Job {
                    worker: w,
                    workers: self.workers,
                    scenario: self.scenario,
                    urls: urls.to_vec(),
                    first,
                    count,
                    channels: self.channels,
                    channel_name: self.args.channel_name.clone(),
                    sources: self.args.sources,
                    concurrency: self.args.connect_concurrency,
                    connect_timeout_ms: 10_000,
                    protocol,
                };
                first += count;
                job
            })
            .collect()
    }

    /// Subscribers of channel `c` (connection i subscribes channel i mod channels).
    fn subscribers(&self, c: usize) -> u64 {
        let n =
            self.connections / self.channels + usize::from(c < self.connections % self.channels);
        n as u64
    }

    fn send_queue(&self) -> Option<usize> {
        self.args
            .send_queue
            .or(self.args.saturate.then_some(SATURATE_SEND_QUEUE))
    }
}

/// Runs the plan against every requested target.
pub async fn run(plan: Plan) -> Result<Report, String> {
    let mut report = Report {
        tool: format!("pubgate-bench {}", env!("CARGO_PKG_VERSION")),
        scenario: plan.scenario.name().into(),
        started_unix_s: now_ns() / 1_000_000_000,
        machine: Machine::probe(),
        connections: plan.connections,
        channels: plan.channels,
        nodes: if plan.args.url.is_empty() {
            plan.args.nodes
        } else {
            plan.args.url.len()
        },
        payload_size: plan.args.payload_size,
        workers: plan.workers,
        sources: plan.args.sources,
        ..Report::default()
    };
    let mut half_rate = None;
    for target in plan.args.targets() {
        let run = run_target(&plan, target, half_rate).await?;
        if target == Target::Pubgate {
            half_rate = run.steps.iter().find(|s| s.half_peak).map(|s| s.rate);
        }
        report.runs.push(run);
    }
    report.compute_ratios();
    Ok(report)
}

/// The servers of one target and how to watch them.
struct Servers {
    urls: Vec<String>,
    probe: Probe,
    spawned: Vec<Spawned>,
    nginx: Vec<Nginx>,
    redis: Option<Redis>,
    redis_url: Option<String>,
}

impl Servers {
    async fn stop(self) {
        for s in self.spawned {
            s.stop().await;
        }
        for n in self.nginx {
            n.stop().await;
        }
        if let Some(r) = self.redis {
            r.stop().await;
        }
    }

    fn redis_probe(&self) -> Option<Probe> {
        self.redis.as_ref().map(|r| Probe::Pids(vec![r.pid]))
    }
}

async fn start_servers(plan: &Plan, target: Target) -> Result<Servers, String> {
    let args = &plan.args;
    let nodes = args.nodes;
    if target == Target::Baseline {
        let mut spawned = Vec::new();
        for i in 0..nodes {
            spawned.push(spawn::start_bare(i, plan.send_queue().unwrap_or(1024)).await?);
        }
        return Ok(Servers {
            urls: spawned.iter().map(Spawned::ws_url).collect(),
            probe: Probe::Pids(spawned.iter().map(|s| s.pid).collect()),
            spawned,
            nginx: Vec::new(),
            redis: None,
            redis_url: None,
        });
    }
    if target == Target::Nchan {
        return start_nchan(plan).await;
    }
    if !args.url.is_empty() {
        let probe = if args.gateway_pid.is_empty() {
            let addrs: Vec<SocketAddr> = args
                .url
                .iter()
                .map(|u| client::Target::parse(u).map(|t| t.http_addr()))
                .collect::<Result<_, _>>()?;
            Probe::Metrics(addrs)
        } else {
            Probe::Pids(args.gateway_pid.clone())
        };
        return Ok(Servers {
            urls: args.url.clone(),
            probe,
            spawned: Vec::new(),
            nginx: Vec::new(),
            redis: None,
            redis_url: args.redis_url.clone(),
        });
    }
    let external = args.redis_url.is_some() || args.redis_cluster.is_some();
    let redis = if nodes > 1 && !external {
        Some(Redis::start().await?)
    } else {
        None
    };
    let node_redis_url = redis.as_ref().map(Redis::url).or(args.redis_url.clone());
    let mut opts = NodeOptions {
        bin: spawn::pubgate_bin(args.pubgate_bin.as_deref()),
        redis_url: node_redis_url.clone(),
        send_queue: plan.send_queue(),
        ping_interval: args.ping_interval.clone(),
        extra_env: args
            .node_env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| format!("--node-env {kv}: expected KEY=VALUE"))
            })
            .collect::<Result<_, _>>()?,
    };
    if args.history_size > 0 {
        opts.extra_env
            .push(("PUBGATE_HISTORY_SIZE".into(), args.history_size.to_string()));
    }
    if let Some(seeds) = &args.redis_cluster {
        opts.redis_url = None;
        opts.extra_env
            .push(("PUBGATE_REDIS_CLUSTER_URLS".into(), seeds.clone()));
    }
    if !opts.bin.exists() {
        return Err(format!(
            "{} not found: run `cargo build --release` or pass --pubgate-bin",
            opts.bin.display()
        ));
    }
    let mut spawned = Vec::new();
    for i in 0..nodes {
        match spawn::start_node(i, &opts).await {
            Ok(n) => spawned.push(n),
            Err(e) => {
                for s in spawned {
                    s.stop().await;
                }
                if let Some(r) = redis {
                    r.stop().await;
                }
                return Err(e);
            }
        }
    }
    Ok(Servers {
        urls: spawned.iter().map(Spawned::ws_url).collect(),
        probe: Probe::Pids(spawned.iter().map(|s| s.pid).collect()),
        redis_url: node_redis_url,
        spawned,
        nginx: Vec::new(),
        redis,
    })
}

/// `--nodes` nginx instances: the memory store for one, a shared Redis (private unless
/// --redis-url) for more.
async fn start_nchan(plan: &Plan) -> Result<Servers, String> {
    let args = &plan.args;
    let nodes = args.nodes;
    let redis = if nodes > 1 && args.redis_url.is_none() {
        Some(Redis::start().await?)
    } else {
        None
    };
    let redis_url = if nodes > 1 {
        redis.as_ref().map(Redis::url).or(args.redis_url.clone())
    } else {
        None
    };
    let churn_margin = if plan.scenario == Scenario::Churn {
        4096
    } else {
        0
    };
    let ping = match &args.ping_interval {
        Some(p) => cli::parse_duration(p)?,
        None => NCHAN_DEFAULT_PING,
    };
    let opts = NginxOptions {
        bin: args.nginx_bin.clone(),
        module: args.nchan_module.clone(),
        workers: args.nchan_workers,
        connections: plan.connections.div_ceil(nodes) + churn_margin,
        redis_url: redis_url.clone(),
        buffer: args.nchan_buffer,
        ping_interval: ping,
    };
    let mut instances = Vec::new();
    for i in 0..nodes {
        match nchan::start(i, &opts).await {
            Ok(n) => instances.push(n),
            Err(e) => {
                for n in instances {
                    n.stop().await;
                }
                if let Some(r) = redis {
                    r.stop().await;
                }
                return Err(e);
            }
        }
    }
    Ok(Servers {
        urls: instances.iter().map(Nginx::ws_url).collect(),
        probe: Probe::Pids(instances.iter().flat_map(|n| n.pids().to_vec()).collect()),
        spawned: Vec::new(),
        nginx: instances,
        redis,
        redis_url,
    })
}

async fn run_target(plan: &Plan, target: Target, half_rate: Option<f64>) -> Result<Run, String> {
    let mut servers = start_servers(plan, target).await?;
    let mut result = measure(plan, target, &servers, half_rate).await;
    for s in &mut servers.spawned {
        if let Err(e) = s.check_alive() {
            result = Err(e);
        }
    }
    for n in &mut servers.nginx {
        if let Err(e) = n.check_alive() {
            result = Err(e);
        }
    }
    servers.stop().await;
    result
}

/// Prints a progress line every second while alive.
struct Ticker {
    label: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl Ticker {
    fn start(quiet: bool, name: String, progress: Arc<Mutex<Vec<Counters>>>) -> Ticker {
        let label = Arc::new(Mutex::new(String::from("connecting")));
        let l = label.clone();
        let task = tokio::spawn(async move {
            if quiet {
                return;
            }
            let start = Instant::now();
            let mut last = Counters::default();
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.tick().await;
            loop {
                every.tick().await;
                let c = pool::sum(progress.lock().unwrap_or_else(|e| e.into_inner()).iter());
                let label = l.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let per_s = c.deliveries.saturating_sub(last.deliveries);
                eprintln!(
                    "[{name} {:>4}s] {label}: open {} deliveries {} ({per_s}/s) closed {} errors {} cycles {}",
                    start.elapsed().as_secs(),
                    c.open,
                    c.deliveries,
                    c.closed,
                    c.server_errors + c.cycle_errors,
                    c.cycles
                );
                last = c;
            }
        });
        Ticker { label, task }
    }

    fn set(&self, label: String) {
        *self.label.lock().unwrap_or_else(|e| e.into_inner()) = label;
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn measure(
    plan: &Plan,
    target: Target,
    servers: &Servers,
    half_rate: Option<f64>,
) -> Result<Run, String> {
    let args = &plan.args;
    let name = target.name();
    let mut publisher = None;
    let mut via = String::from("-");
    if plan.scenario.publishes() {
        let p = match (target, args.publish_via, &servers.redis_url) {
            (Target::Baseline, _, _) => Publisher::ws(&servers.urls, 1, true).await?,
            (Target::Nchan, _, _) => {
                let addrs: Vec<SocketAddr> = servers.nginx.iter().map(|n| n.addr).collect();
                Publisher::http(&addrs, args.publishers.unwrap_or(NCHAN_PUBLISHERS)).await?
            }
            (_, PublishVia::Redis | PublishVia::Auto, _) if args.redis_cluster.is_some() => {
                let seeds = args.redis_cluster.as_deref().unwrap_or_default();
                Publisher::redis_cluster(seeds, &args.channel_prefix, args.history_size > 0).await?
            }
            (_, PublishVia::Redis, None) => {
                return Err("--publish-via redis needs --redis-url or --nodes > 1".into())
            }
            (_, PublishVia::Redis | PublishVia::Auto, Some(url)) => {
                Publisher::redis(url, &args.channel_prefix, args.history_size > 0).await?
            }
            _ => Publisher::ws(&servers.urls, args.publishers.unwrap_or(1), false).await?,
        };
        via = p.via().into();
        publisher = Some(p);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = servers.probe.per_process().await;

    let protocol = if target == Target::Nchan {
        Protocol::Nchan
    } else {
        Protocol::Pubgate
    };
    let mut pool = Pool::spawn(plan.jobs(&servers.urls, protocol)).await?;
    let ticker = Ticker::start(args.quiet, name.to_string(), pool.progress());
    ticker.set(format!("connecting {} connections", plan.connections));
    let connect_start = Instant::now();
    let ready = pool.wait_ready(args.connect_timeout).await;
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            pool.shutdown().await;
            return Err(e);
        }
    };
    let connect_wall = connect_start.elapsed().as_secs_f64();
    let mut connect_hist = new_hist();
    for r in &ready {
        if let Ok(h) = decode_hist(&r.connect_hist) {
            let _ = connect_hist.add(&h);
        }
    }
    let open: u64 = ready.iter().map(|r| r.open).sum();
    let connect_s = ready.iter().map(|r| r.connect_s).fold(0.0, f64::max);
    let mut run = Run {
        target: name.into(),
        urls: servers.urls.clone(),
        nodes: servers.urls.len(),
        publish_via: via,
        connections: plan.connections,
        connections_open: open,
        connect_errors: ready.iter().map(|r| r.failed).sum(),
        connect_s,
        connect_rate_per_s: if connect_s > 0.0 {
            open as f64 / connect_s
        } else {
            0.0
        },
        connect_latency: Latency::of(&connect_hist),
        connect_first_error: ready.iter().find_map(|r| r.first_error.clone()),
        ..Run::default()
    };
    let _ = connect_wall;
    ticker.set("settling".into());
    tokio::time::sleep(args.settle).await;
    let rss_connected = servers.probe.per_process().await;
    run.rss_before_bytes = rss_before.iter().map(|s| s.rss).sum();
    run.rss_connected_bytes = rss_connected.iter().map(|s| s.rss).sum();
    run.rss_per_node_bytes = rss_connected.iter().map(|s| s.rss).collect();
    if open > 0 {
        run.rss_per_connection_bytes =
            (run.rss_connected_bytes as f64 - run.rss_before_bytes as f64) / open as f64;
    }

    let mut ctx = StepCtx {
        plan,
        servers,
        pool: &mut pool,
        publisher: publisher.as_mut(),
        ticker: &ticker,
    };
    let steps = match plan.scenario {
        Scenario::Idle => vec![ctx.step(0.0, false).await?],
        Scenario::Churn => {
            let mut v = Vec::new();
            for &r in &plan.rates {
                v.push(ctx.step(r, false).await?);
            }
            v
        }
        Scenario::Fanout | Scenario::Channels => {
            let mut v: Vec<Step> = Vec::new();
            if args.saturate {
                let mut rate = plan.rates[0];
                let mut best = 0.0f64;
                for _ in 0..MAX_RAMP_STEPS {
                    let s = ctx.step(rate, false).await?;
                    let grew = s.deliveries_per_s > best * RAMP_GAIN;
                    let healthy = s.closed_by_server == 0 && s.delivery_ratio > 0.9;
                    best = best.max(s.deliveries_per_s);
                    v.push(s);
                    if !grew || !healthy {
                        break;
                    }
                    rate *= 1.5;
                }
                let (peak_rate, _) = peak(&v);
                let half = half_rate.unwrap_or(peak_rate / 2.0);
                if half > 0.0 {
                    v.push(ctx.step(half, true).await?);
                }
            } else {
                for &r in &plan.rates {
                    v.push(ctx.step(r, false).await?);
                }
            }
            v
        }
    };
    let (peak_rate, peak_dps) = peak(&steps);
    run.peak_rate = peak_rate;
    run.peak_deliveries_per_s = peak_dps;
    run.steps = steps;
    drop(ticker);
    pool.shutdown().await;
    Ok(run)
}

/// (rate, deliveries/s) of the best step that kept every connection.
fn peak(steps: &[Step]) -> (f64, f64) {
    steps
        .iter()
        .filter(|s| !s.half_peak && s.closed_by_server == 0)
        .map(|s| (s.rate, s.deliveries_per_s))
        .fold((0.0, 0.0), |a, b| if b.1 > a.1 { b } else { a })
}

struct StepCtx<'a> {
    plan: &'a Plan,
    servers: &'a Servers,
    pool: &'a mut Pool,
    publisher: Option<&'a mut Publisher>,
    ticker: &'a Ticker,
}

impl StepCtx<'_> {
    async fn step(&mut self, rate: f64, half_peak: bool) -> Result<Step, String> {
        let plan = self.plan;
        let args = &plan.args;
        let redis_probe = self.servers.redis_probe();
        let mut loadgen_pids = self.pool.pids();
        loadgen_pids.push(std::process::id());
        let loadgen_probe = Probe::Pids(loadgen_pids);
        let server0 = self.servers.probe.sample().await;
        let redis0 = match &redis_probe {
            Some(p) => Some(p.sample().await),
            None => None,
        };
        let loadgen0 = loadgen_probe.sample().await;
        let machine0 = procstat::machine_cpu();
        let t0 = Instant::now();
        let start_ns = now_ns();
        let label = match plan.scenario {
            Scenario::Idle => "holding idle".to_string(),
            Scenario::Churn => format!("churn {rate:.1}/s"),
            _ => format!("publishing {rate:.1}/s"),
        };
        self.ticker.set(label);
        let churn_rate = if plan.scenario == Scenario::Churn {
            rate
        } else {
            0.0
        };
        self.pool
            .send(&Cmd::Start {
                rate: churn_rate,
                since_ns: start_ns,
            })
            .await?;
        let mut step = Step {
            rate,
            half_peak,
            ..Step::default()
        };
        if let Some(publisher) = self.publisher.as_deref_mut() {
            let p = publisher
                .run(
                    rate,
                    args.duration,
                    plan.channels,
                    &args.channel_name,
                    args.payload_size,
                )
                .await;
            step.published = p.sent;
            step.publish_errors = p.errors;
            step.published_per_s = p.sent as f64 / t0.elapsed().as_secs_f64();
            step.expected_deliveries = p
                .per_channel
                .iter()
                .enumerate()
                .map(|(c, n)| n * plan.subscribers(c))
                .sum();
            if let Some(e) = p.first_error {
                step.first_error = Some(format!("publish: {e}"));
            }
            self.ticker.set(format!("draining after {rate:.1}/s"));
            self.drain(step.expected_deliveries).await;
        } else {
            tokio::time::sleep(args.duration).await;
        }
        self.pool.send(&Cmd::Stop).await?;
        let done = self.pool.collect_done(Duration::from_secs(30)).await?;
        let secs = t0.elapsed().as_secs_f64();
        let server1 = self.servers.probe.sample().await;
        let loadgen1 = loadgen_probe.sample().await;
        let machine1 = procstat::machine_cpu();
        step.machine_busy_cores = (machine1.0 - machine0.0).max(0.0) / secs;
        step.machine_softirq_cores = (machine1.1 - machine0.1).max(0.0) / secs;
        step.server = procstat::usage(&self.servers.probe, server0, server1, secs);
        step.loadgen = procstat::usage(&loadgen_probe, loadgen0, loadgen1, secs);
        if let (Some(p), Some(r0)) = (&redis_probe, redis0) {
            let r1: Sample = p.sample().await;
            step.redis = Some(procstat::usage(p, r0, r1, secs));
        }
        let counters = pool::sum(done.iter().map(|d| &d.counters));
        let mut hist = new_hist();
        let mut cycle_hist = new_hist();
        for d in &done {
            if let Ok(h) = decode_hist(&d.hist) {
                let _ = hist.add(&h);
            }
            if let Ok(h) = decode_hist(&d.cycle_hist) {
                let _ = cycle_hist.add(&h);
            }
        }
        step.deliveries = counters.deliveries;
        step.late_deliveries = counters.late;
        step.latency = Latency::of(&hist);
        step.open_at_end = counters.open;
        step.closed_by_server = counters.closed;
        step.server_errors = counters.server_errors;
        step.cycles = counters.cycles;
        step.cycle_errors = counters.cycle_errors;
        step.cycle_latency = Latency::of(&cycle_hist);
        if step.first_error.is_none() {
            step.first_error = done.iter().find_map(|d| d.first_error.clone());
        }
        // The window of a publishing step runs from its start to its last delivery.
        let window = if plan.scenario.publishes() && counters.last_ns > start_ns {
            (counters.last_ns - start_ns) as f64 / 1e9
        } else {
            args.duration.as_secs_f64()
        };
        step.duration_s = window;
        step.deliveries_per_s = step.deliveries as f64 / window.max(1e-9);
        step.cycles_per_s = step.cycles as f64 / args.duration.as_secs_f64().max(1e-9);
        if step.expected_deliveries > 0 {
            step.delivery_ratio = step.deliveries as f64 / step.expected_deliveries as f64;
        }
        let units = if plan.scenario == Scenario::Churn {
            step.cycles
        } else {
            step.deliveries
        };
        if units > 0 {
            step.cpu_ns_per_delivery = step.server.cpu_s * 1e9 / units as f64;
            if step.server.context_switches >= 0 {
                step.context_switches_per_delivery =
                    step.server.context_switches as f64 / units as f64;
            }
        }
        Ok(step)
    }

    /// Waits until every expected delivery arrived, or deliveries stop growing for 1 s.
    async fn drain(&self, expected: u64) {
        let start = Instant::now();
        let mut last = self.pool.counters().deliveries;
        let mut still = Instant::now();
        while start.elapsed() < MAX_DRAIN {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = self.pool.counters().deliveries;
            if now >= expected {
                // Ticks come every 250 ms: let the last one land.
                tokio::time::sleep(Duration::from_millis(300)).await;
                return;
            }
            if now != last {
                last = now;
                still = Instant::now();
            } else if still.elapsed() >= Duration::from_secs(1) {
                return;
            }
        }
    }
}
