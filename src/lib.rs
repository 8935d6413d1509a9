//! pubgate: a horizontally scaled WebSocket pub/sub gateway.
//!
//! Stateless nodes terminate WebSockets and fan client `subscribe`/`publish` requests out through
//! a broker (Redis pub/sub, or an embedded in-memory broker for a single node), so any number of
//! replicas behind a load balancer act as one system. The wire contract is in `docs/protocol.md`.
//!
//! # Layout
//! - [`config`]: every `PUBGATE_*` setting.
//! - `server`: binds the listener, runs the accept loop and the graceful shutdown.
//! - `http`: routes `/ws`, `/healthz`, `/readyz`, `/metrics`, `/api/*` per listener surface.
//! - `conn`: one WebSocket connection: a reader, a writer with a bounded queue, the ping timer.
//! - `protocol` and `cmd`: client messages, replies, one file per command.
//! - `hub`: local channel -> subscriber registry and fan-out; calls the broker on the first and
//!   last local subscriber of a channel.
//! - [`broker`], [`presence`] and [`history`]: the seams, each with a memory and a Redis
//!   implementation (history: offsets, epochs and the last N messages, for recovery).
//! - `api`: the HTTP server API for backends (`/api/publish`, `/api/disconnect`, `/api/presence`).
//! - [`metrics`]: the Prometheus registry of one node.
//! - [`auth`]: tokens on the upgrade, channel permissions, expiry; `origin`: the `Origin`
//!   allowlist; `users` and `control`: the backend's `__control` disconnect; `tls`: HTTPS/WSS.
//! - `console`: the optional operator page at `/console` and the JS client it runs on.

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
