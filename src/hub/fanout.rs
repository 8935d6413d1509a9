//! Fan-out workers: the Redis reader routes, a fixed set of workers fans out.
//!
//! One reader task receives every pub/sub message of a node. If it also queued each message to
//! every local subscriber, a hot channel would hold it for milliseconds per message, and behind
//! that fan-out would wait every other channel and the probe that proves the pub/sub connection
//! alive (a missed probe forces a reconnect, which loses messages). So the reader only copies a
//! message into a job and hands it to a worker. Workers are picked by channel hash, so one
//! channel's messages keep their order; each has a bounded queue, and when that is full the
//! message is dropped for this node and counted (`pubgate_messages_dropped_total{reason=
//! "fanout_overflow"}`): the reader never waits for a worker.
//!
//! The memory broker does not use workers: a publish there fans out in the publisher's own task,
//! which keeps one publisher's messages in order and paces it by its own fan-out.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc::{self, error::TrySendError};

use super::Hub;
use crate::broker::MessageSink;
use crate::broker::Position;
use crate::metrics::Metrics;
use crate::shard;

/// How many workers, and how many messages each may have waiting.
#[derive(Debug, Clone, Copy)]
pub struct FanOutOptions {
    /// `PUBGATE_FANOUT_WORKERS`; at least 1.
    pub workers: usize,
    /// `PUBGATE_FANOUT_QUEUE`: messages waiting per worker; at least 1.
    pub queue: usize,
}

/// One message on its way to a worker: owned copies of what the reader borrowed.
struct Job {
    channel: Box<str>,
    payload: Bytes,
    /// Offset and epoch of a message published through history.
    position: Option<(u64, Box<str>)>,
}

/// The broker's sink on a Redis node: hands each message to the worker of its channel.
pub struct FanOut {
    workers: Box<[mpsc::Sender<Job>]>,
    metrics: Arc<Metrics>,
}

impl FanOut {
    /// Spawns the workers; they deliver to `hub` and end when the `FanOut` is dropped (after
    /// emptying their queues).
    pub fn start(hub: Arc<Hub>, options: FanOutOptions, metrics: Arc<Metrics>) -> FanOut {
        let workers = (0..options.workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(options.queue.max(1));
                tokio::spawn(work(hub.clone(), rx));
                tx
            })
            .collect();
        FanOut { workers, metrics }
    }

    /// Messages waiting in the workers' queues now (`pubgate_fanout_queued`).
    pub fn queued(&self) -> usize {
        self.workers
            .iter()
            .map(|tx| tx.max_capacity() - tx.capacity())
            .sum()
    }
}

impl MessageSink for FanOut {
    fn deliver(&self, channel: &str, payload: &[u8], position: Option<Position<'_>>) {
        let worker = &self.workers[shard::index(channel, self.workers.len())];
        let job = Job {
            channel: channel.into(),
            payload: Bytes::copy_from_slice(payload),
            position: position.map(|p| (p.offset, p.epoch.into())),
        };
        match worker.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self
                .metrics
                .messages_dropped
                .with_label_values(&["fanout_overflow"])
                .inc(),
            // Only while the node shuts down.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

/// One worker: fans out its jobs in arrival order.
async fn work(hub: Arc<Hub>, mut jobs: mpsc::Receiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let position = job.position.as_ref().map(|(offset, epoch)| Position {
            offset: *offset,
            epoch,
        });
        hub.deliver(&job.channel, &job.payload, position);
        // A fan-out to thousands of sockets runs without an await point: give the other tasks
        // on this thread (connections' writers) their turn between messages.
        tokio::task::consume_budget().await;
    }
}
