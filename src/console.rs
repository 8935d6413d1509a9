//! The operator console: `GET /console` (one page) and the files it loads from `/console/*`,
//! served only when `PUBGATE_CONSOLE` is on; off, every `/console` path is the plain 404 of an
//! unknown path, so a node that does not want it reveals nothing.
//!
//! The page runs on the JavaScript client package itself: `clients/js/src/index.js` is embedded
//! here with `include_str!`, so the console and the published package can never drift apart.
//! Nothing secret is in it (the operator types a token, which stays in the page). The strict
//! Content-Security-Policy allows scripts and styles from this node only (no inline code) and
//! WebSocket connections to this node only, and forbids framing; this module must not grow
//! anything that needs a looser policy.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderName, HeaderValue, ALLOW, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Response, StatusCode};

use crate::node::Node;

/// The page, its script and style, and the client package (the same bytes npm users import).
const FILES: [(&str, &str, &str); 4] = [
    (
        "/console",
        "text/html; charset=utf-8",
        include_str!("console/index.html"),
    ),
    (
        "/console/console.js",
        "text/javascript; charset=utf-8",
        include_str!("console/console.js"),
    ),
    (
        "/console/console.css",
        "text/css; charset=utf-8",
        include_str!("console/console.css"),
    ),
    (
        "/console/pubgate-client.js",
        "text/javascript; charset=utf-8",
        include_str!("../clients/js/src/index.js"),
    ),
];

/// `connect-src 'self'` covers `ws:`/`wss:` to the page's own host and port (CSP level 3).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Answers a path equal to `/console` or under `/console/`; `get` is whether the method is GET
/// or HEAD.
pub fn respond(node: &Node, path: &str, get: bool) -> Response<Full<Bytes>> {
    let file = FILES.iter().find(|(p, _, _)| *p == path);
    let Some((_, content_type, body)) = file.filter(|_| node.console()) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !get {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("DENY"),
    );
    // A node upgrade may change the page and the client together: never mix versions.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
