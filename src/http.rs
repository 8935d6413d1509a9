//! HTTP routes: `/ws`, `/healthz`, `/readyz`, `/metrics`; 404 otherwise.
//!
//! The service never returns an error: hyper aborts a connection whose service fails, and a
//! client deserves a status code (426 without upgrade headers, 400 for a malformed upgrade,
//! 503 while draining) rather than a dropped socket.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, SEC_WEBSOCKET_VERSION, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::task::TaskTracker;

use crate::conn;
use crate::node::Node;

pub type Body = Full<Bytes>;

/// Routes one request. WebSocket sessions are spawned on `sessions` so shutdown can wait for them.
pub async fn handle(
    req: Request<Incoming>,
    node: Arc<Node>,
    sessions: TaskTracker,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path();
    let get = matches!(*req.method(), Method::GET | Method::HEAD);
    Ok(match path {
        "/ws" if req.method() == Method::GET => upgrade(req, node, sessions),
        "/healthz" if get => text(StatusCode::OK, "ok\n"),
        "/readyz" if get => match node.readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        "/metrics" if get => {
            let mut response = text(StatusCode::OK, node.metrics.render());
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/ws" | "/healthz" | "/readyz" | "/metrics" => {
            let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET"));
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// Answers a `GET /ws`: refusals in the contract's order, then the 101 and a session task.
fn upgrade(mut req: Request<Incoming>, node: Arc<Node>, sessions: TaskTracker) -> Response<Body> {
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
    if node.drain.is_draining() {
        reject(&node, "draining");
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
    }
    match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok((response, upgraded)) => {
            let tracker = sessions.clone();
            sessions.spawn(async move {
                // The session is a task of its own: the upgrade's state, larger than the
                // session's, is freed instead of staying in every connection's task cell.
                match upgraded.await {
                    Ok(ws) => drop(tracker.spawn(conn::serve(ws, node))),
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

fn reject(node: &Node, reason: &str) {
    node.metrics
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
