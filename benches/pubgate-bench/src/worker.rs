//! A worker process: opens its share of the connections on a single-threaded runtime (one task
//! per connection), records publish->deliver latency, and answers the parent's commands.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use fastwebsockets::{Frame, OpCode};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::LocalSet;

use crate::client::{self, close_text, delivery_stamp, starts_with_type, Target, Ws};
use crate::ipc::{Cmd, Counters, Event, Job};
use crate::stats::{encode_hist, new_hist};

/// How often counters are reported to the parent.
const TICK: Duration = Duration::from_millis(250);
/// Churn cycles in flight per worker at most.
const MAX_CYCLES_IN_FLIGHT: usize = 2000;

#[derive(Default)]
struct State {
    recording: Cell<bool>,
    /// The start of the step being recorded (ns since the Unix epoch).
    since_ns: Cell<u64>,
    counters: Cell<Counters>,
    hist: RefCell<Option<Histogram<u64>>>,
    cycle_hist: RefCell<Option<Histogram<u64>>>,
    first_error: RefCell<Option<String>>,
}

impl State {
    fn update(&self, f: impl FnOnce(&mut Counters)) {
        let mut c = self.counters.get();
        f(&mut c);
        self.counters.set(c);
    }

    fn error(&self, e: String) {
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(e);
        }
    }

    fn record(hist: &RefCell<Option<Histogram<u64>>>, ns: u64) {
        if let Some(h) = hist.borrow_mut().as_mut() {
            h.saturating_record(ns.max(1));
        }
    }
}

