//! HTTP routes: `/ws`, `/healthz`, `/readyz`, `/metrics`, `/api/*`; 404 otherwise. A build with
//! the `autobahn` feature also has `/echo`: the same upgrade and connection code with an echo
//! handler, for the Autobahn TestSuite (`.ci/autobahn.sh`); the product binary has no such route.
//!
//! The upgrade is where a connection meets its session: [`join`] registers the connection on
//! the node, starts its [`Session`] and hands both to the connection code, which knows neither
//! the node nor the commands.
//!
//! Which routes a listener serves is its [`Surface`]: with `PUBGATE_INTERNAL_LISTEN` set, the
//! client address serves `/ws`, `/healthz`, `/readyz` only and the internal one `/metrics`,
//! `/api/*`, `/healthz`, `/readyz` (no WebSocket); unset, one address serves everything (v1).
//! A route a surface does not serve answers 404, exactly like an unknown path, so the client
//! address gives away nothing about the internal routes.
//!
//! The service never returns an error: hyper aborts a connection whose service fails, and a
//! client deserves a status code rather than a dropped socket. Upgrades are refused, before any
//! 101, in the contract's order: 426/400 without (valid) upgrade headers, 503 while draining,
//! 403 for an `Origin` not allowed, 401 for a missing or invalid token, 503 at the connection cap.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, CONTENT_TYPE, ORIGIN, SEC_WEBSOCKET_VERSION, UPGRADE, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::task::TaskTracker;

use crate::auth::Identity;
use crate::conn::{self, Io};
use crate::console;
use crate::node::{self, ConnectionSlot, Node};
use crate::session::Session;

pub type Body = Full<Bytes>;

/// The client's address, put on each request by the accept loop (the load balancer's address
/// when there is one in front).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

/// The routes one listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// `PUBGATE_INTERNAL_LISTEN` unset: the one listener serves every route (v1).
    All,
    /// The client address while an internal one is set: `/ws`, `/healthz`, `/readyz`.
    Client,
    /// `PUBGATE_INTERNAL_LISTEN`: `/metrics`, `/api/*`, `/healthz`, `/readyz`.
    Internal,
}

impl Surface {
    fn websocket(self) -> bool {
        self != Surface::Internal
    }

    fn operations(self) -> bool {
        self != Surface::Client
    }
}

/// Routes one request. WebSocket sessions are spawned on `sessions` so shutdown can wait for them.
pub async fn handle(
    req: Request<Incoming>,
    node: Arc<Node>,
    sessions: TaskTracker,
    surface: Surface,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    if path.starts_with("/api/") || path == "/api" {
        if !surface.operations() {
            return Ok(not_found());
        }
        return Ok(crate::api::handle(req, node).await);
    }
    Ok(match path {
        "/ws" if !surface.websocket() => not_found(),
        "/metrics" if !surface.operations() => not_found(),
        "/ws" if req.method() == Method::GET => upgrade(req, node, sessions, Endpoint::Session),
        #[cfg(feature = "autobahn")]
        "/echo" if req.method() == Method::GET && surface.websocket() => {
            upgrade(req, node, sessions, Endpoint::Echo)
        }
        "/healthz" if get => text(StatusCode::OK, "ok\n"),
        "/readyz" if get => match node.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/metrics" if get => {
            let mut response = text(StatusCode::OK, node.metrics().render());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        // The console talks to `/ws`, so it lives where the WebSocket does.
        p if surface.websocket() && (p == "/console" || p.starts_with("/console/")) => {
            console::respond(&node, p, get)
        }
        "/ws" | "/healthz" | "/readyz" | "/metrics" => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            response
        }
        _ => not_found(),
    })
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "not found\n")
}

/// What an upgraded WebSocket is joined to.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    /// A session: the client's messages are commands (the product).
    Session,
    /// The Autobahn TestSuite's echo ([`conn::Echo`]): no welcome, each message sent back.
    #[cfg(feature = "autobahn")]
    Echo,
}

