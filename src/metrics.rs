//! Prometheus metrics of one node, on a registry of its own.
//!
//! A registry per node (not the global default) keeps two nodes in one test process apart. Every
//! metric and every listed label value is created at start-up so it is exported at zero before it
//! first moves: dashboards and alerts never see a series appear out of nowhere.

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// Presence event types counted when this node publishes them.
pub const PRESENCE_EVENT_TYPES: &[&str] = &["join", "leave"];
/// Reasons a message was dropped instead of delivered.
pub const DROP_REASONS: &[&str] = &["slow_consumer", "too_big"];
/// Reasons an upgrade was refused.
pub const UPGRADE_REJECT_REASONS: &[&str] = &[
    "unauthorized",
    "origin",
    "max_connections",
    "draining",
    "bad_request",
];
/// Reasons a client request was refused.
pub const REQUEST_REJECT_REASONS: &[&str] = &[
    "bad_request",
    "unknown_type",
    "invalid_channel",
    "not_subscribed",
    "too_many_subscriptions",
    "unsupported",
    "unavailable",
    "forbidden",
    "rate_limited",
    "timeout",
];
/// Reasons the server closed a connection by policy.
pub const DISCONNECT_REASONS: &[&str] = &[
    "slow_consumer",
    "pong_timeout",
    "message_too_big",
    "protocol_error",
    "invalid_utf8",
    "shutdown",
    "token_expired",
    "control",
    "flood",
];

/// Outcomes of a subscribe with `since`.
pub const RECOVERY_OUTCOMES: &[&str] = &["recovered", "not_recovered"];
/// Routes of the HTTP server API (`other`: an unknown path under `/api/`).
pub const API_ROUTES: &[&str] = &["publish", "disconnect", "presence", "other"];
/// Statuses the HTTP server API answers with.
pub const API_STATUSES: &[&str] = &["200", "400", "401", "404", "405", "413", "503", "504"];

/// Typed handles to every metric of a node. Cheap to share as `Arc<Metrics>`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections: IntGauge,
    /// WebSocket connections accepted since start.
    pub connections_total: IntCounter,
    /// (connection, channel) subscription pairs on this node.
    pub subscriptions: IntGauge,
    /// Channels with at least one local subscriber.
    pub channels: IntGauge,
    /// Client publishes the broker accepted.
    pub messages_published: IntCounter,
    /// Messages queued to a local subscriber.
    pub messages_delivered: IntCounter,
    /// Messages not delivered, by reason.
    pub messages_dropped: IntCounterVec,
    /// 1 while the broker is connected and delivering.
    pub broker_up: IntGauge,
    /// Broker (re)connections after the first.
    pub broker_reconnects: IntCounter,
    /// Time from a client publish to the broker's acceptance.
    pub publish_duration: Histogram,
    /// Time to answer a presence query.
    pub presence_duration: Histogram,
    /// Presence members (subscribed connections) on this node.
    pub presence_members: IntGauge,
    /// Presence join/leave events this node published (its members', and dead nodes' leaves it
    /// reaped), by `type`.
    pub presence_events: IntCounterVec,
    /// Upgrades refused, by reason.
    pub upgrades_rejected: IntCounterVec,
    /// Client requests answered with an error, by reason (the error code).
    pub requests_rejected: IntCounterVec,
    /// Connections closed by the server's policy, by reason.
    pub disconnects: IntCounterVec,
    /// Messages this node appended to a channel's history (its client and API publishes).
    pub history_appends: IntCounter,
    /// Subscribes with `since`, by outcome.
    pub recoveries: IntCounterVec,
    /// Messages replayed to recovering subscribers.
    pub replayed: IntCounter,
    /// HTTP server API requests, by route and status.
    pub api_requests: IntCounterVec,
}