/// Entry point of `pubgate-bench __worker`.
pub fn main() -> std::process::ExitCode {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let local = LocalSet::new();
    match local.block_on(&runtime, run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pubgate-bench worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn emit(out: &mut tokio::io::Stdout, event: &Event) -> Result<(), String> {
    let mut line = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    line.push(b'\n');
    out.write_all(&line).await.map_err(|e| e.to_string())?;
    out.flush().await.map_err(|e| e.to_string())
}

async fn run() -> Result<(), String> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let line = stdin
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("no job on stdin")?;
    let job: Job = serde_json::from_str(&line).map_err(|e| format!("bad job: {e}"))?;
    let targets = job
        .urls
        .iter()
        .map(|u| Target::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    let state = Rc::new(State::default());
    let limit = Duration::from_millis(job.connect_timeout_ms);

    // Progress ticks, also while connecting.
    let (tick_tx, mut tick_rx) = mpsc::unbounded_channel::<()>();
    {
        tokio::task::spawn_local(async move {
            let mut every = tokio::time::interval(TICK);
            every.tick().await;
            loop {
                every.tick().await;
                if tick_tx.send(()).is_err() {
                    break;
                }
            }
        });
    }

    // Connect every connection of the job, `concurrency` handshakes at a time.
    let started = Instant::now();
    let gate = Rc::new(Semaphore::new(job.concurrency.max(1)));
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Result<u64, String>>();
    for i in job.first..job.first + job.count {
        let target = targets[i % targets.len()].clone();
        let source = client::source_for(i, job.sources, &target);
        let channel = job.channel_of(i);
        let protocol = job.protocol;
        let gate = gate.clone();
        let done = done_tx.clone();
        let state = state.clone();
        tokio::task::spawn_local(async move {
            let permit = gate.acquire().await;
            let t0 = Instant::now();
            let result =
                client::connect_subscribed(&target, source, &channel, limit, protocol).await;
            drop(permit);
            match result {
                Ok(ws) => {
                    let _ = done.send(Ok(t0.elapsed().as_nanos() as u64));
                    state.update(|c| c.open += 1);
                    read_deliveries(ws, &state).await;
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        });
    }
    drop(done_tx);
    let mut connect_hist = new_hist();
    let (mut open, mut failed) = (0u64, 0u64);
    let mut first_error = None;
    let mut remaining = job.count;
    while remaining > 0 {
        tokio::select! {
            r = done_rx.recv() => {
                let Some(r) = r else { break };
                remaining -= 1;
                match r {
                    Ok(ns) => {
                        open += 1;
                        connect_hist.saturating_record(ns.max(1));
                    }
                    Err(e) => {
                        failed += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            Some(()) = tick_rx.recv() => {
                emit(&mut out, &Event::Tick(state.counters.get())).await?;
            }
        }
    }
    emit(
        &mut out,
        &Event::Ready {
            open,
            failed,
            connect_s: started.elapsed().as_secs_f64(),
            first_error,
            connect_hist: encode_hist(&connect_hist),
        },
    )
    .await?;

    // Commands until stdin closes.
    let mut churn: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                let Ok(Some(line)) = line else { break };
                let cmd: Cmd = serde_json::from_str(&line).map_err(|e| format!("bad command: {e}"))?;
                match cmd {
                    Cmd::Start { rate, since_ns } => {
                        let open = state.counters.get().open;
                        state.counters.set(Counters { open, ..Counters::default() });
                        *state.hist.borrow_mut() = Some(new_hist());
                        *state.cycle_hist.borrow_mut() = Some(new_hist());
                        *state.first_error.borrow_mut() = None;
                        state.since_ns.set(since_ns);
                        state.recording.set(true);
                        if rate > 0.0 {
                            churn = Some(tokio::task::spawn_local(churn_loop(
                                job.clone(),
                                targets.clone(),
                                rate,
                                limit,
                                state.clone(),
                            )));
                        }
                    }
                    Cmd::Stop => {
                        if let Some(task) = churn.take() {
                            task.abort();
                            let _ = task.await;
                            // Let cycles in flight finish, briefly.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        state.recording.set(false);
                        let hist = state.hist.borrow_mut().take().unwrap_or_else(new_hist);
                        let cycle_hist = state.cycle_hist.borrow_mut().take().unwrap_or_else(new_hist);
                        let first_error = state.first_error.borrow().clone();
                        emit(&mut out, &Event::Done {
                            counters: state.counters.get(),
                            hist: encode_hist(&hist),
                            cycle_hist: encode_hist(&cycle_hist),
                            first_error,
                        }).await?;
                    }
                }
            }
            Some(()) = tick_rx.recv() => {
                emit(&mut out, &Event::Tick(state.counters.get())).await?;
            }
        }
    }
    Ok(())
}

/// Reads a subscribed connection until it ends, recording each delivery's latency.
async fn read_deliveries(mut ws: Ws, state: &State) {
    loop {
        let frame = match ws.read_frame().await {
            Ok(frame) => frame,
            Err(e) => {
                if state.recording.get() {
                    state.error(format!("connection lost: {e}"));
                }
                state.update(|c| {
                    c.open -= 1;
                    c.closed += 1;
                });
                return;
            }
        };
        match frame.opcode {
            OpCode::Text => {
                if let Some(sent) = delivery_stamp(&frame.payload) {
                    if state.recording.get() && sent < state.since_ns.get() {
                        state.update(|c| c.late += 1);
                    } else if state.recording.get() {
                        let now = client::now_ns();
                        State::record(&state.hist, now.saturating_sub(sent));
                        state.update(|c| {
                            c.deliveries += 1;
                            c.last_ns = now;
                        });
                    }
                } else if starts_with_type(&frame.payload, b"error") {
                    state.error(String::from_utf8_lossy(&frame.payload).into_owned());
                    state.update(|c| c.server_errors += 1);
                }
            }
            OpCode::Close => {
                state.error(format!(
                    "closed by the server: {}",
                    close_text(&frame.payload)
                ));
                state.update(|c| {
                    c.open -= 1;
                    c.closed += 1;
                });
                return;
            }
            _ => {}
        }
    }
}

/// Starts connect+subscribe+close cycles at `rate` per second (this worker's share).
async fn churn_loop(job: Job, targets: Vec<Target>, rate: f64, limit: Duration, state: Rc<State>) {
    let share = rate / job.workers.max(1) as f64;
    if share <= 0.0 {
        return;
    }
    let period = Duration::from_secs_f64(1.0 / share);
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let in_flight = Rc::new(Cell::new(0usize));
    let mut k: usize = job.worker;
    loop {
        every.tick().await;
        if in_flight.get() >= MAX_CYCLES_IN_FLIGHT {
            state.update(|c| c.cycle_errors += 1);
            state.error("churn: too many cycles in flight".into());
            continue;
        }
        k += job.workers.max(1);
        let target = targets[k % targets.len()].clone();
        let source = client::source_for(k, job.sources, &target);
        let channel = job.channel_of(k);
        let protocol = job.protocol;
        let state = state.clone();
        let in_flight = in_flight.clone();
        in_flight.set(in_flight.get() + 1);
        tokio::task::spawn_local(async move {
            let t0 = Instant::now();
            match client::connect_subscribed(&target, source, &channel, limit, protocol).await {
                Ok(mut ws) => {
                    if state.recording.get() {
                        State::record(&state.cycle_hist, t0.elapsed().as_nanos() as u64);
                        state.update(|c| c.cycles += 1);
                    }
                    let _ = ws.write_frame(Frame::close(1000, b"bye")).await;
                    let _ = ws.flush().await;
                    // The server's close echo, briefly; then the socket is dropped.
                    let _ = client::wait_text(&mut ws, Duration::from_secs(1), |_| false).await;
                }
                Err(e) => {
                    if state.recording.get() {
                        state.update(|c| c.cycle_errors += 1);
                        state.error(format!("churn: {e}"));
                    }
                }
            }
            in_flight.set(in_flight.get() - 1);
        });
    }
}
