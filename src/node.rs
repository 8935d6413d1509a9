//! What the connections of one node share: the hub, the broker, presence, metrics and settings.
//!
//! Subscribing and unsubscribing live here because they span the three roles: the node subscribes
//! a channel on the broker when its first local subscriber arrives and unsubscribes it after the
//! last one leaves. Those two steps are serialised per channel by a small array of async locks
//! (indexed by channel hash), so racing clients always leave the node subscribed on the broker
//! exactly when it has local subscribers; unrelated channels rarely share a lock.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Mutex;

use crate::auth::Auth;
use crate::broker::{Broker, MemoryBroker, MessageSink, RedisBroker, RedisBrokerOptions};
use crate::config::Config;
use crate::conn::Outbox;
use crate::control::{self, Router};
use crate::error::{BrokerError, Error};
use crate::hub::{channel_slot, Hub};
use crate::metrics::Metrics;
use crate::origin::AllowedOrigins;
use crate::presence::{Member, MemoryPresence, Presence, RedisPresence};
use crate::redis_commands::RedisCommands;
use crate::shutdown::Drain;
use crate::users::Users;

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
}

impl Limits {
    /// One connection's send budget.
    pub fn budget(&self) -> crate::conn::Budget {
        crate::conn::Budget {
            frames: self.send_queue,
            bytes: self.send_buffer,
        }
    }
}

