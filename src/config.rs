//! Node configuration: every `PUBGATE_*` variable of the contract, each also a CLI flag.
//!
//! The struct is plain data so tests can write `Config { listen, ..Config::default() }`; the
//! binary fills it from the command line and the environment through clap, then calls
//! [`Config::validate`] so a bad value stops the node at start with a message naming the variable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::error::ConfigError;

/// Largest `PUBGATE_HISTORY_SIZE`: a recovery replays at most this many messages to one client.
pub const MAX_HISTORY_SIZE: usize = 100_000;

/// Log output format (`PUBGATE_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Everything a node needs to run. Defaults are the contract's.
///
/// `Debug` is written by hand: it redacts the secrets (JWT secret, API key, a Redis URL's
/// password), because configurations end up in logs and panic messages.
#[derive(Clone, Args)]
pub struct Config {
    /// Address for WebSocket clients and health checks; also metrics (and `/api/*`) unless
    /// `PUBGATE_INTERNAL_LISTEN` is set.
    #[arg(long, env = "PUBGATE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Internal address (plain HTTP) for `/metrics`, `/api/*`, `/healthz` and `/readyz`. Set, the
    /// client address no longer serves `/metrics` and `/api/*`. Unset: everything on `listen`.
    #[arg(long, env = "PUBGATE_INTERNAL_LISTEN")]
    pub internal_listen: Option<SocketAddr>,

    /// Redis URL (`redis://[user:password@]host:port/`, or `rediss://` for TLS). Unset (and no
    /// cluster URLs): embedded single-node in-memory broker.
    #[arg(long, env = "PUBGATE_REDIS_URL")]
    pub redis_url: Option<String>,

    /// Comma-separated seed nodes of a Redis Cluster (`redis://host:port,redis://host:port`):
    /// cluster mode with sharded pub/sub. Instead of `PUBGATE_REDIS_URL`, never with it.
    #[arg(long, env = "PUBGATE_REDIS_CLUSTER_URLS")]
    pub redis_cluster_urls: Option<String>,

    /// PEM file of the CA that signed the Redis server certificates (`rediss://` with a private
    /// CA). Unset: the system's trust store.
    #[arg(long, env = "PUBGATE_REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// Prefix of Redis channel and key names: channel `news` is `pubgate:news` on Redis.
    #[arg(long, env = "PUBGATE_CHANNEL_PREFIX", default_value = "pubgate:")]
    pub channel_prefix: String,

    /// This node's id, shown in `welcome` and presence. Default: hostname plus a random suffix.
    #[arg(long, env = "PUBGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// Interval of the server's WebSocket Ping to each client.
    #[arg(long, env = "PUBGATE_PING_INTERVAL", default_value = "25s", value_parser = duration_of("PUBGATE_PING_INTERVAL"))]
    pub ping_interval: Duration,

    /// A client silent for ping interval + this is closed. Also the time a closing connection gets
    /// to flush its last frames before the socket is dropped.
    #[arg(long, env = "PUBGATE_PONG_TIMEOUT", default_value = "10s", value_parser = duration_of("PUBGATE_PONG_TIMEOUT"))]
    pub pong_timeout: Duration,

    /// How long a crashed node's presence members may linger.
    #[arg(long, env = "PUBGATE_PRESENCE_TTL", default_value = "30s", value_parser = duration_of("PUBGATE_PRESENCE_TTL"))]
    pub presence_ttl: Duration,

    /// Most members listed in one presence reply (`count` stays exact; `truncated` marks a cut).
    #[arg(long, env = "PUBGATE_PRESENCE_MAX_MEMBERS", default_value_t = 1000)]
    pub presence_max_members: usize,

    /// Largest incoming WebSocket message in bytes (all fragments together); larger: close 1009.
    #[arg(long, env = "PUBGATE_MAX_MESSAGE_SIZE", default_value_t = 65536)]
    pub max_message_size: usize,

