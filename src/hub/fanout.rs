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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::time::Duration;

    use super::*;
    use crate::wire::{Budget, Member, Outbox};

    fn subscriber(hub: &Hub, channels: &[&str]) -> Arc<Outbox> {
        let member = Member {
            conn_id: "c".into(),
            node: "n".into(),
            user: None,
            info: None,
        };
        let budget = Budget {
            frames: 10_000,
            bytes: 1 << 30,
        };
        let outbox = Arc::new(Outbox::new(1, member, budget));
        for channel in channels {
            hub.add(channel, &outbox);
        }
        outbox
    }

    /// The `data` of every delivery queued for `outbox`, with its channel.
    fn received(outbox: &Outbox) -> Vec<(String, u64)> {
        let mut frames = VecDeque::new();
        outbox.take(&mut frames);
        frames
            .iter()
            .map(|f| {
                let start = if f[1] == 126 { 4 } else { 2 };
                let v: serde_json::Value = serde_json::from_slice(&f[start..]).unwrap();
                (
                    v["channel"].as_str().unwrap().to_owned(),
                    v["data"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn overflowed(metrics: &Metrics) -> u64 {
        metrics
            .messages_dropped
            .with_label_values(&["fanout_overflow"])
            .get()
    }

    /// Waits (in paused time, so without a real sleep) until the workers let go of the hub,
    /// which they do once their queues are empty and the `FanOut` is gone.
    async fn workers_stopped(hub: &Arc<Hub>) {
        tokio::time::timeout(Duration::from_secs(60), async {
            while Arc::strong_count(hub) > 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await
        .expect("the workers did not stop");
    }

    #[tokio::test(start_paused = true)]
    async fn one_channels_messages_keep_their_order_across_workers() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let channels = ["a", "b", "c", "d", "e", "f", "g", "h"];
        let outbox = subscriber(&hub, &channels);
        let options = FanOutOptions {
            workers: 4,
            queue: 1000,
        };
        let fanout = FanOut::start(hub.clone(), options, metrics.clone());
        for n in 0..100u64 {
            for channel in channels {
                fanout.deliver(channel, n.to_string().as_bytes(), None);
            }
            if n % 10 == 0 {
                // Let the workers run between bursts, as the reader would.
                tokio::task::yield_now().await;
            }
        }
        drop(fanout);
        workers_stopped(&hub).await;
        let got = received(&outbox);
        assert_eq!(got.len(), 800);
        for channel in channels {
            let of: Vec<u64> = got
                .iter()
                .filter(|(c, _)| c == channel)
                .map(|(_, n)| *n)
                .collect();
            assert_eq!(of, (0..100).collect::<Vec<_>>(), "channel {channel}");
        }
        assert_eq!(overflowed(&metrics), 0);
        assert_eq!(metrics.messages_delivered.get(), 800);
    }

    /// A worker that has not caught up (here: it cannot run before the caller yields) makes
    /// the reader drop and count, never wait.
    #[tokio::test(start_paused = true)]
    async fn a_full_worker_queue_drops_and_counts_without_waiting() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let outbox = subscriber(&hub, &["ch"]);
        let options = FanOutOptions {
            workers: 1,
            queue: 2,
        };
        let fanout = FanOut::start(hub.clone(), options, metrics.clone());
        for n in 0..5u64 {
            fanout.deliver("ch", n.to_string().as_bytes(), None);
        }
        assert_eq!(fanout.queued(), 2);
        assert_eq!(overflowed(&metrics), 3);
        // Once the worker ran, the queue has room again.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(fanout.queued(), 0);
        fanout.deliver("ch", b"5", None);
        drop(fanout);
        workers_stopped(&hub).await;
        let got: Vec<u64> = received(&outbox).into_iter().map(|(_, n)| n).collect();
        assert_eq!(got, [0, 1, 5]);
        assert_eq!(overflowed(&metrics), 3);
    }

    /// Dropping the `FanOut` stops its workers after they delivered what was queued, and
    /// positions travel with their messages.
    #[tokio::test(start_paused = true)]
    async fn workers_stop_on_shutdown_after_emptying_their_queues() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let hub = Arc::new(Hub::new(metrics.clone()));
        let outbox = subscriber(&hub, &["ch"]);
        let options = FanOutOptions {
            workers: 3,
            queue: 10,
        };
        let fanout = FanOut::start(hub.clone(), options, metrics.clone());
        assert_eq!(Arc::strong_count(&hub), 4, "three workers hold the hub");
        for n in 1..=3u64 {
            let position = Position {
                offset: n,
                epoch: "e",
            };
            fanout.deliver("ch", n.to_string().as_bytes(), Some(position));
        }
        drop(fanout);
        workers_stopped(&hub).await;
        let mut frames = VecDeque::new();
        outbox.take(&mut frames);
        let texts: Vec<&[u8]> = frames.iter().map(|f| &f[2..]).collect();
        assert_eq!(
            texts,
            (1..=3)
                .map(|n| format!(r#"{{"type":"message","channel":"ch","data":{n},"offset":{n}}}"#))
                .collect::<Vec<_>>()
                .iter()
                .map(|s| s.as_bytes())
                .collect::<Vec<_>>()
        );
    }
}