impl Metrics {
    /// Creates every metric on a fresh registry, with the process collector where supported.
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let latency_buckets = vec![
            0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5,
        ];
        let metrics = Metrics {
            connections: IntGauge::new("pubgate_connections", "Open WebSocket connections")?,
            connections_total: IntCounter::new(
                "pubgate_connections_total",
                "WebSocket connections accepted since start",
            )?,
            subscriptions: IntGauge::new(
                "pubgate_subscriptions",
                "Subscriptions ((connection, channel) pairs) on this node",
            )?,
            channels: IntGauge::new(
                "pubgate_channels",
                "Channels with at least one subscriber on this node",
            )?,
            messages_published: IntCounter::new(
                "pubgate_messages_published_total",
                "Client publishes accepted by the broker",
            )?,
            messages_delivered: IntCounter::new(
                "pubgate_messages_delivered_total",
                "Messages queued to a local subscriber",
            )?,
            messages_dropped: IntCounterVec::new(
                Opts::new("pubgate_messages_dropped_total", "Messages not delivered"),
                &["reason"],
            )?,
            broker_up: IntGauge::new("pubgate_broker_up", "1 while the broker is delivering")?,
            broker_reconnects: IntCounter::new(
                "pubgate_broker_reconnects_total",
                "Broker reconnections after the first connection",
            )?,
            publish_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "pubgate_publish_duration_seconds",
                    "Time from a client publish to its acceptance by the broker",
                )
                .buckets(latency_buckets.clone()),
            )?,
            presence_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "pubgate_presence_query_duration_seconds",
                    "Time to answer a presence query",
                )
                .buckets(latency_buckets),
            )?,
            presence_members: IntGauge::new(
                "pubgate_presence_members",
                "Presence members (subscribed connections) on this node",
            )?,
            presence_events: IntCounterVec::new(
                Opts::new(
                    "pubgate_presence_events_published_total",
                    "Presence join/leave events published by this node",
                ),
                &["type"],
            )?,
            upgrades_rejected: IntCounterVec::new(
                Opts::new("pubgate_upgrades_rejected_total", "Upgrades refused"),
                &["reason"],
            )?,
            requests_rejected: IntCounterVec::new(
                Opts::new(
                    "pubgate_requests_rejected_total",
                    "Client requests answered with an error",
                ),
                &["reason"],
            )?,
            disconnects: IntCounterVec::new(
                Opts::new(
                    "pubgate_disconnects_total",
                    "Connections closed by the server's policy",
                ),
                &["reason"],
            )?,
            history_appends: IntCounter::new(
                "pubgate_history_appends_total",
                "Messages this node appended to a channel's history",
            )?,
            recoveries: IntCounterVec::new(
                Opts::new(
                    "pubgate_recoveries_total",
                    "Subscribes with `since`, by outcome",
                ),
                &["outcome"],
            )?,
            replayed: IntCounter::new(
                "pubgate_replayed_messages_total",
                "Messages replayed to recovering subscribers",
            )?,
            api_requests: IntCounterVec::new(
                Opts::new("pubgate_api_requests_total", "HTTP server API requests"),
                &["route", "status"],
            )?,
            registry,
        };
        metrics.register_all()?;
        Ok(metrics)
    }

    fn register_all(&self) -> Result<(), prometheus::Error> {
        let r = &self.registry;
        r.register(Box::new(self.connections.clone()))?;
        r.register(Box::new(self.connections_total.clone()))?;
        r.register(Box::new(self.subscriptions.clone()))?;
        r.register(Box::new(self.channels.clone()))?;
        r.register(Box::new(self.messages_published.clone()))?;
        r.register(Box::new(self.messages_delivered.clone()))?;
        r.register(Box::new(self.messages_dropped.clone()))?;
        r.register(Box::new(self.broker_up.clone()))?;
        r.register(Box::new(self.broker_reconnects.clone()))?;
        r.register(Box::new(self.publish_duration.clone()))?;
        r.register(Box::new(self.presence_duration.clone()))?;
        r.register(Box::new(self.presence_members.clone()))?;
        r.register(Box::new(self.presence_events.clone()))?;
        r.register(Box::new(self.upgrades_rejected.clone()))?;
        r.register(Box::new(self.requests_rejected.clone()))?;
        r.register(Box::new(self.disconnects.clone()))?;
        r.register(Box::new(self.history_appends.clone()))?;
        r.register(Box::new(self.recoveries.clone()))?;
        r.register(Box::new(self.replayed.clone()))?;
        r.register(Box::new(self.api_requests.clone()))?;
        for route in API_ROUTES {
            for status in API_STATUSES {
                self.api_requests.with_label_values(&[route, status]);
            }
        }
        let labelled = [
            (&self.messages_dropped, DROP_REASONS),
            (&self.presence_events, PRESENCE_EVENT_TYPES),
            (&self.upgrades_rejected, UPGRADE_REJECT_REASONS),
            (&self.requests_rejected, REQUEST_REJECT_REASONS),
            (&self.disconnects, DISCONNECT_REASONS),
            (&self.recoveries, RECOVERY_OUTCOMES),
        ];
        for (vec, reasons) in labelled {
            for reason in reasons {
                vec.with_label_values(&[reason]);
            }
        }
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(())
    }

    /// Registers `pubgate_send_queued_bytes`, computed by `bytes` at each scrape.
    pub fn register_queued_bytes(
        &self,
        bytes: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        self.register_computed(
            "pubgate_send_queued_bytes",
            "Bytes of frames queued for this node's connections and not yet accepted by their \
             sockets (computed at scrape time)",
            bytes,
        )
    }

    /// Registers `pubgate_fanout_queued`, computed by `messages` at each scrape.
    pub fn register_fanout_queued(
        &self,
        messages: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        self.register_computed(
            "pubgate_fanout_queued",
            "Messages received from the broker and waiting for a fan-out worker (computed at \
             scrape time)",
            messages,
        )
    }

    fn register_computed(
        &self,
        name: &str,
        help: &str,
        value: impl Fn() -> usize + Send + Sync + 'static,
    ) -> Result<(), prometheus::Error> {
        let gauge = IntGauge::new(name, help)?;
        self.registry.register(Box::new(Computed {
            gauge,
            value: Box::new(value),
        }))
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec only fails on invalid metric data, which the typed handles exclude.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// A gauge whose value is computed when it is collected.
struct Computed {
    gauge: IntGauge,
    value: Box<dyn Fn() -> usize + Send + Sync>,
}

impl Collector for Computed {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.gauge
            .set(i64::try_from((self.value)()).unwrap_or(i64::MAX));
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exported_from_start() {
        let text = Metrics::new().unwrap().render();
        for name in [
            "pubgate_connections ",
            "pubgate_connections_total ",
            "pubgate_subscriptions ",
            "pubgate_channels ",
            "pubgate_messages_published_total ",
            "pubgate_messages_delivered_total ",
            "pubgate_messages_dropped_total{reason=\"slow_consumer\"} ",
            "pubgate_messages_dropped_total{reason=\"too_big\"} ",
            "pubgate_requests_rejected_total{reason=\"timeout\"} ",
            "pubgate_broker_up ",
            "pubgate_broker_reconnects_total ",
            "pubgate_publish_duration_seconds_bucket",
            "pubgate_presence_query_duration_seconds_bucket",
            "pubgate_presence_members ",
            "pubgate_presence_events_published_total{type=\"join\"} ",
            "pubgate_presence_events_published_total{type=\"leave\"} ",
            "pubgate_disconnects_total{reason=\"pong_timeout\"} ",
            "pubgate_disconnects_total{reason=\"token_expired\"} ",
            "pubgate_disconnects_total{reason=\"control\"} ",
            "pubgate_disconnects_total{reason=\"flood\"} ",
            "pubgate_disconnects_total{reason=\"slow_consumer\"} ",
            "pubgate_upgrades_rejected_total{reason=\"unauthorized\"} ",
            "pubgate_upgrades_rejected_total{reason=\"origin\"} ",
            "pubgate_upgrades_rejected_total{reason=\"max_connections\"} ",
            "pubgate_upgrades_rejected_total{reason=\"draining\"} ",
            "pubgate_requests_rejected_total{reason=\"forbidden\"} ",
            "pubgate_requests_rejected_total{reason=\"rate_limited\"} ",
            "pubgate_requests_rejected_total{reason=\"invalid_channel\"} ",
            "pubgate_history_appends_total ",
            "pubgate_recoveries_total{outcome=\"recovered\"} ",
            "pubgate_recoveries_total{outcome=\"not_recovered\"} ",
            "pubgate_replayed_messages_total ",
            "pubgate_api_requests_total{route=\"publish\",status=\"200\"} ",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    #[test]
    fn the_queued_bytes_gauge_is_computed_at_scrape_time() {
        let m = Metrics::new().unwrap();
        let bytes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(7));
        m.register_queued_bytes({
            let bytes = bytes.clone();
            move || bytes.load(std::sync::atomic::Ordering::Relaxed)
        })
        .unwrap();
        assert!(m.render().contains("pubgate_send_queued_bytes 7\n"));
        bytes.store(12345, std::sync::atomic::Ordering::Relaxed);
        assert!(m.render().contains("pubgate_send_queued_bytes 12345\n"));
    }

    #[test]
    fn two_nodes_in_one_process_do_not_clash() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.connections.inc();
        assert!(a.render().contains("pubgate_connections 1"));
        assert!(b.render().contains("pubgate_connections 0"));
    }
}