/// Shared state of one node; connections hold it as `Arc<Node>`.
pub struct Node {
    pub id: String,
    pub limits: Limits,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub presence: Arc<dyn Presence>,
    pub metrics: Arc<Metrics>,
    /// Shared with the metrics' queued-bytes gauge, which sums the registered connections.
    pub drain: Arc<Drain>,
    /// Token verification, or anonymous mode.
    pub auth: Auth,
    /// `Origin` allowlist; `None` allows any origin.
    pub origins: Option<AllowedOrigins>,
    /// Authenticated connections by user, for control disconnects.
    pub users: Arc<Users>,
    /// Set once the broker took the `__control` subscription (see [`control::subscribe`]).
    pub(crate) control_live: AtomicBool,
    /// Admitted WebSocket connections (see [`Node::admit`]); exact, unlike the gauge, because
    /// the cap is checked against it.
    admitted: AtomicUsize,
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
        let sink: Arc<dyn MessageSink> = Arc::new(Router {
            hub: hub.clone(),
            users: users.clone(),
        });
        let (broker, presence): (Arc<dyn Broker>, Arc<dyn Presence>) = match &config.redis_url {
            None => (
                Arc::new(MemoryBroker::new(sink)),
                Arc::new(MemoryPresence::new()),
            ),
            Some(url) => {
                let commands = Arc::new(RedisCommands::new(url, config.redis_timeout)?);
                let options = RedisBrokerOptions {
                    url: url.clone(),
                    prefix: config.channel_prefix.clone(),
                    node_id: id.clone(),
                    probe_interval: config.broker_probe_interval,
                    timeout: config.redis_timeout,
                };
                let broker = RedisBroker::start(options, commands.clone(), sink, metrics.clone())?;
                let presence = RedisPresence::new(
                    commands,
                    config.channel_prefix.clone(),
                    config.presence_ttl,
                );
                (Arc::new(broker), Arc::new(presence))
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
            },
            hub,
            broker,
            presence,
            metrics,
            drain,
            auth,
            origins,
            users,
            control_live: AtomicBool::new(false),
            admitted: AtomicUsize::new(0),
            channel_locks: (0..CHANNEL_LOCKS).map(|_| Mutex::new(())).collect(),
            next_key: AtomicU64::new(1),
        });
        control::subscribe(&node).await;
        if config.redis_url.is_some() {
            tokio::spawn(refresh_presence(
                Arc::downgrade(&node),
                config.presence_ttl / 3,
            ));
        }
        Ok(node)
    }

    /// A node-local key for a new connection.
    pub fn next_key(&self) -> u64 {
        self.next_key.fetch_add(1, Ordering::Relaxed)
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
        &self.channel_locks[channel_slot(channel, CHANNEL_LOCKS)]
    }

    /// Subscribes a connection; returns once the subscription is live on the broker and the
    /// member is visible in presence.
    pub async fn subscribe(&self, outbox: &Arc<Outbox>, channel: &str) -> Result<(), BrokerError> {
        {
            let _guard = self.channel_lock(channel).lock().await;
            if !self.hub.has_channel(channel) {
                self.broker.subscribe(channel).await?;
            }
            self.hub.add(channel, outbox);
        }
        if let Err(e) = self.presence.add(channel, &outbox.member).await {
            self.leave(outbox, channel).await;
            return Err(e);
        }
        Ok(())
    }

    /// Unsubscribes a connection; the member is gone from presence when this returns.
    pub async fn unsubscribe(&self, outbox: &Outbox, channel: &str) {
        if let Err(e) = self.presence.remove(channel, outbox.conn_id()).await {
            tracing::warn!(error = %e, channel, "presence remove failed; the member expires with its ttl");
        }
        self.leave(outbox, channel).await;
    }

    /// Removes a closed connection from every channel it had (or was joining or leaving).
    pub async fn disconnect(&self, outbox: &Outbox, channels: &[String]) {
        if channels.is_empty() {
            return;
        }
        if let Err(e) = self.presence.remove_all(outbox.conn_id(), channels).await {
            tracing::warn!(error = %e, "presence remove failed; members expire with their ttl");
        }
        for channel in channels {
            self.leave(outbox, channel).await;
        }
    }

    async fn leave(&self, outbox: &Outbox, channel: &str) {
        let _guard = self.channel_lock(channel).lock().await;
        if self.hub.remove(channel, outbox.key) {
            if let Err(e) = self.broker.unsubscribe(channel).await {
                tracing::warn!(error = %e, channel, "broker unsubscribe failed");
            }
        }
    }

    /// Publishes a client's `data` (its JSON text); `Ok` once the broker accepted it.
    pub async fn publish(&self, channel: &str, data: &str) -> Result<(), BrokerError> {
        if !self.broker.is_up() {
            return Err(BrokerError::Down);
        }
        let started = Instant::now();
        self.broker
            .publish(channel, Bytes::copy_from_slice(data.as_bytes()))
            .await?;
        self.metrics
            .publish_duration
            .observe(started.elapsed().as_secs_f64());
        self.metrics.messages_published.inc();
        Ok(())
    }

    /// Every member of `channel` on every node.
    pub async fn presence(&self, channel: &str) -> Result<Vec<Member>, BrokerError> {
        let started = Instant::now();
        let members = self.presence.list(channel).await?;
        self.metrics
            .presence_duration
            .observe(started.elapsed().as_secs_f64());
        Ok(members)
    }

    /// Stops background work after the last connection closed.
    pub async fn shutdown(&self) {
        self.broker.shutdown().await;
    }
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

/// Keeps this node's presence members alive in Redis, one batch per refresh period. When the
/// broker comes back after being down (Redis may have restarted empty), or after a failed batch,
/// the next batch re-adds every member instead, without waiting for the period.
async fn refresh_presence(node: std::sync::Weak<Node>, every: Duration) {
    let mut tick = tokio::time::interval(every.min(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    let mut restore = false;
    let mut was_up = true;
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        let up = node.broker.is_up();
        restore |= up && !was_up;
        was_up = up;
        if !up || !(restore || last.elapsed() >= every) {
            continue;
        }
        last = Instant::now();
        let members = node.hub.members();
        let result = if restore {
            node.presence.restore(&members).await
        } else {
            node.presence.refresh(&members).await
        };
        match result {
            Ok(()) if restore => {
                // Members that left while the batch was in flight were re-added: remove them.
                let current: std::collections::HashSet<_> =
                    node.hub.members().into_iter().collect();
                for (channel, member) in members.iter().filter(|m| !current.contains(m)) {
                    let _ = node.presence.remove(channel, &member.conn_id).await;
                }
                restore = false;
            }
            Ok(()) => {}
            Err(e) => {
                restore = true;
                tracing::warn!(error = %e, members = members.len(), "presence refresh failed");
            }
        }
    }
}
