//! The Redis Cluster broker: sharded pub/sub (SSUBSCRIBE / SPUBLISH), one pub/sub connection per
//! master that owns slots of the node's channels.
//!
//! redis-rs routes commands in a cluster (MOVED/ASK, failover) but its sharded pub/sub falls
//! short: after a reconnect it re-issues one SSUBSCRIBE per node with every channel of that node,
//! which Redis refuses with CROSSSLOT as soon as they span several slots, and the subscriptions
//! are silently lost; nor does it tell the caller when Redis moves a channel away (a `sunsubscribe`
//! push after a slot migration). So this layer is written here, as small as it can be, on top of
//! redis-rs connections:
//! - a coordinator task reads the slot map (`CLUSTER SLOTS`) and assigns every wanted channel to
//!   the master that owns its slot; it re-reads the map periodically and whenever a shard reports
//!   trouble (connection lost, probe missed, `sunsubscribe` pushed by Redis, MOVED on SSUBSCRIBE)
//!   and moves the channels whose owner changed (SUNSUBSCRIBE on the old shard if reachable,
//!   SSUBSCRIBE on the new one);
//! - a shard task per master with channels holds one RESP3 `MultiplexedConnection`, issues one
//!   SSUBSCRIBE per channel (never several slots in one command), and proves the connection with
//!   a round-trip probe on a channel whose slot that master owns;
//! - messages are handed to the sink from the connection's push sender, in arrival order, never
//!   through a task per message.
//!
//! The broker is up while the slot map is known and every shard carrying channels is connected
//! with its last probe answered. SPUBLISH goes through the cluster command connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{AsyncPushSender, MultiplexedConnection, SendError};
use redis::{AsyncConnectionConfig, ConnectionInfo, PushInfo, PushKind, Value};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{parse_positioned, Broker, MessageSink};
use crate::error::BrokerError;
use crate::metrics::Metrics;
use crate::redis_client::slots::{broker_channel, sharded_name, SlotMap};
use crate::redis_commands::RedisCommands;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Slot map re-read interval while something is down (a failover takes seconds).
const DEGRADED_REFRESH: Duration = Duration::from_millis(100);
/// Channels per pipeline when a shard connection restores its subscriptions.
const RESUBSCRIBE_BATCH: usize = 1000;

/// Settings of the cluster broker.
#[derive(Debug, Clone)]
pub struct ClusterBrokerOptions {
    /// Connection settings of the first seed (scheme, TLS trust, ACL user); shard connections use
    /// them with the address of each master.
    pub template: ConnectionInfo,
    /// Prepended to channel names on Redis (`pubgate:`).
    pub prefix: String,
    /// Names this node's probe channels.
    pub node_id: String,
    /// How often each shard connection's round trip is proven.
    pub probe_interval: Duration,
    /// Upper bound for one Redis call.
    pub timeout: Duration,
    /// History is on: payloads may carry a position header (see [`crate::history`]).
    pub positioned: bool,
}

/// Broker over Redis Cluster sharded pub/sub.
pub struct ClusterBroker {
    shared: Arc<Shared>,
    coordinator: Mutex<Option<JoinHandle<()>>>,
}

struct Shared {
    options: ClusterBrokerOptions,
    commands: Arc<RedisCommands>,
    sink: Arc<dyn MessageSink>,
    metrics: Arc<Metrics>,
    /// Slot map, channel assignment and shards; changed only in short non-async sections.
    state: Mutex<State>,
    /// Wakes the coordinator to re-read the slot map.
    refresh: Notify,
    up: AtomicBool,
    /// Set once the broker has been up, so later recoveries count as reconnects.
    was_up: AtomicBool,
    stop: CancellationToken,
}

#[derive(Default)]
struct State {
    slots: Option<SlotMap>,
    /// Wanted channels (without prefix) and the master each is assigned to.
    channels: HashMap<String, String>,
    /// Shards by master address, with the number of channels assigned to each.
    shards: HashMap<String, (Arc<Shard>, usize)>,
}