    /// Channels one connection may be subscribed to at once.
    #[arg(long, env = "PUBGATE_MAX_SUBSCRIPTIONS", default_value_t = 256)]
    pub max_subscriptions: usize,

    /// Outgoing messages queued per connection before it counts as a slow consumer.
    #[arg(long, env = "PUBGATE_SEND_QUEUE", default_value_t = 1024)]
    pub send_queue: usize,

    /// Bytes of frames queued for one connection and not yet accepted by its socket (deliveries,
    /// replies, pongs, close) before it counts as a slow consumer: `64KiB`, `4MiB` or bytes.
    #[arg(long, env = "PUBGATE_SEND_BUFFER", default_value = "1MiB", value_parser = bytes_of("PUBGATE_SEND_BUFFER"))]
    pub send_buffer: usize,

    /// Fan-out workers of a Redis node (channels are hashed onto them); 0: one per CPU core.
    #[arg(long, env = "PUBGATE_FANOUT_WORKERS", default_value_t = 0)]
    pub fanout_workers: usize,

    /// Messages waiting per fan-out worker before further ones are dropped for this node
    /// (counted as `fanout_overflow`); the Redis reader never waits for a worker.
    #[arg(long, env = "PUBGATE_FANOUT_QUEUE", default_value_t = 1024)]
    pub fanout_queue: usize,

    /// Upper bound for a graceful shutdown, drain delay included.
    #[arg(long, env = "PUBGATE_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = duration_of("PUBGATE_SHUTDOWN_TIMEOUT"))]
    pub shutdown_timeout: Duration,

    /// After SIGTERM, how long clients keep being served while `/readyz` is 503.
    #[arg(long, env = "PUBGATE_DRAIN_DELAY", default_value = "0s", value_parser = duration_of("PUBGATE_DRAIN_DELAY"))]
    pub drain_delay: Duration,

    /// Interval of the pub/sub round-trip probe that detects a silent Redis subscriber.
    #[arg(long, env = "PUBGATE_BROKER_PROBE_INTERVAL", default_value = "5s", value_parser = duration_of("PUBGATE_BROKER_PROBE_INTERVAL"))]
    pub broker_probe_interval: Duration,

    /// Upper bound for one Redis call (connect, PUBLISH, SUBSCRIBE, presence).
    #[arg(long, env = "PUBGATE_REDIS_TIMEOUT", default_value = "2s", value_parser = duration_of("PUBGATE_REDIS_TIMEOUT"))]
    pub redis_timeout: Duration,

    /// Time a client gets to send its HTTP request headers (and, with TLS, to finish the TLS
    /// handshake): the slowloris bound.
    #[arg(long, env = "PUBGATE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = duration_of("PUBGATE_HANDSHAKE_TIMEOUT"))]
    pub handshake_timeout: Duration,

    /// HS256 secret for client tokens. Unset (and no public key): anonymous connections.
    #[arg(long, env = "PUBGATE_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM public key file for client tokens: RS256 for an RSA key, ES256 for a P-256 key.
    #[arg(long, env = "PUBGATE_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// JWKS file (RSA or P-256 public keys, each with a `kid`); a token's `kid` picks the key.
    /// Re-read on SIGHUP (a bad file keeps the previous keys).
    #[arg(long, env = "PUBGATE_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<PathBuf>,

    /// When set, tokens must carry this `aud` (a string, or an array containing it).
    #[arg(long, env = "PUBGATE_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "PUBGATE_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Key for the HTTP server API (`Authorization: apikey <key>`); unset: `/api/*` answers 404.
    #[arg(long, env = "PUBGATE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Client messages per second per connection (token bucket refill); `0` = unlimited.
    #[arg(long, env = "PUBGATE_RATE_LIMIT", default_value_t = 100)]
    pub rate_limit: u32,

    /// Capacity of the per-connection token bucket.
    #[arg(long, env = "PUBGATE_RATE_BURST", default_value_t = 200)]
    pub rate_burst: u32,

