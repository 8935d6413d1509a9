//! The parent's side of the worker processes: the tool re-executes itself as `__worker` once per
//! share of the connections (each process stays under the 20k fd limit) and aggregates.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use crate::ipc::{Cmd, Counters, Event, Job};

struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    events: mpsc::UnboundedReceiver<Event>,
    pid: u32,
}

pub struct Pool {
    workers: Vec<Worker>,
    /// Latest counters of each worker (from its ticks).
    progress: Arc<Mutex<Vec<Counters>>>,
}

/// A worker's `done` report.
pub struct Done {
    pub counters: Counters,
    pub hist: String,
    pub cycle_hist: String,
    pub first_error: Option<String>,
}

/// A worker's `ready` report.
pub struct Ready {
    pub open: u64,
    pub failed: u64,
    pub connect_s: f64,
    pub first_error: Option<String>,
    pub connect_hist: String,
}

impl Pool {
    pub async fn spawn(jobs: Vec<Job>) -> Result<Pool, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let progress = Arc::new(Mutex::new(vec![Counters::default(); jobs.len()]));
        let mut workers = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let mut child = Command::new(&me)
                .arg("__worker")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| format!("cannot start worker: {e}"))?;
            let pid = child.id().unwrap_or(0);
            let mut stdin = child.stdin.take().ok_or("no worker stdin")?;
            let stdout = child.stdout.take().ok_or("no worker stdout")?;
            let mut line = serde_json::to_vec(job).map_err(|e| e.to_string())?;
            line.push(b'\n');
            stdin.write_all(&line).await.map_err(|e| e.to_string())?;
            let (tx, rx) = mpsc::unbounded_channel();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    match serde_json::from_str::<Event>(&line) {
                        Ok(Event::Tick(c)) => {
                            progress.lock().unwrap_or_else(|e| e.into_inner())[i] = c;
                        }
                        Ok(event) => {
                            if let Event::Done { counters, .. } = &event {
                                progress.lock().unwrap_or_else(|e| e.into_inner())[i] = *counters;
                            }
                            let _ = tx.send(event);
                        }
                        Err(e) => eprintln!("worker {i}: unreadable event ({e}): {line}"),
                    }
                }
            });
            workers.push(Worker {
                child,
                stdin: Some(stdin),
                events: rx,
                pid,
            });
        }
        Ok(Pool { workers, progress })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().map(|w| w.pid).collect()
    }

    /// The sum of the workers' latest counters (`last_ns` is the latest of them).
    pub fn counters(&self) -> Counters {
        let all = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        sum(all.iter())
    }

    pub fn progress(&self) -> Arc<Mutex<Vec<Counters>>> {
        self.progress.clone()
    }

    /// Waits for every worker's `ready`.
    pub async fn wait_ready(&mut self, limit: Duration) -> Result<Vec<Ready>, String> {
        let mut out = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            let event = tokio::time::timeout(limit, w.events.recv())
                .await
                .map_err(|_| format!("worker {i} did not finish connecting within {limit:?}"))?
                .ok_or_else(|| format!("worker {i} exited while connecting"))?;
            match event {
                Event::Ready {
                    open,
                    failed,
                    connect_s,
                    first_error,
                    connect_hist,
                } => out.push(Ready {
                    open,
                    failed,
                    connect_s,
                    first_error,
                    connect_hist,
                }),
                other => return Err(format!("worker {i}: unexpected {other:?}")),
            }
        }
        Ok(out)
    }

    pub async fn send(&mut self, cmd: &Cmd) -> Result<(), String> {
        let mut line = serde_json::to_vec(cmd).map_err(|e| e.to_string())?;
        line.push(b'\n');
        for (i, w) in self.workers.iter_mut().enumerate() {
            let stdin = w.stdin.as_mut().ok_or("worker stdin closed")?;
            stdin
                .write_all(&line)
                .await
                .map_err(|e| format!("worker {i}: {e}"))?;
            stdin
                .flush()
                .await
                .map_err(|e| format!("worker {i}: {e}"))?;
        }
        Ok(())
    }

    /// Waits for every worker's `done` after a `stop`.
    pub async fn collect_done(&mut self, limit: Duration) -> Result<Vec<Done>, String> {
        let mut out = Vec::new();
        for (i, w) in self.workers.iter_mut().enumerate() {
            let event = tokio::time::timeout(limit, w.events.recv())
                .await
                .map_err(|_| format!("worker {i} did not report within {limit:?}"))?
                .ok_or_else(|| format!("worker {i} exited"))?;
            match event {
                Event::Done {
                    counters,
                    hist,
                    cycle_hist,
                    first_error,
                } => out.push(Done {
                    counters,
                    hist,
                    cycle_hist,
                    first_error,
                }),
                other => return Err(format!("worker {i}: unexpected {other:?}")),
            }
        }
        Ok(out)
    }

    /// Closes every worker's stdin (it exits, closing its connections) and reaps it.
    pub async fn shutdown(mut self) {
        for w in &mut self.workers {
            w.stdin = None;
        }
        for w in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(10), w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.start_kill();
                let _ = w.child.wait().await;
            }
        }
    }
}

pub fn sum<'a>(all: impl Iterator<Item = &'a Counters>) -> Counters {
    all.fold(Counters::default(), |a, c| Counters {
        deliveries: a.deliveries + c.deliveries,
        late: a.late + c.late,
        open: a.open + c.open,
        closed: a.closed + c.closed,
        server_errors: a.server_errors + c.server_errors,
        cycles: a.cycles + c.cycles,
        cycle_errors: a.cycle_errors + c.cycle_errors,
        last_ns: a.last_ns.max(c.last_ns),
    })
}