/// One master's pub/sub connection.
struct Shard {
    addr: String,
    /// The live connection once its subscriptions are restored; `None` while (re)connecting.
    conn: watch::Sender<Option<MultiplexedConnection>>,
    /// Set when the connection is lost, cannot be made or misses a probe; cleared when a probe
    /// comes back. A shard still making its first connection is not failing, so a channel on a
    /// new master does not turn the whole node unready while it connects.
    failing: AtomicBool,
    /// Full name of the probe channel (its slot is this master's); follows the slot map.
    probe: Mutex<Option<String>>,
    stop: CancellationToken,
}

/// What a shard connection's push sender reports to its task.
enum Event {
    Probe(Vec<u8>),
    /// Redis removed a subscription (full name): ours by SUNSUBSCRIBE, or a migrated slot.
    Unsubscribed(String),
    Disconnected,
}

impl ClusterBroker {
    /// Starts the coordinator and returns at once; [`Broker::is_up`] turns true once the slot map
    /// is known and the shards of the node's channels answer.
    pub fn start(
        options: ClusterBrokerOptions,
        commands: Arc<RedisCommands>,
        sink: Arc<dyn MessageSink>,
        metrics: Arc<Metrics>,
    ) -> ClusterBroker {
        let shared = Arc::new(Shared {
            options,
            commands,
            sink,
            metrics,
            state: Mutex::default(),
            refresh: Notify::new(),
            up: AtomicBool::new(false),
            was_up: AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        let coordinator = tokio::spawn(coordinate(shared.clone()));
        ClusterBroker {
            shared,
            coordinator: Mutex::new(Some(coordinator)),
        }
    }
}

impl Shared {
    /// The Redis shard channel of a broker channel (see [`sharded_name`]).
    fn prefixed(&self, channel: &str) -> String {
        sharded_name(&self.options.prefix, channel)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, BrokerError> {
        match tokio::time::timeout(self.options.timeout, call).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(BrokerError::Timeout(self.options.timeout)),
        }
    }

    /// Recomputes `up` from the shards; counts a reconnect when it comes back.
    fn update_up(&self) {
        let up = {
            let state = self.state();
            state.slots.is_some()
                && state
                    .shards
                    .values()
                    .all(|(shard, _)| !shard.failing.load(Ordering::Acquire))
        };
        let before = self.up.swap(up, Ordering::AcqRel);
        if up && !before {
            if self.was_up.swap(true, Ordering::AcqRel) {
                self.metrics.broker_reconnects.inc();
            }
            tracing::info!("redis cluster broker up");
        } else if !up && before {
            tracing::warn!("redis cluster broker down: a shard with subscriptions is unreachable");
        }
        self.metrics.broker_up.set(up as i64);
    }

    /// The shard for `addr`, started if new; counts one more channel on it. Caller holds `state`.
    fn assign(self: &Arc<Self>, state: &mut State, channel: &str, addr: &str) -> Arc<Shard> {
        Shared::unassign(state, channel);
        state.channels.insert(channel.to_owned(), addr.to_owned());
        let probe = state.slots.as_ref().and_then(|m| {
            m.probe_channel(
                &format!("{}__probe:{}:", self.options.prefix, self.options.node_id),
                addr,
            )
        });
        let entry = state.shards.entry(addr.to_owned()).or_insert_with(|| {
            let shard = Arc::new(Shard {
                addr: addr.to_owned(),
                conn: watch::Sender::new(None),
                failing: AtomicBool::new(false),
                probe: Mutex::new(probe),
                stop: self.stop.child_token(),
            });
            tokio::spawn(run_shard(Arc::downgrade(self), shard.clone()));
            (shard, 0)
        });
        entry.1 += 1;
        entry.0.clone()
    }

    /// Takes `channel` off its shard; stops the shard when it carries nothing more. Returns the
    /// shard's live connection (to SUNSUBSCRIBE on) if it stays. Caller holds `state`.
    fn unassign(state: &mut State, channel: &str) -> Option<MultiplexedConnection> {
        let addr = state.channels.remove(channel)?;
        let (shard, count) = state.shards.get_mut(&addr)?;
        *count -= 1;
        if *count == 0 {
            shard.stop.cancel();
            state.shards.remove(&addr);
            return None;
        }
        shard.conn.borrow().clone()
    }
}

/// Reads the slot map and moves channels to their owners, periodically and on demand.
async fn coordinate(shared: Arc<Shared>) {
    loop {
        match read_slot_map(&shared).await {
            Ok(map) => reconcile(&shared, map).await,
            Err(e) => tracing::warn!(error = %e, "redis cluster slot map not read"),
        }
        shared.update_up();
        let wait = if shared.up.load(Ordering::Acquire) {
            shared.options.probe_interval
        } else {
            DEGRADED_REFRESH
        };
        tokio::select! {
            _ = shared.refresh.notified() => {
                // Coalesce a burst of reports into one read.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shared.stop.cancelled() => return,
        }
    }
}

async fn read_slot_map(shared: &Shared) -> Result<SlotMap, BrokerError> {
    let reply: Value = shared
        .commands
        .run(|mut c| async move { redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await })
        .await?;
    let host = match shared.options.template.addr() {
        redis::ConnectionAddr::Tcp(host, _) | redis::ConnectionAddr::TcpTls { host, .. } => {
            host.clone()
        }
        _ => String::new(),
    };
    SlotMap::from_cluster_slots(&reply, &host).ok_or(BrokerError::Down)
}

/// Applies a new slot map: every channel whose owner changed moves to the new owner.
async fn reconcile(shared: &Arc<Shared>, map: SlotMap) {
    let mut moves = Vec::new();
    {
        let mut state = shared.state();
        if state.slots.as_ref() == Some(&map) {
            return;
        }
        // A slot nobody serves (mid-failover) keeps its channels on their last master, whose
        // shard keeps reconnecting until a map names the new owner.
        let moved: Vec<(String, String)> = state
            .channels
            .iter()
            .filter_map(|(channel, addr)| {
                let owner = map.owner_of(&shared.prefixed(channel))?;
                (owner != addr.as_str()).then(|| (channel.clone(), owner.to_owned()))
            })
            .collect();
        state.slots = Some(map);
        let base = format!(
            "{}__probe:{}:",
            shared.options.prefix, shared.options.node_id
        );
        for (shard, _) in state.shards.values() {
            let probe = state
                .slots
                .as_ref()
                .and_then(|m| m.probe_channel(&base, &shard.addr));
            *shard.probe.lock().unwrap_or_else(|e| e.into_inner()) = probe;
        }
        for (channel, owner) in moved {
            let old = Shared::unassign(&mut state, &channel);
            let new = shared.assign(&mut state, &channel, &owner);
            moves.push((channel, old, new));
        }
    }
    for (channel, old, new) in moves {
        let full = shared.prefixed(&channel);
        tracing::info!(channel = %channel, to = %new.addr, "sharded channel moves to its new owner");
        if let Some(mut old) = old {
            let _ = shared
                .bounded(redis::cmd("SUNSUBSCRIBE").arg(&full).exec_async(&mut old))
                .await;
        }
        let live = new.conn.borrow().clone();
        if let Some(mut conn) = live {
            if let Err(e) = shared
                .bounded(redis::cmd("SSUBSCRIBE").arg(&full).exec_async(&mut conn))
                .await
            {
                tracing::warn!(error = %e, channel = %channel, "ssubscribe on the new owner failed");
                shared.refresh.notify_one();
            }
        }
    }
}

/// Forwards a shard connection's pushes: messages straight to the sink (in order, no task per
/// message), probes and subscription changes to the shard task.
struct PushRouter {
    prefix: String,
    probe_prefix: String,
    sink: Arc<dyn MessageSink>,
    positioned: bool,
    events: mpsc::UnboundedSender<Event>,
}

impl AsyncPushSender for PushRouter {
    fn send(&self, info: PushInfo) -> Result<(), SendError> {
        fn name(v: Option<&Value>) -> Option<&[u8]> {
            match v {
                Some(Value::BulkString(b)) => Some(b.as_slice()),
                _ => None,
            }
        }
        match info.kind {
            PushKind::SMessage | PushKind::Message => {
                let (Some(channel), Some(payload)) =
                    (name(info.data.first()), name(info.data.get(1)))
                else {
                    return Ok(());
                };
                if channel.starts_with(self.probe_prefix.as_bytes()) {
                    let _ = self.events.send(Event::Probe(payload.to_vec()));
                } else if let Some(channel) = std::str::from_utf8(channel)
                    .ok()
                    .and_then(|name| broker_channel(&self.prefix, name))
                {
                    if self.positioned {
                        let (position, payload) = parse_positioned(payload);
                        self.sink.deliver(&channel, payload, position);
                    } else {
                        self.sink.deliver(&channel, payload, None);
                    }
                }
            }
            PushKind::SUnsubscribe => {
                if let Some(channel) = name(info.data.first()) {
                    let channel = String::from_utf8_lossy(channel).into_owned();
                    let _ = self.events.send(Event::Unsubscribed(channel));
                }
            }
            PushKind::Disconnection => {
                let _ = self.events.send(Event::Disconnected);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Keeps one master's pub/sub connection alive while the shard carries channels.
async fn run_shard(shared: Weak<Shared>, shard: Arc<Shard>) {
    let mut failures: u32 = 0;
    loop {
        let Some(strong) = shared.upgrade() else {
            return;
        };
        let lost = serve_shard(&strong, &shard, &mut failures).await;
        shard.conn.send_replace(None);
        if shard.stop.is_cancelled() {
            strong.update_up();
            return;
        }
        shard.failing.store(true, Ordering::Release);
        tracing::warn!(shard = %shard.addr, reason = lost, attempt = failures, "redis shard pub/sub connection lost");
        strong.update_up();
        strong.refresh.notify_one();
        drop(strong);
        let delay = MIN_BACKOFF
            .saturating_mul(1u32 << failures.min(16))
            .min(MAX_BACKOFF)
            .mul_f64(rand::random_range(0.5..=1.0));
        failures = failures.saturating_add(1);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shard.stop.cancelled() => return,
        }
    }
}

/// Connects, restores the shard's subscriptions and serves it until the connection is lost.
async fn serve_shard(shared: &Arc<Shared>, shard: &Arc<Shard>, failures: &mut u32) -> &'static str {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let probe_prefix = format!(
        "{}__probe:{}:",
        shared.options.prefix, shared.options.node_id
    );
    let router = PushRouter {
        prefix: shared.options.prefix.clone(),
        probe_prefix,
        sink: shared.sink.clone(),
        positioned: shared.options.positioned,
        events: events_tx,
    };
    let Some((host, port)) = shard
        .addr
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse().ok()?)))
    else {
        return "bad address";
    };
    let info = crate::redis_client::for_node(&shared.options.template, host, port);
    let connect = async {
        let client = redis::Client::open(info)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(shared.options.timeout))
            .set_response_timeout(Some(shared.options.timeout))
            .set_push_sender(router);
        client
            .get_multiplexed_async_connection_with_config(&config)
            .await
    };
    let mut conn = tokio::select! {
        c = shared.bounded(connect) => match c {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(shard = %shard.addr, error = %e, "shard connect failed");
                return "connect failed";
            }
        },
        _ = shard.stop.cancelled() => return "stopped",
    };
    // Restore: the probe channel, then every channel of this shard, one SSUBSCRIBE per channel
    // (a multi-channel SSUBSCRIBE spanning slots is refused with CROSSSLOT).
    let mut subscribed_probe = shard
        .probe
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let mut names: Vec<String> = {
        let state = shared.state();
        state
            .channels
            .iter()
            .filter(|(_, addr)| **addr == shard.addr)
            .map(|(c, _)| shared.prefixed(c))
            .collect()
    };
    names.extend(subscribed_probe.clone());
    for batch in names.chunks(RESUBSCRIBE_BATCH) {
        let mut pipe = redis::pipe();
        for name in batch {
            pipe.cmd("SSUBSCRIBE").arg(name);
        }
        if let Err(e) = shared.bounded(pipe.exec_async(&mut conn)).await {
            tracing::warn!(shard = %shard.addr, error = %e, "shard resubscribe failed");
            return "resubscribe failed";
        }
    }
    shard.conn.send_replace(Some(conn.clone()));
    tracing::info!(shard = %shard.addr, channels = names.len(), "redis shard pub/sub connected");

    let mut probe = tokio::time::interval(shared.options.probe_interval);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq: u64 = 0;
    let mut outstanding: Option<u64> = None;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                None | Some(Event::Disconnected) => return "closed",
                Some(Event::Probe(payload)) => {
                    let got = std::str::from_utf8(&payload).ok().and_then(|s| s.parse::<u64>().ok());
                    if got.is_some() && got == outstanding {
                        outstanding = None;
                        if shard.failing.swap(false, Ordering::AcqRel) || !shared.up.load(Ordering::Acquire) {
                            *failures = 0;
                            shared.update_up();
                        }
                    }
                }
                Some(Event::Unsubscribed(full)) => {
                    let still_ours = broker_channel(&shared.options.prefix, &full)
                        .is_some_and(|c| shared.state().channels.get(c.as_ref()) == Some(&shard.addr));
                    if still_ours {
                        // Redis moved the slot away (migration): find the new owner.
                        tracing::info!(shard = %shard.addr, channel = %full, "redis moved a subscribed channel away");
                        shared.refresh.notify_one();
                    }
                }
            },
            _ = probe.tick() => {
                if outstanding.is_some() {
                    return "probe missed";
                }
                let current = shard.probe.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if current != subscribed_probe {
                    if let Some(name) = &current {
                        if shared.bounded(redis::cmd("SSUBSCRIBE").arg(name).exec_async(&mut conn)).await.is_err() {
                            return "probe resubscribe failed";
                        }
                    }
                    if let Some(old) = &subscribed_probe {
                        let _ = shared.bounded(redis::cmd("SUNSUBSCRIBE").arg(old).exec_async(&mut conn)).await;
                    }
                    subscribed_probe = current;
                }
                let Some(channel) = subscribed_probe.clone() else {
                    // The map gives this master no slot: it is no longer an owner.
                    shared.refresh.notify_one();
                    continue;
                };
                seq += 1;
                outstanding = Some(seq);
                let shared = shared.clone();
                // Published from its own task so pushes keep being handled meanwhile.
                tokio::spawn(async move {
                    let _ = shared.commands.publish("SPUBLISH", channel, seq).await;
                });
            }
            _ = shard.stop.cancelled() => return "stopped",
        }
    }
}