    /// WebSocket connections per node; `0` = unlimited. Beyond it an upgrade gets HTTP 503.
    #[arg(long, env = "PUBGATE_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Comma-separated `scheme://host[:port]` origins allowed to upgrade. Unset: any origin.
    #[arg(long, env = "PUBGATE_ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,

    /// PEM certificate chain: with `PUBGATE_TLS_KEY`, serve HTTPS/WSS on the listen address.
    #[arg(long, env = "PUBGATE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the certificate in `PUBGATE_TLS_CERT`.
    #[arg(long, env = "PUBGATE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Serve the operator console at `GET /console` (a page and the JS client, no secrets).
    /// Off by default: `/console` is then a 404 like any unknown path.
    #[arg(long, env = "PUBGATE_CONSOLE", num_args = 0..=1, default_value_t = false,
          default_missing_value = "true", action = clap::ArgAction::Set,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub console: bool,

    /// Messages each channel keeps for recovery and the `history` request; `0` = no history
    /// (deliveries carry no offset and the hot path is v1's).
    #[arg(long, env = "PUBGATE_HISTORY_SIZE", default_value_t = 0)]
    pub history_size: usize,

    /// A channel's history (and its epoch) is dropped this long after its last publish.
    #[arg(long, env = "PUBGATE_HISTORY_TTL", default_value = "5m", value_parser = duration_of("PUBGATE_HISTORY_TTL"))]
    pub history_ttl: Duration,

