//! The HTTP server API for backends: `POST /api/publish`, `POST /api/disconnect`,
//! `GET /api/presence?channel=`.
//!
//! Off (404 for every `/api/*` path) unless `PUBGATE_API_KEY` is set; then every request needs
//! `Authorization: apikey <key>` (compared in constant time; 401 otherwise). Bodies are JSON,
//! capped at `PUBGATE_MAX_MESSAGE_SIZE` (413 beyond). Errors are `{"error":"<code>","message":..}`
//! with the WebSocket codes: 400 `bad_request` / `invalid_channel`, 503 `unavailable` (the broker
//! is down: not published), 504 `timeout` (outcome unknown). Publishing goes through the same
//! node path as a client publish (the history function with history on), and a disconnect is the
//! `__control` message every node obeys, so both work on any node and with the embedded broker.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::error::BrokerError;
use crate::node::Node;
use crate::wire::protocol::{present, reject_reserved, validate_channel};

/// An error answer, boxed: responses are large and the happy path should not carry one.
type Failure = Box<Response<Full<Bytes>>>;

/// Answers one request under `/api/`.
pub async fn handle(req: Request<Incoming>, node: Arc<Node>) -> Response<Full<Bytes>> {
    let route = match req.uri().path() {
        "/api/publish" => "publish",
        "/api/disconnect" => "disconnect",
        "/api/presence" => "presence",
        _ => "other",
    };
    let response = answer(req, &node, route).await;
    node.metrics()
        .api_requests
        .with_label_values(&[route, response.status().as_str()])
        .inc();
    response
}

async fn answer(req: Request<Incoming>, node: &Node, route: &str) -> Response<Full<Bytes>> {
    let Some(key) = node.api_key() else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if !authorized(&req, key) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "send `Authorization: apikey <PUBGATE_API_KEY>`",
        );
        response
            .headers_mut()
            .insert("www-authenticate", HeaderValue::from_static("apikey"));
        return response;
    }
    let method = req.method().clone();
    match (route, &method) {
        ("publish", &Method::POST) => publish(req, node).await,
        ("disconnect", &Method::POST) => disconnect(req, node).await,
        ("presence", &Method::GET) => presence(&req, node).await,
        ("publish" | "disconnect", _) => not_allowed("POST"),
        ("presence", _) => not_allowed("GET"),
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such API route"),
    }
}

fn authorized(req: &Request<Incoming>, key: &str) -> bool {
    let Some(value) = req.headers().get(AUTHORIZATION) else {
        return false;
    };
    let value = value.as_bytes();
    let scheme = b"apikey ";
    if value.len() < scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
        return false;
    }
    value[scheme.len()..].ct_eq(key.as_bytes()).into()
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    /// Present even when `null` (any JSON is a valid `data`, as in a client publish).
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
}

async fn publish(req: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let body = match read_body(req, node).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let parsed: PublishBody = match parse_object(&body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let channel = match channel_field(parsed.channel) {
        Ok(channel) => channel,
        Err(response) => return *response,
    };
    let Some(data) = parsed.data else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing field `data`",
        );
    };
    match node.publish(&channel, data.get()).await {
        Ok(Some(offset)) => json(StatusCode::OK, format!("{{\"offset\":{offset}}}")),
        Ok(None) => json(StatusCode::OK, "{}".to_owned()),
        Err(e) => broker_error(&e),
    }
}

#[derive(Deserialize)]
struct DisconnectBody<'a> {
    #[serde(borrow)]
    user: Option<&'a RawValue>,
}

async fn disconnect(req: Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let body = match read_body(req, node).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let parsed: DisconnectBody = match parse_object(&body) {
        Ok(parsed) => parsed,
        Err(response) => return *response,
    };
    let Some(user) = parsed
        .user
        .and_then(|u| serde_json::from_str::<String>(u.get()).ok())
    else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "field `user` must be a string",
        );
    };
    if !node.broker_up() {
        return broker_error(&BrokerError::Down);
    }
    match node.disconnect_user(&user).await {
        Ok(()) => json(StatusCode::OK, "{}".to_owned()),
        Err(e) => broker_error(&e),
    }
}

async fn presence(req: &Request<Incoming>, node: &Node) -> Response<Full<Bytes>> {
    let query = || form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes());
    let channel = query()
        .find(|(k, _)| k == "channel")
        .map(|(_, v)| v.into_owned());
    let count_only = match query().find(|(k, _)| k == "count_only") {
        None => false,
        Some((_, v)) if v == "true" || v == "1" => true,
        Some((_, v)) if v == "false" || v == "0" => false,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "query parameter `count_only` must be true or false",
            )
        }
    };
    let Some(channel) = channel else {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "missing query parameter `channel`",
        );
    };
    if let Err(why) = validate_channel(&channel).and_then(|()| reject_reserved(&channel)) {
        return error(StatusCode::BAD_REQUEST, "invalid_channel", why);
    }
    match node.presence(&channel, count_only).await {
        Ok(listing) => {
            let mut body = serde_json::json!({
                "channel": channel,
                "count": listing.count,
            });
            if !count_only {
                if listing.members.len() < listing.count {
                    body["truncated"] = true.into();
                }
                body["members"] = serde_json::json!(listing.members);
            }
            json(StatusCode::OK, body.to_string())
        }
        Err(e) => broker_error(&e),
    }
}

/// The body, at most `PUBGATE_MAX_MESSAGE_SIZE` bytes (413 beyond).
async fn read_body(req: Request<Incoming>, node: &Node) -> Result<Bytes, Failure> {
    let limit = node.limits().max_message_size;
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_request",
            &format!("body larger than {limit} bytes (PUBGATE_MAX_MESSAGE_SIZE)"),
        ))),
        Err(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "could not read the body",
        ))),
    }
}

fn parse_object<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Failure> {
    let text = std::str::from_utf8(body).unwrap_or("");
    if !text.trim_start().starts_with('{') {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the body must be a JSON object",
        )));
    }
    serde_json::from_str(text).map_err(|e| {
        Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("not a valid body: {e}"),
        ))
    })
}

fn channel_field(value: Option<&RawValue>) -> Result<String, Failure> {
    let Some(channel) = value.and_then(|v| serde_json::from_str::<String>(v.get()).ok()) else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "field `channel` must be a string",
        )));
    };
    validate_channel(&channel)
        .and_then(|()| reject_reserved(&channel))
        .map_err(|why| Box::new(error(StatusCode::BAD_REQUEST, "invalid_channel", why)))?;
    Ok(channel)
}

fn broker_error(e: &BrokerError) -> Response<Full<Bytes>> {
    match e {
        BrokerError::Timeout(_) => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            "the broker did not answer in time; the outcome is unknown",
        ),
        BrokerError::Down => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the broker is unavailable",
        ),
        other => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &other.to_string(),
        ),
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"error": code, "message": message});
    json(status, body.to_string())
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed",
    );
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}
