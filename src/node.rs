//! What the connections of one node share: the hub, the broker, presence, metrics and settings.
//!
//! Subscribing and unsubscribing live here because they span the three roles: the node subscribes
//! a channel on the broker when its first local subscriber arrives and unsubscribes it after the
//! last one leaves. Those two steps are serialised per channel by a small array of async locks
//! (indexed by channel hash), so racing clients always leave the node subscribed on the broker
//! exactly when it has local subscribers; unrelated channels rarely share a lock. A connection
//! that asked for a channel's presence events is also a local subscriber of the broker channel
//! `__presence:<channel>`, through the same machinery.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::auth::{Auth, Identity};
use crate::broker::{
    Broker, ClusterBroker, ClusterBrokerOptions, MemoryBroker, MessageSink, RedisBroker,
    RedisBrokerOptions,
};
use crate::config::Config;
use crate::control::{self, Router};
use crate::error::{BrokerError, Error};
use crate::history::{History, MemoryHistory, Read, RedisHistory, RedisHistoryOptions, Snapshot};
use crate::hub::{FanOut, FanOutOptions, Gate, Hub};
use crate::metrics::Metrics;
use crate::origin::AllowedOrigins;
use crate::presence::{
    events_channel, is_events_channel, EventKind, Listing, MemoryPresence, Presence, RedisPresence,
};
use crate::redis_commands::RedisCommands;
use crate::shard;
use crate::shutdown::Drain;
use crate::users::Users;
use crate::wire::{Budget, Member, Outbox};

const CHANNEL_LOCKS: usize = 1024;

/// Per-connection limits and timers, copied out of [`Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_message_size: usize,
    pub max_subscriptions: usize,
    pub send_queue: usize,
    /// Bytes queued for one connection before it counts as a slow consumer.
    pub send_buffer: usize,
    /// Client messages per second per connection; 0 = unlimited.
    pub rate_limit: u32,
    /// Token bucket capacity of the rate limit.
    pub rate_burst: u32,
    /// WebSocket connections on this node; 0 = unlimited.
    pub max_connections: usize,
    /// Time to send request headers (and finish a TLS handshake).
    pub handshake_timeout: Duration,
    /// Most members in one presence reply.
    pub presence_max_members: usize,
}

impl Limits {
    /// One connection's send budget.
    pub fn budget(&self) -> Budget {
        Budget {
            frames: self.send_queue,
            bytes: self.send_buffer,
        }
    }
}

/// Shared state of one node; connections hold it as `Arc<Node>`.
pub struct Node {
    id: String,
    limits: Limits,
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    presence: Arc<dyn Presence>,
    /// `None` with history off (`PUBGATE_HISTORY_SIZE=0`): v1 paths only.
    history: Option<Arc<dyn History>>,
    /// `PUBGATE_HISTORY_SIZE`: the default and largest `limit` of a `history` request.
    history_size: usize,
    /// `PUBGATE_API_KEY`; `None`: the HTTP server API answers 404.
    api_key: Option<String>,
    metrics: Arc<Metrics>,
    /// Shared with the metrics' queued-bytes gauge, which sums the registered connections.
    drain: Arc<Drain>,
    /// Token verification, or anonymous mode.
    auth: Auth,
    /// `Origin` allowlist; `None` allows any origin.
    origins: Option<AllowedOrigins>,
    /// Authenticated connections by user, for control disconnects.
    users: Arc<Users>,
    /// Whether `/console` is served (`PUBGATE_CONSOLE`).
    console: bool,
    /// Set once the broker took the `__control` subscription (see [`control::subscribe`]);
    /// shared with its retry task.
    control_live: Arc<AtomicBool>,
    /// Admitted WebSocket connections (see [`Node::admit`]); exact, unlike the gauge, because
    /// the cap is checked against it.
    admitted: AtomicUsize,
    /// Set when a drain removed this node's members in one batch: closing connections then
    /// skip their own presence removal.
    presence_released: AtomicBool,
    /// Serialise broker subscribe/unsubscribe per channel (see the module doc).
    channel_locks: Box<[Mutex<()>]>,
    next_key: AtomicU64,
}

