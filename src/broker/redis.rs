//! The Redis broker: one pub/sub connection per node carries every channel the node subscribes.
//!
//! A supervisor task owns that connection. It reads messages in order and hands them to the sink
//! (never one task per message, which would reorder), and it proves the connection is alive with
//! a round trip: every probe interval it publishes a numbered probe on a node-private channel and
//! expects it back on its own subscriber connection before the next one is due. A lost connection
//! or a missed probe marks the broker down; the supervisor reconnects with capped exponential
//! backoff and jitter, resubscribes every channel the node still has, and reports up again once a
//! probe has come back through the new connection.
//!
//! PUBLISH goes through the shared [`RedisCommands`] connection, not the subscriber connection.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use deadpool_redis::redis::{self, aio::PubSubSink};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{parse_positioned, Broker, MessageSink};
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::redis_commands::RedisCommands;

/// First reconnect delay; doubled per failed attempt up to [`MAX_BACKOFF`], then jittered.
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Channels per SUBSCRIBE command when restoring subscriptions after a reconnect.
const RESUBSCRIBE_BATCH: usize = 1000;

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisBrokerOptions {
    /// `redis://[user:password@]host:port/` or `rediss://...`.
    pub url: String,
    /// PEM CA bundle trusted for `rediss://` (`PUBGATE_REDIS_CA_FILE`); `None`: system roots.
    pub ca: Option<Vec<u8>>,
    /// Prepended to channel names on Redis (`pubgate:`).
    pub prefix: String,
    /// Names this node's private probe channel.
    pub node_id: String,
    /// How often the pub/sub round trip is proven.
    pub probe_interval: Duration,
    /// Upper bound for one Redis call.
    pub timeout: Duration,
    /// History is on: payloads may carry a position header (see [`crate::history`]). Off, every
    /// payload is raw, as in v1.
    pub positioned: bool,
}

/// Broker over Redis pub/sub.
pub struct RedisBroker {
    shared: Arc<Shared>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    options: RedisBrokerOptions,
    client: redis::Client,
    commands: Arc<RedisCommands>,
    sink: Arc<dyn MessageSink>,
    metrics: Arc<Metrics>,
    /// Channels (without prefix) the node wants; restored on every reconnect.
    channels: Mutex<HashSet<String>>,
    /// Subscribe side of the live pub/sub connection; `None` while reconnecting.
    pubsub: Mutex<Option<PubSubSink>>,
    /// Set once a probe came back through the current connection.
    up: AtomicBool,
    probe_channel: String,
    stop: CancellationToken,
}

/// Why a pub/sub connection was given up.
#[derive(Debug)]
enum Lost {
    Connect(BrokerError),
    Closed,
    ProbeMissed,
    Stopped,
}

impl RedisBroker {
    /// Starts the supervisor and returns at once; [`Broker::is_up`] turns true once connected.
    pub fn start(
        options: RedisBrokerOptions,
        commands: Arc<RedisCommands>,
        sink: Arc<dyn MessageSink>,
        metrics: Arc<Metrics>,
    ) -> Result<RedisBroker, crate::error::Error> {
        let client = crate::redis_client::open(options.url.as_str(), options.ca.as_deref())
            .map_err(|e| crate::error::Error::Redis(e.to_string()))?;
        let probe_channel = format!("{}__probe:{}", options.prefix, options.node_id);
        let shared = Arc::new(Shared {
            options,
            client,
            commands,
            sink,
            metrics,
            channels: Mutex::default(),
            pubsub: Mutex::default(),
            up: AtomicBool::new(false),
            probe_channel,
            stop: CancellationToken::new(),
        });
        let supervisor = tokio::spawn(supervise(shared.clone()));
        Ok(RedisBroker {
            shared,
            supervisor: Mutex::new(Some(supervisor)),
        })
    }
}

impl Shared {
    fn prefixed(&self, channel: &str) -> String {
        format!("{}{channel}", self.options.prefix)
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pubsub(&self) -> std::sync::MutexGuard<'_, Option<PubSubSink>> {
        self.pubsub.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::Release);
        self.metrics.broker_up.set(up as i64);
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.options.timeout, call).await {
            Ok(Err(e)) if e.is_timeout() => Err(BrokerError::Timeout(self.options.timeout)),
            Ok(result) => Ok(result?),
            Err(_) => Err(BrokerError::Timeout(self.options.timeout)),
        }
    }
}

