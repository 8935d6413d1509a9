//! pubgate: a horizontally scaled WebSocket pub/sub gateway.
//!
//! Stateless nodes terminate WebSockets and fan client `subscribe`/`publish` requests out through
//! a broker (Redis pub/sub, or an embedded in-memory broker for a single node), so any number of
//! replicas behind a load balancer act as one system. The wire contract is in `docs/protocol.md`.
//!
//! # Layout
//! The modules sit in layers and import one way, from high to low. `docs/architecture.md` holds
//! the layer table (which `cargo test --test layers` checks against every `crate::` and
//! `super::` path), a diagram, and the publish and subscribe paths. Low to high:
//! - [`config`] (every `PUBGATE_*` setting), `error`, [`metrics`], `shard` (the shard hash).
//! - `wire`: the protocol, server frames encoded once, `Member`, each connection's `Outbox`.
//! - The outside: `conn` (one WebSocket: a reader that hands each message to a handler, the
//!   writer with the ping timer; it knows neither the node nor the commands), the seams
//!   [`broker`], [`presence`] and [`history`] (each memory or Redis), [`redis_client`],
//!   [`redis_commands`], `auth` (tokens, permissions, expiry), `tls`, `origin`.
//! - This node's subscriptions: `hub` (channel -> subscribers, the fan-out workers, the recovery
//!   gate), `control` (the broker's sink, `__control`), `users`, `shutdown` (the drain).
//! - `node`: the composition; subscribes the broker on a channel's first local subscriber.
//! - `session`: what a client may do; the connection's handler, one file per command.
//! - `server`, `http` (routes; the upgrade joins a connection to its session), `api`, `console`,
//!   [`health`].
//! - This file ([`run`]), `main` (the binary), `fuzzing`.

mod api;
mod auth;
pub mod broker;
pub mod config;
mod conn;
mod console;
mod control;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[doc(hidden)]
pub mod health;
pub mod history;
mod http;
mod hub;
pub mod metrics;
mod node;
mod origin;
pub mod presence;
pub mod redis_client;
pub mod redis_commands;
mod server;
mod session;
mod shard;
mod shutdown;
mod tls;
mod users;
mod wire;

pub use config::{Config, LogFormat};
pub use error::{BrokerError, ConfigError, Error};
pub use server::Server;

use std::future::Future;

/// Runs one node until `shutdown` resolves, then drains and closes every client.
///
/// The binary passes a SIGTERM/SIGINT future; tests pass a channel they control.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> Result<(), Error> {
    Server::bind(config).await?.run(shutdown).await
}