/// Answers a `GET /ws`: refusals in the contract's order, then the 101 and a session task.
fn upgrade(
    req: Request<Incoming>,
    node: Arc<Node>,
    sessions: TaskTracker,
    endpoint: Endpoint,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&req) {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks WebSocket: send an upgrade request\n",
        );
        response
            .headers_mut()
            .insert(UPGRADE, HeaderValue::from_static("websocket"));
        return response;
    }
    if let Err(why) = check_handshake_headers(&req) {
        reject(&node, "bad_request");
        let mut response = text(
            StatusCode::BAD_REQUEST,
            format!("bad websocket upgrade: {why}\n"),
        );
        // RFC 6455 section 4.2.2: tell the client which version this server speaks.
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    if node.drain().is_draining() {
        reject(&node, "draining");
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    let peer = req
        .extensions()
        .get::<Peer>()
        .map(|p| p.0.to_string())
        .unwrap_or_default();
    if let (Some(allowed), Some(origin)) = (node.origins(), req.headers().get(ORIGIN)) {
        let origin = String::from_utf8_lossy(origin.as_bytes());
        if !allowed.allows(&origin) {
            reject(&node, "origin");
            tracing::info!(%peer, origin = %truncate(&origin, 200), "upgrade refused: origin not allowed");
            return text(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
    }
    let (parts, body) = req.into_parts();
    let identity = match node.auth().authenticate(&parts) {
        Ok(identity) => identity,
        Err(e) => {
            reject(&node, "unauthorized");
            let reason = e.reason();
            tracing::info!(%peer, reason = %reason, "upgrade refused: unauthorized");
            let mut response = text(StatusCode::UNAUTHORIZED, format!("{reason}\n"));
            // RFC 6750 section 3: a 401 names the scheme it wants.
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return response;
        }
    };
    let Some(slot) = node.admit() else {
        reject(&node, "max_connections");
        tracing::info!(
            %peer,
            max = node.limits().max_connections,
            "upgrade refused: connection limit reached"
        );
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "connection limit reached\n",
        );
    };
    let mut req = Request::from_parts(parts, body);
    match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, upgraded)) => {
            let tracker = sessions.clone();
            sessions.spawn(async move {
                // The connection is a task of its own: the upgrade's state, larger than the
                // connection's, is freed instead of staying in every connection's task cell.
                match upgraded.await {
                    Ok(ws) => join(ws, node, identity, endpoint, slot, &tracker),
                    Err(e) => tracing::debug!(error = %e, "upgrade did not complete"),
                }
            });
            response.map(|_| Body::default())
        }
        Err(e) => {
            reject(&node, "bad_request");
            let mut response = text(
                StatusCode::BAD_REQUEST,
                format!("bad websocket upgrade: {e}\n"),
            );
            // RFC 6455 4.2.2: a refused handshake names the versions the server speaks.
            response
                .headers_mut()
                .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            response
        }
    }
}

/// Joins an upgraded WebSocket to what serves it and spawns the connection's task on
/// `sessions`. The slot (the connection's place under the cap) is released when the task ends.
fn join(
    ws: fastwebsockets::WebSocket<Io>,
    node: Arc<Node>,
    identity: Identity,
    endpoint: Endpoint,
    slot: ConnectionSlot,
    sessions: &TaskTracker,
) {
    let transport = conn::Transport::new(ws);
    let outbox = node.register(&identity);
    let limits = conn_limits(node.limits());
    let metrics = node.metrics().clone();
    let on_closed = {
        let (node, outbox) = (node.clone(), outbox.clone());
        move || {
            node.unregister(&outbox);
            drop(slot);
        }
    };
    match endpoint {
        Endpoint::Session => {
            let session = Session::new(node, outbox.clone(), identity);
            let conn = conn::serve(transport, outbox, session, limits, metrics, on_closed);
            drop(sessions.spawn(conn));
        }
        #[cfg(feature = "autobahn")]
        Endpoint::Echo => {
            let conn = conn::serve(transport, outbox, conn::Echo, limits, metrics, on_closed);
            drop(sessions.spawn(conn));
        }
    }
}

/// The part of the node's limits the connection code enforces.
pub(crate) fn conn_limits(limits: &node::Limits) -> conn::Limits {
    conn::Limits {
        ping_interval: limits.ping_interval,
        pong_timeout: limits.pong_timeout,
        max_message_size: limits.max_message_size,
        rate_limit: limits.rate_limit,
        rate_burst: limits.rate_burst,
    }
}

/// What fastwebsockets' `upgrade` would refuse, checked first so a malformed upgrade gets its
/// 400 ahead of the other refusals.
fn check_handshake_headers(req: &Request<Incoming>) -> Result<(), &'static str> {
    let headers = req.headers();
    if !headers.contains_key("sec-websocket-key") {
        return Err("missing Sec-WebSocket-Key");
    }
    if headers
        .get("sec-websocket-version")
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err("Sec-WebSocket-Version must be 13");
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn reject(node: &Node, reason: &str) {
    node.metrics()
        .upgrades_rejected
        .with_label_values(&[reason])
        .inc();
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    if !response.headers().contains_key(CONTENT_TYPE) {
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    #![allow(unreachable_code, clippy::diverging_sub_expression)]

    use std::future::Future;

    use super::*;

    /// The size of the future `f` returns, without calling it.
    fn future_size<T: Future>(_f: impl FnOnce() -> T) -> usize {
        std::mem::size_of::<T>()
    }

    /// Each idle connection holds its connection task's future (reader and session), so its
    /// size is a large part of the memory per connection (docs/benchmarks.md, "Idle memory:
    /// where every byte goes"). Printed with `cargo test --release --lib task_future --
    /// --nocapture`; bounded in release builds (the layout of debug builds differs), so that
    /// growth is noticed.
    #[test]
    fn the_connection_task_future_stays_small() {
        let task = future_size(|| {
            conn::serve::<Session, fn()>(todo!(), todo!(), todo!(), todo!(), todo!(), todo!())
        });
        let reader = future_size(|| {
            conn::reader::run::<tokio::net::tcp::OwnedReadHalf, Session>(
                todo!(),
                todo!(),
                todo!(),
                todo!(),
                todo!(),
                todo!(),
            )
        });
        println!(
            "connection task future: {task} bytes (reader {reader}, Session {}, Outbox {})",
            std::mem::size_of::<Session>(),
            std::mem::size_of::<crate::wire::Outbox>(),
        );
        // Up to about 1,150 bytes the task's cell (padded to 128 bytes) stays at 1,280.
        if cfg!(not(debug_assertions)) {
            assert!(
                task <= 1150,
                "the connection task future grew to {task} bytes"
            );
        }
    }
}