    /// Log format: `text` or `json`. Levels come from `RUST_LOG` (default `info`).
    #[arg(long, env = "PUBGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            internal_listen: None,
            redis_url: None,
            redis_cluster_urls: None,
            redis_ca_file: None,
            channel_prefix: "pubgate:".into(),
            node_id: None,
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            presence_ttl: Duration::from_secs(30),
            presence_max_members: 1000,
            max_message_size: 65536,
            max_subscriptions: 256,
            send_queue: 1024,
            send_buffer: 1 << 20,
            fanout_workers: 0,
            fanout_queue: 1024,
            shutdown_timeout: Duration::from_secs(10),
            drain_delay: Duration::ZERO,
            broker_probe_interval: Duration::from_secs(5),
            redis_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(10),
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_jwks_file: None,
            jwt_audience: None,
            jwt_issuer: None,
            api_key: None,
            rate_limit: 100,
            rate_burst: 200,
            max_connections: 0,
            allowed_origins: None,
            tls_cert: None,
            tls_key: None,
            console: false,
            history_size: 0,
            history_ttl: Duration::from_secs(300),
            log_format: LogFormat::Text,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |set: bool| if set { Some("<redacted>") } else { None };
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("internal_listen", &self.internal_listen)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("channel_prefix", &self.channel_prefix)
            .field("node_id", &self.node_id)
            .field("ping_interval", &self.ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("presence_ttl", &self.presence_ttl)
            .field("max_message_size", &self.max_message_size)
            .field("max_subscriptions", &self.max_subscriptions)
            .field("send_queue", &self.send_queue)
            .field("fanout_workers", &self.fanout_workers)
            .field("fanout_queue", &self.fanout_queue)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("drain_delay", &self.drain_delay)
            .field("broker_probe_interval", &self.broker_probe_interval)
            .field("redis_timeout", &self.redis_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("jwt_secret", &redacted(self.jwt_secret.is_some()))
            .field("jwt_public_key_file", &self.jwt_public_key_file)
            .field("jwt_jwks_file", &self.jwt_jwks_file)
            .field("jwt_audience", &self.jwt_audience)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("api_key", &redacted(self.api_key.is_some()))
            .field("rate_limit", &self.rate_limit)
            .field("rate_burst", &self.rate_burst)
            .field("max_connections", &self.max_connections)
            .field("allowed_origins", &self.allowed_origins)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// A URL with the password of its userinfo (`redis://user:password@host/`) replaced; a URL that
/// does not parse is redacted whole after its scheme, since it may still hold a password.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "<redacted>".into();
    };
    // The userinfo ends at the last `@` before the path.
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let user = if userinfo.contains(':') { user } else { "" };
            let shown = if user.is_empty() {
                "<redacted>".to_string()
            } else {
                format!("{user}:<redacted>")
            };
            format!("{scheme}://{shown}{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

impl Config {
    /// The fan-out workers a Redis node runs: `PUBGATE_FANOUT_WORKERS`, or one per CPU core.
    pub fn fanout_workers(&self) -> usize {
        match self.fanout_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Checks values that parse but cannot work, naming the variable at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("PUBGATE_PING_INTERVAL", self.ping_interval),
            ("PUBGATE_PONG_TIMEOUT", self.pong_timeout),
            ("PUBGATE_PRESENCE_TTL", self.presence_ttl),
            ("PUBGATE_SHUTDOWN_TIMEOUT", self.shutdown_timeout),
            ("PUBGATE_BROKER_PROBE_INTERVAL", self.broker_probe_interval),
            ("PUBGATE_REDIS_TIMEOUT", self.redis_timeout),
            ("PUBGATE_HANDSHAKE_TIMEOUT", self.handshake_timeout),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(ConfigError::invalid(name, "must be greater than zero"));
            }
        }
        let counts = [
            ("PUBGATE_MAX_MESSAGE_SIZE", self.max_message_size),
            ("PUBGATE_MAX_SUBSCRIPTIONS", self.max_subscriptions),
            ("PUBGATE_PRESENCE_MAX_MEMBERS", self.presence_max_members),
            ("PUBGATE_SEND_QUEUE", self.send_queue),
            ("PUBGATE_SEND_BUFFER", self.send_buffer),
            ("PUBGATE_FANOUT_QUEUE", self.fanout_queue),
        ];
        for (name, value) in counts {
            if value == 0 {
                return Err(ConfigError::invalid(name, "must be at least 1"));
            }
        }
        if self.presence_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "PUBGATE_PRESENCE_TTL",
                "must be at least 1s (each node's heartbeat runs every tenth of it)",
            ));
        }
        if self.drain_delay >= self.shutdown_timeout {
            return Err(ConfigError::invalid(
                "PUBGATE_DRAIN_DELAY",
                "must be shorter than PUBGATE_SHUTDOWN_TIMEOUT, which it counts inside",
            ));
        }
        if let Some(url) = &self.redis_url {
            redis::Client::open(url.as_str())
                .map_err(|e| ConfigError::invalid("PUBGATE_REDIS_URL", e.to_string()))?;
        }
        if let Some(urls) = &self.redis_cluster_urls {
            if self.redis_url.is_some() {
                return Err(ConfigError::invalid(
                    "PUBGATE_REDIS_CLUSTER_URLS",
                    "set either PUBGATE_REDIS_URL (one Redis) or PUBGATE_REDIS_CLUSTER_URLS \
                     (Redis Cluster), not both",
                ));
            }
            let seeds = self.cluster_seeds();
            if seeds.is_empty() {
                return Err(ConfigError::invalid(
                    "PUBGATE_REDIS_CLUSTER_URLS",
                    format!("`{urls}` names no seed node"),
                ));
            }
            for seed in seeds {
                redis::Client::open(seed.as_str()).map_err(|e| {
                    ConfigError::invalid("PUBGATE_REDIS_CLUSTER_URLS", format!("`{seed}`: {e}"))
                })?;
            }
        }
        if let Some(path) = &self.redis_ca_file {
            if self.redis_url.is_none() && self.redis_cluster_urls.is_none() {
                return Err(ConfigError::invalid(
                    "PUBGATE_REDIS_CA_FILE",
                    "is set but neither PUBGATE_REDIS_URL nor PUBGATE_REDIS_CLUSTER_URLS is",
                ));
            }
            std::fs::metadata(path).map_err(|e| {
                ConfigError::invalid("PUBGATE_REDIS_CA_FILE", format!("{}: {e}", path.display()))
            })?;
        }
        let keys = [
            self.jwt_secret.is_some(),
            self.jwt_public_key_file.is_some(),
            self.jwt_jwks_file.is_some(),
        ];
        if keys.iter().filter(|set| **set).count() > 1 {
            return Err(ConfigError::invalid(
                "PUBGATE_JWT_SECRET",
                "set one of PUBGATE_JWT_SECRET (HS256), PUBGATE_JWT_PUBLIC_KEY_FILE \
                 (RS256/ES256) or PUBGATE_JWT_JWKS_FILE, not both or all three",
            ));
        }
        for (name, value) in [
            ("PUBGATE_JWT_AUDIENCE", &self.jwt_audience),
            ("PUBGATE_JWT_ISSUER", &self.jwt_issuer),
            ("PUBGATE_API_KEY", &self.api_key),
        ] {
            if value.as_deref() == Some("") {
                return Err(ConfigError::invalid(
                    name,
                    "must not be empty (unset it instead)",
                ));
            }
        }
        if (self.jwt_audience.is_some() || self.jwt_issuer.is_some()) && !keys.contains(&true) {
            return Err(ConfigError::invalid(
                "PUBGATE_JWT_AUDIENCE",
                "PUBGATE_JWT_AUDIENCE and PUBGATE_JWT_ISSUER need a key (PUBGATE_JWT_SECRET, \
                 PUBGATE_JWT_PUBLIC_KEY_FILE or PUBGATE_JWT_JWKS_FILE): connections are anonymous",
            ));
        }
        if self
            .internal_listen
            .is_some_and(|a| a == self.listen && a.port() != 0)
        {
            return Err(ConfigError::invalid(
                "PUBGATE_INTERNAL_LISTEN",
                "must differ from PUBGATE_LISTEN",
            ));
        }
        if self.jwt_secret.as_deref() == Some("") {
            return Err(ConfigError::invalid(
                "PUBGATE_JWT_SECRET",
                "must not be empty (unset it for anonymous connections)",
            ));
        }
        if self.rate_limit > 0 && self.rate_burst == 0 {
            return Err(ConfigError::invalid(
                "PUBGATE_RATE_BURST",
                "must be at least 1 while PUBGATE_RATE_LIMIT is set",
            ));
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(ConfigError::invalid(
                    "PUBGATE_TLS_KEY",
                    "PUBGATE_TLS_CERT is set: set PUBGATE_TLS_KEY too",
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::invalid(
                    "PUBGATE_TLS_CERT",
                    "PUBGATE_TLS_KEY is set: set PUBGATE_TLS_CERT too",
                ))
            }
            _ => {}
        }
        if self.history_size > MAX_HISTORY_SIZE {
            return Err(ConfigError::invalid(
                "PUBGATE_HISTORY_SIZE",
                format!("must be at most {MAX_HISTORY_SIZE}"),
            ));
        }
        if self.history_size > 0 && self.history_ttl < Duration::from_secs(1) {
            return Err(ConfigError::invalid(
                "PUBGATE_HISTORY_TTL",
                "must be at least 1s while PUBGATE_HISTORY_SIZE is set",
            ));
        }
        if self.api_key.as_deref().is_some_and(|k| k.len() < 16) {
            return Err(ConfigError::invalid(
                "PUBGATE_API_KEY",
                "must be at least 16 characters (unset it to disable the HTTP API)",
            ));
        }
        if let Some(id) = &self.node_id {
            if id.is_empty() || id.len() > 200 || id.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "PUBGATE_NODE_ID",
                    "must be 1 to 200 characters without spaces",
                ));
            }
        }
        Ok(())
    }

    /// Whether the node uses Redis (one server or a cluster) rather than the memory broker.
    pub fn uses_redis(&self) -> bool {
        self.redis_url.is_some() || self.redis_cluster_urls.is_some()
    }

    /// The seed URLs of `PUBGATE_REDIS_CLUSTER_URLS`, trimmed, empty entries dropped.
    pub fn cluster_seeds(&self) -> Vec<String> {
        self.redis_cluster_urls
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// The node id: the configured one, or the hostname plus a short random suffix.
    pub fn resolved_node_id(&self) -> String {
        match &self.node_id {
            Some(id) => id.clone(),
            None => format!("{}-{:06x}", hostname(), rand::random::<u32>() & 0xff_ffff),
        }
    }
}

