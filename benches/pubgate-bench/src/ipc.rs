//! What the parent and its worker processes say to each other: one JSON object per line, the
//! job and commands on the worker's stdin, events on its stdout.

use serde::{Deserialize, Serialize};

use crate::cli::Scenario;
use crate::client::Protocol;

/// The first line a worker reads: which connections it owns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub worker: usize,
    pub workers: usize,
    pub scenario: Scenario,
    pub urls: Vec<String>,
    /// Global index of this worker's first connection, and how many it opens.
    pub first: usize,
    pub count: usize,
    pub channels: usize,
    pub channel_name: String,
    pub sources: usize,
    pub concurrency: usize,
    pub connect_timeout_ms: u64,
    /// How the connections subscribe and what deliveries look like.
    pub protocol: Protocol,
}

impl Job {
    /// The channel of global connection `i`.
    pub fn channel_of(&self, i: usize) -> String {
        channel_name(&self.channel_name, i % self.channels.max(1))
    }
}

pub fn channel_name(base: &str, n: usize) -> String {
    format!("{base}-{n}")
}

/// Commands after the job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Cmd {
    /// Reset the counters and start measuring; churn workers start cycling at `rate` per second.
    /// Deliveries of messages stamped before `since_ns` (an earlier step's backlog) are counted
    /// apart as `late`.
    Start { rate: f64, since_ns: u64 },
    /// Stop measuring and report `done`.
    Stop,
}

/// What a worker reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "ev", rename_all = "lowercase")]
pub enum Event {
    /// Every connection of the job was tried.
    Ready {
        open: u64,
        failed: u64,
        connect_s: f64,
        first_error: Option<String>,
        /// Connect+upgrade+subscribe latency histogram (ns), HDR V2 + base64.
        connect_hist: String,
    },
    /// Once a second.
    Tick(Counters),
    /// After `stop`.
    Done {
        counters: Counters,
        /// Publish->deliver latency (ns), HDR V2 + base64.
        hist: String,
        /// Churn cycle latency (ns), HDR V2 + base64.
        cycle_hist: String,
        first_error: Option<String>,
    },
}

/// Running counts of one worker since the last `start`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Counters {
    pub deliveries: u64,
    /// Deliveries of messages published before the step started: not counted in `deliveries`
    /// nor in the latency histogram.
    pub late: u64,
    pub open: u64,
    /// Connections closed by the server (close frame) or lost since the start.
    pub closed: u64,
    /// `error` replies received.
    pub server_errors: u64,
    pub cycles: u64,
    pub cycle_errors: u64,
    /// When the last delivery arrived (ns since the Unix epoch).
    pub last_ns: u64,
}