/// Keeps a pub/sub connection alive for the broker's whole life.
async fn supervise(shared: Arc<Shared>) {
    let mut failures: u32 = 0;
    let mut was_up = false;
    loop {
        let lost = serve_connection(&shared, &mut was_up, &mut failures).await;
        shared.set_up(false);
        *shared.pubsub() = None;
        match lost {
            Lost::Stopped => return,
            Lost::Connect(e) => {
                tracing::warn!(error = %e, attempt = failures, "redis pub/sub connect failed")
            }
            Lost::Closed => tracing::warn!("redis pub/sub connection lost"),
            Lost::ProbeMissed => tracing::warn!(
                interval_ms = shared.options.probe_interval.as_millis() as u64,
                "redis pub/sub probe not received back: connection considered dead"
            ),
        }
        let delay = backoff(failures);
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

/// Capped exponential backoff with jitter (50-100 % of the step), so nodes do not reconnect in
/// lockstep after a Redis restart.
fn backoff(failures: u32) -> Duration {
    let step = MIN_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(MAX_BACKOFF);
    step.mul_f64(rand::random_range(0.5..=1.0))
}

/// Connects, restores subscriptions and pumps messages until the connection is lost.
async fn serve_connection(shared: &Arc<Shared>, was_up: &mut bool, failures: &mut u32) -> Lost {
    let connect = async {
        let pubsub = shared.bounded(shared.client.get_async_pubsub()).await?;
        let (mut sink, stream) = pubsub.split();
        shared
            .bounded(sink.subscribe(&shared.probe_channel))
            .await?;
        let snapshot: Vec<String> = shared.channels().iter().cloned().collect();
        for batch in snapshot.chunks(RESUBSCRIBE_BATCH) {
            let names: Vec<String> = batch.iter().map(|c| shared.prefixed(c)).collect();
            shared.bounded(sink.subscribe(names)).await?;
        }
        Ok::<_, BrokerError>((sink, stream, snapshot))
    };
    let (mut sink, mut stream, snapshot) = tokio::select! {
        result = connect => match result {
            Ok(parts) => parts,
            Err(e) => return Lost::Connect(e),
        },
        _ = shared.stop.cancelled() => return Lost::Stopped,
    };
    *shared.pubsub() = Some(sink.clone());
    // Channels the node left while the snapshot was being restored: leave them on Redis too.
    let stale: Vec<String> = {
        let wanted = shared.channels();
        snapshot
            .iter()
            .filter(|c| !wanted.contains(*c))
            .map(|c| shared.prefixed(c))
            .collect()
    };
    if !stale.is_empty() {
        let _ = shared.bounded(sink.unsubscribe(stale)).await;
    }
    tracing::info!(
        channels = snapshot.len(),
        "redis pub/sub connected, subscriptions restored"
    );

    let mut probe = tokio::time::interval(shared.options.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut outstanding: Option<u64> = None;
    loop {
        tokio::select! {
            msg = stream.next() => {
                let Some(msg) = msg else { return Lost::Closed };
                let channel = msg.get_channel_name();
                if channel == shared.probe_channel {
                    let got = std::str::from_utf8(msg.get_payload_bytes()).ok().and_then(|s| s.parse().ok());
                    if got.is_some() && got == outstanding {
                        outstanding = None;
                        if !shared.up.load(Ordering::Acquire) {
                            if *was_up {
                                shared.metrics.broker_reconnects.inc();
                            }
                            *was_up = true;
                            *failures = 0;
                            shared.set_up(true);
                            tracing::info!("redis broker up");
                        }
                    }
                } else if let Some(name) = channel.strip_prefix(shared.options.prefix.as_str()) {
                    let payload = msg.get_payload_bytes();
                    if shared.options.positioned {
                        let (position, payload) = parse_positioned(payload);
                        shared.sink.deliver(name, payload, position);
                    } else {
                        shared.sink.deliver(name, payload, None);
                    }
                }
            }
            _ = probe.tick() => {
                if outstanding.is_some() {
                    return Lost::ProbeMissed;
                }
                seq += 1;
                outstanding = Some(seq);
                let shared = shared.clone();
                // Published from its own task so the message stream keeps being drained meanwhile.
                // A failure on a command connection left over from before a Redis restart is
                // retried once on a fresh one, so it does not cost a whole reconnect cycle.
                tokio::spawn(async move {
                    for _ in 0..2 {
                        let channel = shared.probe_channel.clone();
                        let sent = shared.commands.publish("PUBLISH", channel, seq).await;
                        if sent.is_ok() {
                            break;
                        }
                    }
                });
            }
            _ = shared.stop.cancelled() => return Lost::Stopped,
        }
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let shared = &self.shared;
        shared.channels().insert(channel.to_owned());
        let sink = shared.pubsub().clone();
        let result = match sink {
            Some(mut sink) => {
                shared
                    .bounded(sink.subscribe(shared.prefixed(channel)))
                    .await
            }
            None => Err(BrokerError::Down),
        };
        if result.is_err() {
            shared.channels().remove(channel);
        }
        result
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let shared = &self.shared;
        shared.channels().remove(channel);
        let sink = shared.pubsub().clone();
        match sink {
            Some(mut sink) => {
                shared
                    .bounded(sink.unsubscribe(shared.prefixed(channel)))
                    .await
            }
            // Not connected: the next connection simply does not resubscribe it.
            None => Ok(()),
        }
    }

    async fn publish(&self, channel: &str, payload: Bytes) -> Result<(), BrokerError> {
        if !self.is_up() {
            return Err(BrokerError::Down);
        }
        let name = self.shared.prefixed(channel);
        self.shared
            .commands
            .publish("PUBLISH", name, payload.as_ref())
            .await
            .map(|_| ())
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    async fn shutdown(&self) {
        self.shared.stop.cancel();
        let task = self
            .supervisor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}
