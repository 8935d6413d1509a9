//! Histograms, the report structure (also the JSON), and the table printed at the end.

use std::fmt::Write as _;

use base64::Engine;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::Serialize;

/// Nanoseconds, 1 ns to 100 s, 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

pub fn encode_hist(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialize to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_hist(s: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| e.to_string())?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("{e:?}"))
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// Resource use of a set of processes over a window.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Usage {
    pub pids: Vec<u32>,
    /// Where the figures came from: `proc` or `metrics`.
    pub source: String,
    pub cpu_s: f64,
    /// CPU seconds per wall second (1.0 = one core busy).
    pub cpu_cores: f64,
    pub rss_bytes: u64,
    /// Context switches of all threads in the window (from /proc/<pid>/task; -1 when unknown):
    /// task wake-ups that went to sleep, a proxy for batching.
    pub context_switches: i64,
}

/// One measured step (one publish rate, the idle hold, or the churn window).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Step {
    /// Target rate: messages/s (fanout, channels) or cycles/s (churn).
    pub rate: f64,
    pub duration_s: f64,
    pub published: u64,
    pub publish_errors: u64,
    pub published_per_s: f64,
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Deliveries of an earlier step's messages that arrived during this one (a backlog the
    /// earlier step's drain gave up on): in neither `deliveries` nor the latency figures.
    pub late_deliveries: u64,
    pub deliveries_per_s: f64,
    /// deliveries / expected_deliveries.
    pub delivery_ratio: f64,
    pub latency: Latency,
    pub server: Usage,
    /// Server CPU nanoseconds per delivery (per cycle for churn).
    pub cpu_ns_per_delivery: f64,
    pub context_switches_per_delivery: f64,
    pub redis: Option<Usage>,
    pub loadgen: Usage,
    /// Busy CPU of the whole machine in the window, in cores (everything: servers, load
    /// generator, Redis, kernel threads, other users of the machine).
    pub machine_busy_cores: f64,
    /// Of which softirq (loopback TCP receive processing not charged to a process).
    pub machine_softirq_cores: f64,
    pub open_at_end: u64,
    pub closed_by_server: u64,
    pub server_errors: u64,
    pub cycles: u64,
    pub cycle_errors: u64,
    pub cycles_per_s: f64,
    pub cycle_latency: Latency,
    pub first_error: Option<String>,
    /// Set on the step run at half of the peak rate (--saturate).
    pub half_peak: bool,
}

/// One target's run: connections, memory, steps.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub target: String,
    pub urls: Vec<String>,
    pub nodes: usize,
    pub publish_via: String,
    pub connections: usize,
    pub connections_open: u64,
    pub connect_errors: u64,
    pub connect_s: f64,
    pub connect_rate_per_s: f64,
    pub connect_latency: Latency,
    pub connect_first_error: Option<String>,
    pub rss_before_bytes: u64,
    pub rss_connected_bytes: u64,
    /// (RSS with every connection open - RSS before) / connections, over all nodes.
    pub rss_per_connection_bytes: f64,
    pub rss_per_node_bytes: Vec<u64>,
    pub steps: Vec<Step>,
    /// Highest deliveries/s of a step that kept every connection.
    pub peak_deliveries_per_s: f64,
    pub peak_rate: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_kb: u64,
    pub kernel: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_kb = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            cpu_model,
            mem_total_kb,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// One target's figure divided by another's (e.g. pubgate's by the bare writer's), per step index.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Ratios {
    pub cpu_per_delivery: Vec<Option<f64>>,
    pub deliveries_per_s: Vec<Option<f64>>,
    pub p99: Vec<Option<f64>>,
    pub peak_deliveries_per_s: Option<f64>,
    pub rss_per_connection: Option<f64>,
    pub cpu_per_cycle: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub tool: String,
    pub scenario: String,
    pub started_unix_s: u64,
    pub machine: Machine,
    pub connections: usize,
    pub channels: usize,
    pub nodes: usize,
    pub payload_size: usize,
    pub workers: usize,
    pub sources: usize,
    pub runs: Vec<Run>,
    /// pubgate / bare writer.
    pub ratios: Option<Ratios>,
    /// Nchan / bare writer.
    pub ratios_nchan: Option<Ratios>,
    /// pubgate / Nchan.
    pub ratios_pubgate_nchan: Option<Ratios>,
}