/// A clap value parser whose error names the environment variable as well as the flag.
fn duration_of(var: &'static str) -> impl Fn(&str) -> Result<Duration, String> + Clone {
    move |s| parse_duration(s).map_err(|e| format!("{e}; check {var}"))
}

/// Parses `250ms`, `25s`, `1m`, `1m30s`; a bare number is read as seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("`{s}` is not a duration such as 250ms, 25s or 1m ({e})"))
}

/// A clap value parser for byte sizes whose error names the environment variable.
fn bytes_of(var: &'static str) -> impl Fn(&str) -> Result<usize, String> + Clone {
    move |s| parse_bytes(s).map_err(|e| format!("{e}; check {var}"))
}

/// Parses a byte size: plain bytes (`65536`) or a number with a binary unit (`64KiB`, `4MiB`,
/// `1GiB`; `B` too). Units are case-insensitive and may follow a space; decimal units (`kB`,
/// `MB`) are refused rather than guessed at.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let bad = || format!("`{s}` is not a size such as 65536, 64KiB or 4MiB");
    let number: usize = number.parse().map_err(|_| bad())?;
    let shift = match unit.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "kib" => 10,
        "mib" => 20,
        "gib" => 30,
        _ => return Err(bad()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pubgate".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_the_contract_forms() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("25s"), Ok(Duration::from_secs(25)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("abc").unwrap_err().contains("abc"));
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn sizes_accept_bytes_and_binary_units() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("1mib"), Ok(1 << 20));
        assert_eq!(parse_bytes(" 2 GiB "), Ok(2 << 30));
        assert_eq!(parse_bytes("100B"), Ok(100));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-1",
            "4MB",
            "4 kB",
            "12x",
            "99999999999999999999GiB",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_bytes("4MB").unwrap_err().contains("4MiB"));
    }

    #[test]
    fn the_send_buffer_must_hold_something() {
        let cfg = Config {
            send_buffer: 0,
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("PUBGATE_SEND_BUFFER"));
        assert_eq!(Config::default().send_buffer, 1 << 20);
    }

    #[test]
    fn default_config_is_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn validation_names_the_variable() {
        let cfg = Config {
            send_queue: 0,
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("PUBGATE_SEND_QUEUE"));
        let cfg = Config {
            drain_delay: Duration::from_secs(20),
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("PUBGATE_DRAIN_DELAY"));
        let cfg = Config {
            redis_url: Some("nonsense://".into()),
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("PUBGATE_REDIS_URL"));
    }

    #[test]
    fn security_settings_that_cannot_work_are_refused() {
        let err = |cfg: Config| cfg.validate().unwrap_err().to_string();
        let both = err(Config {
            jwt_secret: Some("s".into()),
            jwt_public_key_file: Some("/k.pem".into()),
            ..Config::default()
        });
        assert!(
            both.contains("PUBGATE_JWT_SECRET") && both.contains("not both"),
            "{both}"
        );
        let cert_only = err(Config {
            tls_cert: Some("/c.pem".into()),
            ..Config::default()
        });
        assert!(cert_only.contains("PUBGATE_TLS_KEY"), "{cert_only}");
        let key_only = err(Config {
            tls_key: Some("/k.pem".into()),
            ..Config::default()
        });
        assert!(key_only.contains("PUBGATE_TLS_CERT"), "{key_only}");
        let burst = err(Config {
            rate_burst: 0,
            ..Config::default()
        });
        assert!(burst.contains("PUBGATE_RATE_BURST"), "{burst}");
        Config {
            rate_limit: 0,
            rate_burst: 0,
            ..Config::default()
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn redis_modes_are_exclusive_and_checked() {
        let err = |cfg: Config| cfg.validate().unwrap_err().to_string();
        let both = err(Config {
            redis_url: Some("redis://a:6379/".into()),
            redis_cluster_urls: Some("redis://b:6379".into()),
            ..Config::default()
        });
        assert!(both.contains("PUBGATE_REDIS_CLUSTER_URLS") && both.contains("not both"));
        let empty = err(Config {
            redis_cluster_urls: Some(" , ".into()),
            ..Config::default()
        });
        assert!(empty.contains("no seed node"), "{empty}");
        let bad = err(Config {
            redis_cluster_urls: Some("redis://a:1, nonsense://".into()),
            ..Config::default()
        });
        assert!(bad.contains("nonsense://"), "{bad}");
        let cfg = Config {
            redis_cluster_urls: Some("redis://a:7000, rediss://u:p@b:7001 ,".into()),
            ..Config::default()
        };
        cfg.validate().unwrap();
        assert_eq!(
            cfg.cluster_seeds(),
            ["redis://a:7000", "rediss://u:p@b:7001"]
        );
        assert!(cfg.uses_redis());
        let ca_alone = err(Config {
            redis_ca_file: Some("/ca.pem".into()),
            ..Config::default()
        });
        assert!(ca_alone.contains("PUBGATE_REDIS_CA_FILE"), "{ca_alone}");
        let ca_missing = err(Config {
            redis_url: Some("rediss://a:6379/".into()),
            redis_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Config::default()
        });
        assert!(ca_missing.contains("/nonexistent/ca.pem"), "{ca_missing}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let cfg = Config {
            jwt_secret: Some("hs-secret-value".into()),
            api_key: Some("api-key-value".into()),
            redis_url: Some("redis://app:redis-pass-value@redis:6379/0".into()),
            ..Config::default()
        };
        let shown = format!("{cfg:?}");
        for secret in ["hs-secret-value", "api-key-value", "redis-pass-value"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert!(
            shown.contains("redis://app:<redacted>@redis:6379/0"),
            "{shown}"
        );
        assert_eq!(redact_url("redis://:pw@h:1/"), "redis://<redacted>@h:1/");
        assert_eq!(redact_url("redis://h:1/"), "redis://h:1/");
        assert_eq!(redact_url("redis://u:p@ss@h/"), "redis://u:<redacted>@h/");
        assert_eq!(redact_url("nonsense"), "<redacted>");
    }

    #[test]
    fn one_key_source_only_and_claims_need_a_key() {
        let err = |cfg: Config| cfg.validate().unwrap_err().to_string();
        let two = err(Config {
            jwt_public_key_file: Some("/k.pem".into()),
            jwt_jwks_file: Some("/k.json".into()),
            ..Config::default()
        });
        assert!(two.contains("PUBGATE_JWT_JWKS_FILE"), "{two}");
        let aud = err(Config {
            jwt_audience: Some("pubgate".into()),
            ..Config::default()
        });
        assert!(aud.contains("PUBGATE_JWT_AUDIENCE"), "{aud}");
        let same = err(Config {
            listen: "127.0.0.1:8080".parse().unwrap(),
            internal_listen: Some("127.0.0.1:8080".parse().unwrap()),
            ..Config::default()
        });
        assert!(same.contains("PUBGATE_INTERNAL_LISTEN"), "{same}");
    }

    #[test]
    fn generated_node_ids_differ() {
        let cfg = Config::default();
        assert_ne!(cfg.resolved_node_id(), cfg.resolved_node_id());
    }
}