impl Node {
    /// Builds the node's parts: the memory broker and presence, or the Redis ones when
    /// `PUBGATE_REDIS_URL` is set (their connections are made in the background).
    pub async fn start(config: &Config, id: String) -> Result<Arc<Node>, Error> {
        let auth = Auth::from_config(config)?;
        let origins = AllowedOrigins::parse(config.allowed_origins.as_deref())?;
        let metrics = Arc::new(Metrics::new()?);
        let hub = Arc::new(Hub::with_max_payload(
            metrics.clone(),
            config.max_message_size,
        ));
        let users = Arc::new(Users::default());
        // With Redis the broker's reader hands messages to fan-out workers; the memory broker
        // delivers in the publisher's task.
        let fanout = config.uses_redis().then(|| {
            let options = FanOutOptions {
                workers: config.fanout_workers(),
                queue: config.fanout_queue,
            };
            Arc::new(FanOut::start(hub.clone(), options, metrics.clone()))
        });
        let to_hub: Arc<dyn MessageSink> = match &fanout {
            Some(fanout) => fanout.clone(),
            None => hub.clone(),
        };
        if let Some(fanout) = &fanout {
            let fanout = Arc::downgrade(fanout);
            metrics.register_fanout_queued(move || fanout.upgrade().map_or(0, |f| f.queued()))?;
        }
        let sink: Arc<dyn MessageSink> = Arc::new(Router {
            hub: to_hub,
            users: users.clone(),
        });
        let ca = crate::redis_client::read_ca(config.redis_ca_file.as_deref())?;
        let seeds = config.cluster_seeds();
        let history_on = config.history_size > 0;
        let (broker, presence, history): Stores = match &config.redis_url {
            None if !seeds.is_empty() => {
                let commands = Arc::new(RedisCommands::cluster(
                    &seeds,
                    ca.as_deref(),
                    config.redis_timeout,
                )?);
                let template = crate::redis_client::open(seeds[0].as_str(), ca.as_deref())
                    .map_err(|e| Error::Redis(e.to_string()))?
                    .get_connection_info()
                    .clone();
                let options = ClusterBrokerOptions {
                    template,
                    prefix: config.channel_prefix.clone(),
                    node_id: id.clone(),
                    probe_interval: config.broker_probe_interval,
                    timeout: config.redis_timeout,
                    positioned: history_on,
                };
                let (presence, history) = redis_stores(config, &commands, &id);
                let broker = ClusterBroker::start(options, commands, sink, metrics.clone());
                (Arc::new(broker), presence, history)
            }
            None => {
                let history = history_on.then(|| {
                    Arc::new(MemoryHistory::new(
                        sink.clone(),
                        config.history_size,
                        config.history_ttl,
                    )) as Arc<dyn History>
                });
                let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(sink));
                let presence = MemoryPresence::with_events(broker.clone());
                (broker, Arc::new(presence), history)
            }
            Some(url) => {
                let commands = Arc::new(RedisCommands::with_ca(
                    url,
                    ca.as_deref(),
                    config.redis_timeout,
                )?);
                let options = RedisBrokerOptions {
                    url: url.clone(),
                    ca,
                    prefix: config.channel_prefix.clone(),
                    node_id: id.clone(),
                    probe_interval: config.broker_probe_interval,
                    timeout: config.redis_timeout,
                    positioned: history_on,
                };
                let (presence, history) = redis_stores(config, &commands, &id);
                let broker = RedisBroker::start(options, commands, sink, metrics.clone())?;
                (Arc::new(broker), presence, history)
            }
        };
        metrics.broker_up.set(broker.is_up() as i64);
        let drain = Arc::new(Drain::default());
        metrics.register_queued_bytes({
            let drain = drain.clone();
            move || drain.queued_bytes()
        })?;
        let node = Arc::new(Node {
            id,
            limits: Limits {
                ping_interval: config.ping_interval,
                pong_timeout: config.pong_timeout,
                max_message_size: config.max_message_size,
                max_subscriptions: config.max_subscriptions,
                send_queue: config.send_queue,
                send_buffer: config.send_buffer,
                rate_limit: config.rate_limit,
                rate_burst: config.rate_burst,
                max_connections: config.max_connections,
                handshake_timeout: config.handshake_timeout,
                presence_max_members: config.presence_max_members,
            },
            hub,
            broker,
            presence,
            history,
            history_size: config.history_size,
            api_key: config.api_key.clone(),
            metrics,
            drain,
            auth,
            origins,
            users,
            console: config.console,
            control_live: Arc::new(AtomicBool::new(false)),
            admitted: AtomicUsize::new(0),
            presence_released: AtomicBool::new(false),
            channel_locks: (0..CHANNEL_LOCKS).map(|_| Mutex::new(())).collect(),
            next_key: AtomicU64::new(1),
        });
        control::subscribe(&node.broker, &node.control_live).await;
        if config.uses_redis() {
            tokio::spawn(heartbeat(
                Arc::downgrade(&node),
                RedisPresence::beat_interval(config.presence_ttl),
            ));
        }
        Ok(node)
    }

    /// This node's id (`PUBGATE_NODE_ID`, or generated).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The node's limits and timers.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The node's metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The local fan-out (for the fuzzing entry points' leak checks).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The drain flag and the registry of open connections.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// Token verification, or anonymous mode.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// The `Origin` allowlist; `None` allows any origin.
    pub fn origins(&self) -> Option<&AllowedOrigins> {
        self.origins.as_ref()
    }

    /// Authenticated connections by user.
    pub fn users(&self) -> &Users {
        &self.users
    }

    /// Whether history is on (`PUBGATE_HISTORY_SIZE` above 0).
    pub fn history_on(&self) -> bool {
        self.history.is_some()
    }

    /// `PUBGATE_HISTORY_SIZE`: the default and largest `limit` of a `history` request.
    pub fn history_size(&self) -> usize {
        self.history_size
    }

    /// `PUBGATE_API_KEY`; `None`: the HTTP server API answers 404.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// Whether `/console` is served (`PUBGATE_CONSOLE`).
    pub fn console(&self) -> bool {
        self.console
    }

    /// Whether the broker is connected and delivering.
    pub fn broker_up(&self) -> bool {
        self.broker.is_up()
    }

    /// Registers a new connection of `identity`: its outbox, with a fresh conn id and this
    /// node's send budget, in the drain registry (closed at once if clients are being closed).
    /// Undone by [`Node::unregister`] once the connection is over.
    pub fn register(&self, identity: &Identity) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("{:016x}", rand::random::<u64>()),
            node: self.id.clone(),
            user: identity.user.clone(),
            info: identity.info.clone(),
        };
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::new(key, member, self.limits.budget()));
        self.drain.register(&outbox);
        outbox
    }

    /// Forgets a closed connection.
    pub fn unregister(&self, outbox: &Outbox) {
        self.drain.unregister(outbox.key);
    }

    /// Takes one of the node's connection slots, or `None` at `PUBGATE_MAX_CONNECTIONS`. The
    /// slot is released when the returned guard drops (the session task ends), so the count is
    /// exact under concurrent upgrades and closes.
    pub fn admit(self: &Arc<Self>) -> Option<ConnectionSlot> {
        let max = self.limits.max_connections;
        self.admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionSlot { node: self.clone() })
    }

    /// `Ok` when the node should receive traffic, else the reason for `/readyz`.
    pub fn readiness(&self) -> Result<(), &'static str> {
        if self.drain.is_draining() {
            Err("draining")
        } else if !self.broker.is_up() {
            Err("broker unavailable")
        } else if !self.control_live.load(Ordering::Acquire) {
            Err("control channel not subscribed yet")
        } else {
            Ok(())
        }
    }

    fn channel_lock(&self, channel: &str) -> &Mutex<()> {
        &self.channel_locks[shard::index(channel, CHANNEL_LOCKS)]
    }

    /// Makes `outbox` a local subscriber of `key` (a channel, or a channel's events channel):
    /// the node subscribes the broker on the first one.
    async fn attach(&self, outbox: &Arc<Outbox>, key: &str) -> Result<(), BrokerError> {
        let _guard = self.channel_lock(key).lock().await;
        if !self.hub.has_channel(key) {
            self.broker.subscribe(key).await?;
        }
        self.hub.add(key, outbox);
        Ok(())
    }

    /// Undoes [`Node::attach`]: after the last local subscriber the broker is unsubscribed and,
    /// for a channel, the presence store told that this node has no member left there.
    async fn detach(&self, outbox: &Outbox, key: &str) {
        let _guard = self.channel_lock(key).lock().await;
        if self.hub.remove(key, outbox.key) {
            if let Err(e) = self.broker.unsubscribe(key).await {
                tracing::warn!(error = %e, channel = key, "broker unsubscribe failed");
            }
            if !is_events_channel(key) {
                if let Err(e) = self.presence.unindex(key).await {
                    tracing::debug!(error = %e, channel = key, "presence unindex failed");
                }
            }
        }
    }

    /// [`Node::subscribe`] with history on: the subscription is registered behind a gate that
    /// holds its live deliveries (see [`Gate`]); `None` if it already existed.
    pub async fn subscribe_gated(
        &self,
        outbox: &Arc<Outbox>,
        channel: &str,
    ) -> Result<Option<Arc<Gate>>, BrokerError> {
        let gate = {
            let _guard = self.channel_lock(channel).lock().await;
            if !self.hub.has_channel(channel) {
                self.broker.subscribe(channel).await?;
            }
            self.hub.add_gated(channel, outbox, self.limits.budget())
        };
        match self.presence.add(channel, &outbox.member).await {
            Ok(joined) => {
                self.count_events(EventKind::Join, joined as usize);
                Ok(gate)
            }
            Err(e) => {
                self.detach(outbox, channel).await;
                Err(e)
            }
        }
    }

    /// Reads a channel's history (history on; `Down` when the broker is).
    pub async fn history_read(
        &self,
        channel: &str,
        read: Read<'_>,
    ) -> Result<Snapshot, BrokerError> {
        let Some(history) = &self.history else {
            return Err(BrokerError::Down);
        };
        if !self.broker.is_up() {
            return Err(BrokerError::Down);
        }
        history.read(channel, read).await
    }

    fn count_events(&self, kind: EventKind, n: usize) {
        if n > 0 {
            self.metrics
                .presence_events
                .with_label_values(&[kind.as_str()])
                .inc_by(n as u64);
        }
    }

    /// Subscribes a connection; returns once the subscription is live on the broker and the
    /// member is visible in presence (its join published).
    pub async fn subscribe(&self, outbox: &Arc<Outbox>, channel: &str) -> Result<(), BrokerError> {
        self.attach(outbox, channel).await?;
        match self.presence.add(channel, &outbox.member).await {
            Ok(joined) => {
                self.count_events(EventKind::Join, joined as usize);
                Ok(())
            }
            Err(e) => {
                self.detach(outbox, channel).await;
                Err(e)
            }
        }
    }

    /// Starts delivering `channel`'s join/leave events to the connection; they flow once this
    /// returns.
    pub async fn watch_presence(
        &self,
        outbox: &Arc<Outbox>,
        channel: &str,
    ) -> Result<(), BrokerError> {
        self.attach(outbox, &events_channel(channel)).await
    }

    /// Stops delivering `channel`'s presence events to the connection.
    pub async fn unwatch_presence(&self, outbox: &Outbox, channel: &str) {
        self.detach(outbox, &events_channel(channel)).await
    }

    /// Unsubscribes a connection; the member is gone from presence (its leave published) when
    /// this returns.
    pub async fn unsubscribe(&self, outbox: &Outbox, channel: &str) {
        match self.presence.remove(channel, outbox.conn_id()).await {
            Ok(leaves) => self.count_events(EventKind::Leave, leaves),
            Err(e) => {
                tracing::warn!(error = %e, channel, "presence remove failed; a reaper removes the member if this node dies")
            }
        }
        self.detach(outbox, channel).await;
    }

    /// Removes a closed connection from every channel it had (or was joining or leaving) and
    /// from the presence events it watched.
    pub async fn disconnect(&self, outbox: &Outbox, channels: &[String], watched: &[String]) {
        for channel in watched {
            self.unwatch_presence(outbox, channel).await;
        }
        if channels.is_empty() {
            return;
        }
        if !self.presence_released.load(Ordering::Acquire) {
            match self.presence.remove_all(outbox.conn_id(), channels).await {
                Ok(leaves) => self.count_events(EventKind::Leave, leaves),
                Err(e) => {
                    tracing::warn!(error = %e, "presence remove failed; a reaper removes the members if this node dies")
                }
            }
        }
        for channel in channels {
            self.detach(outbox, channel).await;
        }
    }

    /// Ends subscriptions a refresh no longer permits (and the presence events watched on
    /// them). Deliveries stop first: the hub entries go at once, before any lock wait or Redis
    /// call; then the members leave presence (their leaves published), then the broker drops the
    /// channels left without a local subscriber. A subscribe racing in between finds the channel
    /// absent and (re)subscribes the broker, which is idempotent; the emptiness check under the
    /// channel lock then keeps the broker subscription.
    pub async fn revoke(&self, outbox: &Outbox, channels: &[String], watched: &[String]) {
        let keys: Vec<String> = channels
            .iter()
            .cloned()
            .chain(watched.iter().map(|c| events_channel(c)))
            .collect();
        if keys.is_empty() {
            return;
        }
        let emptied: Vec<&String> = keys
            .iter()
            .filter(|key| self.hub.remove(key, outbox.key))
            .collect();
        if !channels.is_empty() {
            match self.presence.remove_all(outbox.conn_id(), channels).await {
                Ok(leaves) => self.count_events(EventKind::Leave, leaves),
                Err(e) => {
                    tracing::warn!(error = %e, "presence remove failed; a reaper removes the members if this node dies")
                }
            }
        }
        for key in emptied {
            let _guard = self.channel_lock(key).lock().await;
            if self.hub.has_channel(key) {
                continue;
            }
            if let Err(e) = self.broker.unsubscribe(key).await {
                tracing::warn!(error = %e, channel = %key, "broker unsubscribe failed");
            }
            if !is_events_channel(key) {
                if let Err(e) = self.presence.unindex(key).await {
                    tracing::debug!(error = %e, channel = %key, "presence unindex failed");
                }
            }
        }
    }

    /// A drain's presence step: removes every member of this node in one batch (grouped by
    /// channel, pipelined, with their leaves) within `budget`, instead of one removal per
    /// closing connection. The members are taken now, before the connections are closed; the
    /// returned future does the removal. Members it does not remove in time (or that subscribe
    /// after this call) are reaped by the other nodes once this node's heartbeat lapses.
    pub fn release_presence(
        self: &Arc<Self>,
        budget: Duration,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.presence_released.store(true, Ordering::Release);
        let members = self.hub.members();
        let node = self.clone();
        async move {
            if members.is_empty() {
                return;
            }
            let started = Instant::now();
            match tokio::time::timeout(budget, node.presence.remove_members(&members)).await {
                Ok(Ok(leaves)) => {
                    node.count_events(EventKind::Leave, leaves);
                    tracing::info!(
                        members = members.len(),
                        leaves,
                        ms = started.elapsed().as_millis() as u64,
                        "presence members released"
                    );
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "presence release failed; members are reaped after the heartbeat lapses")
                }
                Err(_) => tracing::warn!(
                    budget_ms = budget.as_millis() as u64,
                    "presence release timed out; the rest is reaped after the heartbeat lapses"
                ),
            }
        }
    }

    /// Publishes a client's `data` (its JSON text); `Ok` once the broker accepted it, with the
    /// message's offset when history is on.
    pub async fn publish(&self, channel: &str, data: &str) -> Result<Option<u64>, BrokerError> {
        if !self.broker.is_up() {
            return Err(BrokerError::Down);
        }
        let started = Instant::now();
        let payload = Bytes::copy_from_slice(data.as_bytes());
        let offset = match &self.history {
            None => {
                self.broker.publish(channel, payload).await?;
                None
            }
            Some(history) => {
                let offset = history.publish(channel, payload).await?;
                self.metrics.history_appends.inc();
                Some(offset)
            }
        };
        self.metrics
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.messages_published.inc();
        Ok(offset)
    }

    /// Publishes a control disconnect of `user` to every node, this one included (see
    /// [`control`]); `Ok` once the broker accepted it.
    pub async fn disconnect_user(&self, user: &str) -> Result<(), BrokerError> {
        let message = serde_json::json!({"type": "disconnect", "user": user}).to_string();
        self.broker
            .publish(control::CONTROL_CHANNEL, Bytes::from(message))
            .await
    }

    /// The exact member count of `channel` on every node, with at most
    /// `PUBGATE_PRESENCE_MAX_MEMBERS` members (none when `count_only`).
    pub async fn presence(&self, channel: &str, count_only: bool) -> Result<Listing, BrokerError> {
        let started = Instant::now();
        let max = if count_only {
            0
        } else {
            self.limits.presence_max_members
        };
        let listing = self.presence.list(channel, max).await?;
        self.metrics
            .presence_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(listing)
    }

    /// Stops background work after the last connection closed.
    pub async fn shutdown(&self) {
        self.broker.shutdown().await;
    }
}