fn ratio(a: f64, b: f64) -> Option<f64> {
    (a.is_finite() && b.is_finite() && b > 0.0 && a > 0.0).then(|| a / b)
}

impl Ratios {
    /// `num`'s figures over `den`'s, step by step.
    fn between(num: &Run, den: &Run) -> Ratios {
        let pair = |f: &dyn Fn(&Step) -> f64| -> Vec<Option<f64>> {
            num.steps
                .iter()
                .zip(den.steps.iter())
                .map(|(a, b)| ratio(f(a), f(b)))
                .collect()
        };
        Ratios {
            cpu_per_delivery: pair(&|s| s.cpu_ns_per_delivery),
            deliveries_per_s: pair(&|s| s.deliveries_per_s),
            p99: pair(&|s| s.latency.p99_us),
            peak_deliveries_per_s: ratio(num.peak_deliveries_per_s, den.peak_deliveries_per_s),
            rss_per_connection: ratio(num.rss_per_connection_bytes, den.rss_per_connection_bytes),
            cpu_per_cycle: pair(&|s| {
                if s.cycles > 0 {
                    s.server.cpu_s * 1e9 / s.cycles as f64
                } else {
                    0.0
                }
            }),
        }
    }
}

impl Report {
    /// Fills the ratios of every pair of targets the run measured.
    pub fn compute_ratios(&mut self) {
        let run = |t: &str| self.runs.iter().find(|r| r.target == t);
        let of = |a: &str, b: &str| Some(Ratios::between(run(a)?, run(b)?));
        self.ratios = of("pubgate", "baseline");
        self.ratios_nchan = of("nchan", "baseline");
        self.ratios_pubgate_nchan = of("pubgate", "nchan");
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "pubgate-bench {}: {} connections, {} channel(s), {} node(s); machine: {} x {}, {} MiB, kernel {}",
            self.scenario,
            self.connections,
            self.channels,
            self.nodes,
            m.nproc,
            m.cpu_model,
            m.mem_total_kb / 1024,
            m.kernel
        );
        for run in &self.runs {
            let _ = writeln!(
                out,
                "\n[{}] {} node(s), publish via {}: {}/{} connections open, {} connect errors, \
                 {:.0} connects/s (p99 {:.1} ms); RSS {:.1} MiB -> {:.1} MiB = {:.0} B/connection",
                run.target,
                run.nodes,
                run.publish_via,
                run.connections_open,
                run.connections,
                run.connect_errors,
                run.connect_rate_per_s,
                run.connect_latency.p99_us / 1000.0,
                run.rss_before_bytes as f64 / 1048576.0,
                run.rss_connected_bytes as f64 / 1048576.0,
                run.rss_per_connection_bytes
            );
            if let Some(e) = &run.connect_first_error {
                let _ = writeln!(out, "  first connect error: {e}");
            }
            let churn = run.steps.iter().any(|s| s.cycles > 0 || s.cycle_errors > 0);
            if churn {
                let _ = writeln!(
                    out,
                    "  {:>8} {:>8} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8} {:>10}",
                    "rate/s",
                    "cycles",
                    "cycles/s",
                    "errors",
                    "p50 ms",
                    "p99 ms",
                    "max ms",
                    "cpu s",
                    "cpu us/cyc"
                );
                for s in &run.steps {
                    let _ =
                        writeln!(
                        out,
                        "  {:>8.0} {:>8} {:>9.1} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>8.2} {:>10.1}",
                        s.rate,
                        s.cycles,
                        s.cycles_per_s,
                        s.cycle_errors,
                        s.cycle_latency.p50_us / 1000.0,
                        s.cycle_latency.p99_us / 1000.0,
                        s.cycle_latency.max_us / 1000.0,
                        s.server.cpu_s,
                        if s.cycles > 0 { s.server.cpu_s * 1e6 / s.cycles as f64 } else { 0.0 }
                    );
                }
            } else {
                let _ = writeln!(
                    out,
                    "  {:>8} {:>9} {:>11} {:>10} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>8} {:>7} {:>6}",
                    "rate/s", "published", "deliveries", "deliv/s", "ratio", "p50 us", "p90 us", "p99 us",
                    "p999 us", "max us", "cpu s", "ns/deliv", "cs/dlv", "lost"
                );
                for s in &run.steps {
                    let _ = writeln!(
                        out,
                        "  {:>8.0} {:>9} {:>11} {:>10.0} {:>6.3} {:>8.0} {:>8.0} {:>8.0} {:>8.0} {:>9.0} {:>7.2} {:>8.0} {:>7.2} {:>6}{}",
                        s.rate,
                        s.published,
                        s.deliveries,
                        s.deliveries_per_s,
                        s.delivery_ratio,
                        s.latency.p50_us,
                        s.latency.p90_us,
                        s.latency.p99_us,
                        s.latency.p999_us,
                        s.latency.max_us,
                        s.server.cpu_s,
                        s.cpu_ns_per_delivery,
                        s.context_switches_per_delivery,
                        s.closed_by_server,
                        if s.half_peak { "  (half of peak)" } else { "" }
                    );
                }
                if run.steps.len() > 1 {
                    let _ = writeln!(
                        out,
                        "  peak: {:.0} deliveries/s at {:.0} msg/s",
                        run.peak_deliveries_per_s, run.peak_rate
                    );
                }
            }
            for s in &run.steps {
                if let Some(e) = &s.first_error {
                    let _ = writeln!(out, "  step {:.0}/s first error: {e}", s.rate);
                }
                if s.late_deliveries > 0 {
                    let _ = writeln!(
                        out,
                        "  step {:.0}/s: {} late deliveries of the step before (not counted)",
                        s.rate, s.late_deliveries
                    );
                }
            }
            if let Some(s) = run.steps.last() {
                let _ = write!(
                    out,
                    "  last step: server {:.2} cores, loadgen {:.2} cores, machine {:.2} busy ({:.2} softirq)",
                    s.server.cpu_cores, s.loadgen.cpu_cores, s.machine_busy_cores, s.machine_softirq_cores
                );
                if let Some(r) = &s.redis {
                    let _ = write!(out, ", redis {:.2} cores", r.cpu_cores);
                }
                let _ = writeln!(out);
            }
        }
        let pairs = [
            ("pubgate / baseline", &self.ratios),
            ("nchan / baseline", &self.ratios_nchan),
            ("pubgate / nchan", &self.ratios_pubgate_nchan),
        ];
        for (title, r) in pairs {
            let Some(r) = r else { continue };
            let fmt = |v: &[Option<f64>]| {
                v.iter()
                    .map(|x| x.map_or("-".to_string(), |x| format!("{x:.2}")))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let one = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
            let _ = writeln!(out, "\n{title} (per step):");
            let _ = writeln!(out, "  cpu per delivery  {}", fmt(&r.cpu_per_delivery));
            let _ = writeln!(out, "  deliveries/s      {}", fmt(&r.deliveries_per_s));
            let _ = writeln!(out, "  p99 latency       {}", fmt(&r.p99));
            let _ = writeln!(out, "  cpu per cycle     {}", fmt(&r.cpu_per_cycle));
            let _ = writeln!(
                out,
                "  peak deliveries/s {}   RSS per connection {}",
                one(r.peak_deliveries_per_s),
                one(r.rss_per_connection)
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_round_trip() {
        let mut h = new_hist();
        for v in [1_000u64, 2_000, 3_000, 1_000_000] {
            h.record(v).unwrap();
        }
        let back = decode_hist(&encode_hist(&h)).unwrap();
        assert_eq!(back.len(), 4);
        assert_eq!(back.max(), h.max());
        let l = Latency::of(&back);
        assert!(l.p50_us >= 1.9 && l.p50_us <= 2.1, "{l:?}");
    }
}