#[async_trait]
impl Broker for ClusterBroker {
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let full = shared.prefixed(channel);
        let shard = {
            let mut state = shared.state();
            let Some(owner) = state.slots.as_ref().and_then(|m| m.owner_of(&full)) else {
                return Err(BrokerError::Down);
            };
            let owner = owner.to_owned();
            shared.assign(&mut state, channel, &owner)
        };
        let result = async {
            let mut rx = shard.conn.subscribe();
            let conn =
                match tokio::time::timeout(shared.options.timeout, rx.wait_for(Option::is_some))
                    .await
                {
                    Ok(Ok(conn)) => conn.clone(),
                    _ => None,
                };
            let Some(mut conn) = conn else {
                return Err(BrokerError::Down);
            };
            shared
                .bounded(redis::cmd("SSUBSCRIBE").arg(&full).exec_async(&mut conn))
                .await
        }
        .await;
        if let Err(e) = &result {
            if let BrokerError::Redis(e) = e {
                if e.code() == Some("MOVED") || e.code() == Some("ASK") {
                    shared.refresh.notify_one();
                }
            }
            let mut state = shared.state();
            if state.channels.get(channel) == Some(&shard.addr) {
                Shared::unassign(&mut state, channel);
            }
        }
        result
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let conn = Shared::unassign(&mut shared.state(), channel);
        shared.update_up();
        match conn {
            Some(mut conn) => {
                shared
                    .bounded(
                        redis::cmd("SUNSUBSCRIBE")
                            .arg(shared.prefixed(channel))
                            .exec_async(&mut conn),
                    )
                    .await
            }
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
            .publish("SPUBLISH", name, payload.as_ref())
            .await
            .map(|_| ())
    }

    fn is_up(&self) -> bool {
        self.shared.up.load(Ordering::Acquire)
    }

    async fn shutdown(&self) {
        self.shared.stop.cancel();
        let task = self
            .coordinator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Drop for ClusterBroker {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}
