//! CPU time, RSS and context switches of the measured processes: from /proc/<pid> for processes on
//! this machine, else from a gateway's Prometheus /metrics (process collector).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stats::Usage;

/// Clock ticks per second of /proc/<pid>/stat (USER_HZ, 100 on Linux).
const TICKS: f64 = 100.0;

/// A point-in-time reading, summed over the probed processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_s: f64,
    pub rss: u64,
    /// Context switches (voluntary + involuntary) summed over threads.
    pub switches: Option<u64>,
}

/// What to read.
#[derive(Debug, Clone)]
pub enum Probe {
    Pids(Vec<u32>),
    Metrics(Vec<SocketAddr>),
}

impl Probe {
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Probe::Pids(p) => p.clone(),
            Probe::Metrics(_) => Vec::new(),
        }
    }

    pub fn source(&self) -> &'static str {
        match self {
            Probe::Pids(_) => "proc",
            Probe::Metrics(_) => "metrics",
        }
    }

    pub async fn sample(&self) -> Sample {
        self.per_process()
            .await
            .into_iter()
            .fold(Sample::default(), |a, s| Sample {
                cpu_s: a.cpu_s + s.cpu_s,
                rss: a.rss + s.rss,
                switches: match (a.switches, s.switches) {
                    (Some(x), Some(y)) => Some(x + y),
                    (None, Some(y)) if a.rss == 0 => Some(y),
                    _ => None,
                },
            })
    }

    pub async fn per_process(&self) -> Vec<Sample> {
        match self {
            Probe::Pids(pids) => pids.iter().map(|&p| proc_sample(p)).collect(),
            Probe::Metrics(addrs) => {
                let mut out = Vec::new();
                for &a in addrs {
                    out.push(metrics_sample(a).await);
                }
                out
            }
        }
    }
}

/// The usage between two samples taken `secs` apart.
pub fn usage(probe: &Probe, before: Sample, after: Sample, secs: f64) -> Usage {
    let cpu_s = (after.cpu_s - before.cpu_s).max(0.0);
    Usage {
        pids: probe.pids(),
        source: probe.source().into(),
        cpu_s,
        cpu_cores: if secs > 0.0 { cpu_s / secs } else { 0.0 },
        rss_bytes: after.rss,
        context_switches: match (before.switches, after.switches) {
            (Some(b), Some(a)) => a.saturating_sub(b) as i64,
            _ => -1,
        },
    }
}

pub fn proc_sample(pid: u32) -> Sample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let cpu_s = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (t(11) + t(12)) / TICKS
        })
        .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    // Context switches of every thread (the process's own status counts the main thread only).
    let mut switches = None;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut total = 0u64;
        for task in tasks.flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            total += status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        switches = Some(total);
    }
    Sample {
        cpu_s,
        rss,
        switches,
    }
}

/// Reads `process_cpu_seconds_total` and `process_resident_memory_bytes` from /metrics.
pub async fn metrics_sample(addr: SocketAddr) -> Sample {
    let body = http_get(addr, "/metrics")
        .await
        .map(|(_, b)| b)
        .unwrap_or_default();
    let value = |name: &str| {
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Sample {
        cpu_s: value("process_cpu_seconds_total").unwrap_or(0.0),
        rss: value("process_resident_memory_bytes").unwrap_or(0.0) as u64,
        switches: None,
    }
}

/// A minimal HTTP/1.1 GET with `Connection: close`; (status, body). Bounded to 5 s.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let get = async {
        let mut s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status line")?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok::<_, String>((status, body))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// Machine-wide CPU seconds from /proc/stat: (busy, of which softirq).
pub fn machine_cpu() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let get = |i: usize| f.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal
    let busy = get(0) + get(1) + get(2) + get(5) + get(6) + get(7);
    (busy / TICKS, get(6) / TICKS)
}