/// The broker, presence and history of one node.
type Stores = (Arc<dyn Broker>, Arc<dyn Presence>, Option<Arc<dyn History>>);

/// Presence and (history on) history over Redis: the same for one Redis and for a cluster.
fn redis_stores(
    config: &Config,
    commands: &Arc<RedisCommands>,
    id: &str,
) -> (Arc<dyn Presence>, Option<Arc<dyn History>>) {
    let history = (config.history_size > 0).then(|| {
        let options = RedisHistoryOptions {
            prefix: config.channel_prefix.clone(),
            size: config.history_size,
            ttl: config.history_ttl,
        };
        Arc::new(RedisHistory::new(commands.clone(), options)) as Arc<dyn History>
    });
    let presence = RedisPresence::new(
        commands.clone(),
        config.channel_prefix.clone(),
        config.presence_ttl,
        id.to_owned(),
    );
    (Arc::new(presence), history)
}

/// One admitted connection; releases its slot on drop.
pub struct ConnectionSlot {
    node: Arc<Node>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.node.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The node's presence heartbeat (Redis only), every tenth of the presence TTL: keeps the node
/// alive in the store, restores its members when the store lost them (Redis restarted empty, or
/// the node was reaped after a stall; only once no reaper holds the node's lock), and reaps the
/// members of nodes whose heartbeat lapsed, each in a task of its own so the beat stays on time.
///
/// A node reaps only after a few successful beats in a row: after a Redis outage every node's
/// heartbeat has lapsed, and the first node back must not take the others, still reconnecting,
/// for dead.
async fn heartbeat(node: std::sync::Weak<Node>, every: Duration) {
    const STREAK_TO_REAP: u32 = 3;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut restore = false;
    let mut failing = false;
    let mut streak = 0u32;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let beat = match node.presence.heartbeat().await {
            Ok(beat) => {
                failing = false;
                streak = streak.saturating_add(1);
                beat
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "presence heartbeat failed");
                }
                failing = true;
                streak = 0;
                continue;
            }
        };
        restore |= beat.lost;
        if restore && !beat.being_reaped {
            let members = node.hub.members();
            match node.presence.restore(&members).await {
                Ok(joins) => {
                    node.count_events(EventKind::Join, joins);
                    // Members that left while the batch was in flight were re-added: remove them.
                    let current: std::collections::HashSet<_> =
                        node.hub.members().into_iter().collect();
                    let stale: Vec<_> = members
                        .into_iter()
                        .filter(|m| !current.contains(m))
                        .collect();
                    if let Ok(leaves) = node.presence.remove_members(&stale).await {
                        node.count_events(EventKind::Leave, leaves);
                    }
                    if joins > 0 {
                        tracing::info!(joins, "presence members restored");
                    }
                    restore = false;
                }
                Err(e) => tracing::warn!(error = %e, "presence restore failed; retrying"),
            }
        }
        if streak < STREAK_TO_REAP {
            continue;
        }
        for dead in beat.dead {
            let node = node.clone();
            tokio::spawn(async move {
                match node.presence.reap(&dead).await {
                    Ok(leaves) => node.count_events(EventKind::Leave, leaves),
                    Err(e) => {
                        tracing::warn!(error = %e, node = %dead, "reaping a dead node failed")
                    }
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    //! Time-driven node logic on paused time: the presence heartbeat (cadence, the streak before
    //! reaping, restoring lost members) and the drain's presence release. The Redis store itself
    //! cannot run on paused time (a paused clock fires its command timeouts while Redis answers
    //! on a real socket), so a scripted store decides what each heartbeat finds, over the memory
    //! store for the members. The broker probe lives in the Redis broker and needs a real Redis:
    //! the integration tests cover it.

    use std::collections::VecDeque;
    use std::sync::Mutex as SyncMutex;

    use async_trait::async_trait;
    use tokio::time::{sleep, Instant};

    use super::*;
    use crate::auth::Identity;
    use crate::presence::Heartbeat;

    /// What the store was asked, and when (ms since the test began).
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Beat,
        /// The conn ids of the members to restore.
        Restore(Vec<String>),
        /// How many (channel, member) pairs in one removal.
        Remove(usize),
        Reap(String),
    }

    struct Scripted {
        store: MemoryPresence,
        /// What the next heartbeats find (`Err`: the beat fails); then a healthy beat.
        beats: SyncMutex<VecDeque<Result<Heartbeat, ()>>>,
        /// Whether the next restores fail; then they succeed.
        restores: SyncMutex<VecDeque<bool>>,
        restore_takes: Duration,
        remove_takes: Duration,
        calls: SyncMutex<Vec<(u64, Call)>>,
        start: Instant,
    }

    impl Scripted {
        fn new(beats: Vec<Result<Heartbeat, ()>>) -> Scripted {
            Scripted {
                store: MemoryPresence::new(),
                beats: SyncMutex::new(beats.into()),
                restores: SyncMutex::default(),
                restore_takes: Duration::ZERO,
                remove_takes: Duration::ZERO,
                calls: SyncMutex::default(),
                start: Instant::now(),
            }
        }

        fn log(&self, call: Call) {
            let ms = self.start.elapsed().as_millis() as u64;
            self.calls.lock().unwrap().push((ms, call));
        }

        fn calls(&self) -> Vec<(u64, Call)> {
            self.calls.lock().unwrap().clone()
        }

        fn beats(&self) -> Vec<u64> {
            let calls = self.calls();
            calls
                .into_iter()
                .filter(|(_, c)| *c == Call::Beat)
                .map(|(ms, _)| ms)
                .collect()
        }

        /// Every call but the beats.
        fn others(&self) -> Vec<(u64, Call)> {
            let calls = self.calls();
            calls
                .into_iter()
                .filter(|(_, c)| *c != Call::Beat)
                .collect()
        }
    }

    #[async_trait]
    impl Presence for Scripted {
        async fn add(&self, channel: &str, member: &Member) -> Result<bool, BrokerError> {
            self.store.add(channel, member).await
        }

        async fn remove_pairs(&self, pairs: &[(&str, &str)]) -> Result<usize, BrokerError> {
            if !pairs.is_empty() {
                self.log(Call::Remove(pairs.len()));
            }
            sleep(self.remove_takes).await;
            self.store.remove_pairs(pairs).await
        }

        async fn list(&self, channel: &str, max: usize) -> Result<Listing, BrokerError> {
            self.store.list(channel, max).await
        }

        async fn restore(&self, members: &[(String, Member)]) -> Result<usize, BrokerError> {
            let ids = members.iter().map(|(_, m)| m.conn_id.clone()).collect();
            self.log(Call::Restore(ids));
            sleep(self.restore_takes).await;
            if self.restores.lock().unwrap().pop_front() == Some(false) {
                return Err(BrokerError::Down);
            }
            self.store.restore(members).await
        }

        async fn unindex(&self, _channel: &str) -> Result<(), BrokerError> {
            Ok(())
        }

        async fn heartbeat(&self) -> Result<Heartbeat, BrokerError> {
            self.log(Call::Beat);
            let next = self.beats.lock().unwrap().pop_front();
            next.unwrap_or(Ok(Heartbeat::default()))
                .map_err(|()| BrokerError::Down)
        }

        async fn reap(&self, node: &str) -> Result<usize, BrokerError> {
            self.log(Call::Reap(node.to_owned()));
            Ok(2)
        }
    }

    /// A memory node whose presence store is `presence`.
    async fn node(presence: Arc<Scripted>) -> Arc<Node> {
        let mut node = Node::start(&Config::default(), "n1".into()).await.unwrap();
        Arc::get_mut(&mut node)
            .expect("nothing else holds a new memory node")
            .presence = presence;
        node
    }

    fn events(node: &Node, kind: EventKind) -> u64 {
        node.metrics
            .presence_events
            .with_label_values(&[kind.as_str()])
            .get()
    }

    fn dead(node: &str) -> Result<Heartbeat, ()> {
        Ok(Heartbeat {
            dead: vec![node.into()],
            ..Heartbeat::default()
        })
    }

    /// Every tenth of the TTL, and dead nodes are reaped only by a node with three good beats
    /// in a row (a failed beat starts the count again).
    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_reaps_only_after_three_good_beats_in_a_row() {
        let beats = vec![
            dead("a"),
            dead("b"),
            dead("c"),
            Err(()),
            dead("d"),
            dead("e"),
            dead("f"),
        ];
        let presence = Arc::new(Scripted::new(beats));
        let node = node(presence.clone()).await;
        let every = RedisPresence::beat_interval(Duration::from_secs(30));
        assert_eq!(every, Duration::from_secs(3));
        tokio::spawn(heartbeat(Arc::downgrade(&node), every));
        sleep(Duration::from_millis(19_500)).await;
        assert_eq!(
            presence.beats(),
            [0, 3000, 6000, 9000, 12_000, 15_000, 18_000]
        );
        assert_eq!(
            presence.others(),
            [
                (6000, Call::Reap("c".into())),
                (18_000, Call::Reap("f".into()))
            ]
        );
        assert_eq!(events(&node, EventKind::Leave), 4);
    }

    /// A store that lost the node gets its members back, but not while another node is reaping
    /// it, and a failed restore is retried on the next beat.
    #[tokio::test(start_paused = true)]
    async fn lost_members_are_restored_once_no_reaper_holds_the_node() {
        let lost = |being_reaped| {
            Ok(Heartbeat {
                lost: true,
                being_reaped,
                dead: Vec::new(),
            })
        };
        let presence = Arc::new(Scripted::new(vec![lost(true), lost(true)]));
        presence.restores.lock().unwrap().push_back(false);
        let node = node(presence.clone()).await;
        let outbox = node.register(&Identity::anonymous());
        node.subscribe(&outbox, "ch").await.unwrap();
        // The store forgets the member (Redis restarted empty).
        presence.store.remove("ch", outbox.conn_id()).await.unwrap();
        tokio::spawn(heartbeat(Arc::downgrade(&node), Duration::from_secs(3)));
        sleep(Duration::from_millis(12_500)).await;
        let id = vec![outbox.conn_id().to_owned()];
        assert_eq!(
            presence.others(),
            [(6000, Call::Restore(id.clone())), (9000, Call::Restore(id))]
        );
        assert_eq!(node.presence("ch", false).await.unwrap().count, 1);
        assert_eq!(events(&node, EventKind::Join), 2, "subscribe and restore");
    }

    /// A member that leaves while a restore is in flight was re-added by it: the heartbeat
    /// removes it again, so no ghost stays in presence.
    #[tokio::test(start_paused = true)]
    async fn a_member_leaving_during_a_restore_does_not_come_back() {
        let lost = Ok(Heartbeat {
            lost: true,
            ..Heartbeat::default()
        });
        let mut presence = Scripted::new(vec![lost]);
        presence.restore_takes = Duration::from_secs(1);
        let presence = Arc::new(presence);
        let node = node(presence.clone()).await;
        let (a, b) = (
            node.register(&Identity::anonymous()),
            node.register(&Identity::anonymous()),
        );
        node.subscribe(&a, "ch").await.unwrap();
        node.subscribe(&b, "ch").await.unwrap();
        presence
            .store
            .remove_pairs(&[("ch", a.conn_id()), ("ch", b.conn_id())])
            .await
            .unwrap();
        tokio::spawn(heartbeat(Arc::downgrade(&node), Duration::from_secs(3)));
        sleep(Duration::from_millis(500)).await;
        node.unsubscribe(&a, "ch").await;
        sleep(Duration::from_secs(1)).await;
        let listing = node.presence("ch", false).await.unwrap();
        assert_eq!(listing.count, 1);
        assert_eq!(listing.members[0].conn_id, b.conn_id());
        assert_eq!(events(&node, EventKind::Join), 2 + 2);
        assert_eq!(events(&node, EventKind::Leave), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_heartbeat_ends_with_the_node() {
        let presence = Arc::new(Scripted::new(Vec::new()));
        let node = node(presence.clone()).await;
        let beating = tokio::spawn(heartbeat(Arc::downgrade(&node), Duration::from_secs(3)));
        sleep(Duration::from_secs(4)).await;
        drop(node);
        sleep(Duration::from_secs(3)).await;
        assert!(beating.is_finished());
        assert_eq!(presence.beats(), [0, 3000]);
    }

    /// A drain removes the node's members in one batch within its budget; a store slower
    /// than that is given up on (the heartbeat's lapse reaps the rest), and the closing
    /// connections then skip their own removals.
    #[tokio::test(start_paused = true)]
    async fn the_presence_release_is_one_batch_bounded_by_its_budget() {
        let presence = Arc::new(Scripted::new(Vec::new()));
        let node = node(presence.clone()).await;
        let (a, b) = (
            node.register(&Identity::anonymous()),
            node.register(&Identity::anonymous()),
        );
        node.subscribe(&a, "x").await.unwrap();
        node.subscribe(&a, "y").await.unwrap();
        node.subscribe(&b, "x").await.unwrap();
        let started = Instant::now();
        node.release_presence(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(presence.others(), [(0, Call::Remove(3))]);
        assert_eq!(events(&node, EventKind::Leave), 3);
        assert_eq!(node.presence("x", true).await.unwrap().count, 0);
        node.disconnect(&a, &["x".into(), "y".into()], &[]).await;
        assert_eq!(presence.others().len(), 1, "no second removal");
        assert!(!node.hub().has_channel("y"));

        let mut slow = Scripted::new(Vec::new());
        slow.remove_takes = Duration::from_secs(3600);
        let slow = Arc::new(slow);
        let node = self::node(slow.clone()).await;
        let a = node.register(&Identity::anonymous());
        node.subscribe(&a, "x").await.unwrap();
        let started = Instant::now();
        node.release_presence(Duration::from_secs(2)).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        node.disconnect(&a, &["x".into()], &[]).await;
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(slow.others(), [(0, Call::Remove(1))]);
        assert_eq!(events(&node, EventKind::Leave), 0);
    }
}
