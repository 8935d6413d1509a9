//! The WebSocket message protocol: parsing client requests, encoding replies.
//!
//! Parsing borrows from the frame's text: a publish's `data` stays the client's exact JSON text
//! (it goes to the broker as is), and the request `id` is echoed verbatim. A malformed request is
//! a [`Rejection`] value, never an error that ends the connection.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::conn::frame;
use crate::presence::Member;

/// Longest channel name in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;

/// The `code` of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    InvalidChannel,
    NotSubscribed,
    TooManySubscriptions,
    Unsupported,
    Unavailable,
    /// A broker call timed out: its outcome is unknown (a publish may still be delivered).
    Timeout,
    RateLimited,
    Forbidden,
}

impl ErrorCode {
    /// The code as the client sees it (and as the `reason` label of the rejection metric).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Timeout => "timeout",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// A parsed client request.
#[derive(Debug)]
pub struct Request<'a> {
    /// The request id to echo, if the client gave one (a JSON `null` counts as none).
    pub id: Option<&'a RawValue>,
    pub command: Command<'a>,
}

/// What a client asked for. Channel names are already validated.
#[derive(Debug)]
pub enum Command<'a> {
    Subscribe {
        channel: Cow<'a, str>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        data: &'a RawValue,
    },
    Presence {
        channel: Cow<'a, str>,
    },
    Ping,
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A request answered with an error reply.
#[derive(Debug)]
pub struct Rejection<'a> {
    pub id: Option<&'a RawValue>,
    pub code: ErrorCode,
    pub message: Cow<'static, str>,
}

impl<'a> Rejection<'a> {
    pub fn new(
        id: Option<&'a RawValue>,
        code: ErrorCode,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Rejection {
            id,
            code,
            message: message.into(),
        }
    }
}

/// Every field is taken raw so a mistyped field becomes a precise `bad_request` instead of a
/// generic parse failure, and so `data` and `id` keep the client's exact text.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    channel: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
}

/// A present field, even `null` (serde would read `null` into `None`, losing `"data": null`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text message.
pub fn parse_request(text: &str) -> Result<Request<'_>, Rejection<'_>> {
    // serde would also read a struct from a JSON array; the contract wants objects only.
    if !text.trim_start().starts_with('{') {
        return Err(Rejection::new(
            None,
            ErrorCode::BadRequest,
            if serde_json::from_str::<&RawValue>(text).is_ok() {
                "a request must be a JSON object"
            } else {
                "not valid JSON"
            },
        ));
    }
    let raw: RawRequest = serde_json::from_str(text).map_err(|e| {
        Rejection::new(
            None,
            ErrorCode::BadRequest,
            format!("not a valid request: {e}"),
        )
    })?;
    let id = raw.id.filter(|v| v.get() != "null");
    let bad = |message: &'static str| Rejection::new(id, ErrorCode::BadRequest, message);
    let kind = match raw.kind {
        None => return Err(bad("missing field `type`")),
        Some(v) => json_str(v).ok_or_else(|| bad("field `type` must be a string"))?,
    };
    let channel = || -> Result<Cow<'_, str>, Rejection<'_>> {
        let value = raw.channel.ok_or_else(|| bad("missing field `channel`"))?;
        let name = json_str(value).ok_or_else(|| bad("field `channel` must be a string"))?;
        validate_channel(&name)
            .and_then(|()| reject_reserved(&name))
            .map_err(|why| Rejection::new(id, ErrorCode::InvalidChannel, why))?;
        Ok(name)
    };
    let command = match kind.as_ref() {
        "subscribe" => Command::Subscribe {
            channel: channel()?,
        },
        "unsubscribe" => Command::Unsubscribe {
            channel: channel()?,
        },
        "publish" => {
            let channel = channel()?;
            let data = raw.data.ok_or_else(|| bad("missing field `data`"))?;
            Command::Publish { channel, data }
        }
        "presence" => Command::Presence {
            channel: channel()?,
        },
        "ping" => Command::Ping,
        "refresh" => {
            let value = raw.token.ok_or_else(|| bad("missing field `token`"))?;
            let token = json_str(value).ok_or_else(|| bad("field `token` must be a string"))?;
            Command::Refresh { token }
        }
        other => {
            return Err(Rejection::new(
                id,
                ErrorCode::UnknownType,
                format!("unknown message type `{}`", truncate(other, 64)),
            ))
        }
    };
    Ok(Request { id, command })
}

/// A JSON string value, borrowed when it has no escapes.
fn json_str(value: &RawValue) -> Option<Cow<'_, str>> {
    if let Ok(s) = serde_json::from_str::<&str>(value.get()) {
        return Some(Cow::Borrowed(s));
    }
    serde_json::from_str::<String>(value.get())
        .ok()
        .map(Cow::Owned)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Checks a channel name: 1 to 200 bytes of `A-Z a-z 0-9 _ - . : @ /`.
pub fn validate_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err("channel name is longer than 200 bytes");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@/".contains(&b);
    if !name.bytes().all(allowed) {
        return Err("channel names may only contain A-Z a-z 0-9 _ - . : @ /");
    }
    Ok(())
}

/// Prefix of names reserved for the node itself (`__control`, probes): no client request may
/// use one, whatever its permissions.
pub const RESERVED_PREFIX: &str = "__";

/// Refuses a reserved channel name.
pub fn reject_reserved(name: &str) -> Result<(), &'static str> {
    if name.starts_with(RESERVED_PREFIX) {
        return Err("channel names starting with `__` are reserved");
    }
    Ok(())
}

/// Encodes the delivery of a broker message to local subscribers as one complete WebSocket frame,
/// once per node: every subscriber gets a clone of the same bytes.
///
/// A payload that is valid JSON is embedded as is; anything else (what a backend may `PUBLISH`)
/// arrives as a JSON string. `channel` is a validated name, so it needs no escaping.
pub fn encode_delivery(channel: &str, payload: &[u8]) -> Bytes {
    frame::text(DELIVERY_OVERHEAD + channel.len() + payload.len(), |out| {
        write_delivery(out, channel, payload)
    })
}

const DELIVERY_HEAD: &[u8] = br#"{"type":"message","channel":""#;
const DELIVERY_MID: &[u8] = br#"","data":"#;
const DELIVERY_OVERHEAD: usize = DELIVERY_HEAD.len() + DELIVERY_MID.len() + 3;

fn write_delivery(out: &mut Vec<u8>, channel: &str, payload: &[u8]) {
    out.extend_from_slice(DELIVERY_HEAD);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(DELIVERY_MID);
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        out.extend_from_slice(payload);
    } else {
        let text = String::from_utf8_lossy(payload);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text.as_ref());
    }
    out.push(b'}');
}

/// Server-to-client messages other than deliveries.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Reply<'a> {
    Welcome {
        conn_id: &'a str,
        node: &'a str,
        ping_interval_ms: u64,
    },
    Subscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    },
    Unsubscribed {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Set when the server ended the subscription (`forbidden` after a refresh).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
    },
    Published {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    },
    Presence {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        count: usize,
        members: &'a [Member],
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
    },
    Refreshed {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        exp: u64,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        code: &'static str,
        message: &'a str,
    },
}

impl Reply<'_> {
    /// The reply as one complete WebSocket text frame.
    pub fn encode(&self) -> Bytes {
        // Serialising these plain structs into a Vec cannot fail.
        frame::text(128, |out| {
            let _ = serde_json::to_writer(out, self);
        })
    }
}

impl<'a> From<&'a Rejection<'a>> for Reply<'a> {
    fn from(r: &'a Rejection<'a>) -> Self {
        Reply::Error {
            id: r.id,
            code: r.code.as_str(),
            message: &r.message,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    /// The JSON text of a frame made by `frame::text` (short frames only).
    fn json(frame: &[u8]) -> Value {
        let offset = if frame[1] == 126 { 4 } else { 2 };
        serde_json::from_slice(&frame[offset..]).unwrap()
    }

    fn reject(text: &str) -> (ErrorCode, Option<String>) {
        let r = parse_request(text).unwrap_err();
        (r.code, r.id.map(|v| v.get().to_owned()))
    }

    #[test]
    fn parses_every_command() {
        let r = parse_request(r#"{"type":"subscribe","channel":"news","id":1}"#).unwrap();
        assert_eq!(r.id.unwrap().get(), "1");
        assert!(matches!(r.command, Command::Subscribe { channel } if channel == "news"));
        let r = parse_request(r#"{"type":"unsubscribe","channel":"a/b"}"#).unwrap();
        assert!(r.id.is_none());
        assert!(matches!(r.command, Command::Unsubscribe { .. }));
        let r =
            parse_request(r#"{"type":"publish","channel":"c","data": {"x": [1, 2]} ,"id":"s"}"#)
                .unwrap();
        match r.command {
            Command::Publish { data, .. } => assert_eq!(data.get(), r#"{"x": [1, 2]}"#),
            other => panic!("{other:?}"),
        }
        assert_eq!(r.id.unwrap().get(), r#""s""#);
        assert!(matches!(
            parse_request(r#"{"type":"presence","channel":"c"}"#)
                .unwrap()
                .command,
            Command::Presence { .. }
        ));
        assert!(matches!(
            parse_request(r#"{"type":"ping"}"#).unwrap().command,
            Command::Ping
        ));
    }

    #[test]
    fn escaped_strings_are_understood() {
        let r = parse_request(r#"{"type":"sub\u0073cribe","channel":"n\u0065ws"}"#).unwrap();
        assert!(matches!(r.command, Command::Subscribe { channel } if channel == "news"));
    }

    #[test]
    fn null_data_is_data_but_null_id_is_no_id() {
        let r = parse_request(r#"{"type":"publish","channel":"c","data":null,"id":null}"#).unwrap();
        assert!(r.id.is_none());
        assert!(matches!(r.command, Command::Publish { data, .. } if data.get() == "null"));
    }

    #[test]
    fn malformed_requests_are_bad_requests() {
        for text in [
            "not json",
            "[1,2]",
            r#""subscribe""#,
            "42",
            "{",
            r#"{"type":"subscribe","channel":"a","channel":"b"}"#,
        ] {
            assert_eq!(reject(text), (ErrorCode::BadRequest, None), "{text}");
        }
        let id = Some("7".to_owned());
        for text in [
            r#"{"id":7}"#,
            r#"{"type":5,"id":7}"#,
            r#"{"type":"subscribe","id":7}"#,
            r#"{"type":"subscribe","channel":3,"id":7}"#,
            r#"{"type":"publish","channel":"c","id":7}"#,
        ] {
            assert_eq!(reject(text), (ErrorCode::BadRequest, id.clone()), "{text}");
        }
    }

    #[test]
    fn unknown_types_and_bad_channels() {
        assert_eq!(
            reject(r#"{"type":"dance","id":"x"}"#),
            (ErrorCode::UnknownType, Some(r#""x""#.into()))
        );
        assert_eq!(
            reject(r#"{"type":"subscribe","channel":"a b"}"#).0,
            ErrorCode::InvalidChannel
        );
    }

    #[test]
    fn reserved_names_are_invalid_channels_for_every_command() {
        for text in [
            r#"{"type":"subscribe","channel":"__control","id":1}"#,
            r#"{"type":"unsubscribe","channel":"__x","id":1}"#,
            r#"{"type":"publish","channel":"__control","data":1,"id":1}"#,
            r#"{"type":"presence","channel":"__","id":1}"#,
        ] {
            assert_eq!(
                reject(text),
                (ErrorCode::InvalidChannel, Some("1".into())),
                "{text}"
            );
        }
        assert!(parse_request(r#"{"type":"subscribe","channel":"_x"}"#).is_ok());
        assert!(parse_request(r#"{"type":"subscribe","channel":"a__b"}"#).is_ok());
    }

    #[test]
    fn refresh_needs_a_string_token() {
        let r = parse_request(r#"{"type":"refresh","token":"a.b.c","id":6}"#).unwrap();
        assert!(matches!(r.command, Command::Refresh { token } if token == "a.b.c"));
        assert_eq!(
            reject(r#"{"type":"refresh","id":6}"#),
            (ErrorCode::BadRequest, Some("6".into()))
        );
        assert_eq!(
            reject(r#"{"type":"refresh","token":5,"id":6}"#),
            (ErrorCode::BadRequest, Some("6".into()))
        );
    }

    #[test]
    fn channel_names() {
        assert!(validate_channel("news").is_ok());
        assert!(validate_channel("A-z_0.9:@/x").is_ok());
        assert!(validate_channel(&"x".repeat(200)).is_ok());
        assert!(validate_channel(&"x".repeat(201)).is_err());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("a b").is_err());
        assert!(validate_channel("café").is_err());
        assert!(validate_channel("a*").is_err());
    }

    #[test]
    fn deliveries_embed_json_and_quote_the_rest() {
        let v: Value = json(&encode_delivery("n", br#"{"x":1}"#));
        assert_eq!(v, json!({"type":"message","channel":"n","data":{"x":1}}));
        let v: Value = json(&encode_delivery("n", b"hello"));
        assert_eq!(v["data"], "hello");
        let v: Value = json(&encode_delivery("n", b"{\"a\":1} trailing"));
        assert_eq!(v["data"], "{\"a\":1} trailing");
        let v: Value = json(&encode_delivery("n", b"\xff\"q"));
        assert_eq!(v["data"], "\u{fffd}\"q");
        let v: Value = json(&encode_delivery("n", b""));
        assert_eq!(v["data"], "");
    }

    #[test]
    fn replies_omit_missing_ids() {
        let r = Reply::Subscribed {
            channel: "n",
            id: None,
        };
        let frame = r.encode();
        assert_eq!(&frame[2..], br#"{"type":"subscribed","channel":"n"}"#);
        assert_eq!(usize::from(frame[1]), frame.len() - 2);
        let rej = Rejection::new(None, ErrorCode::BadRequest, "x");
        let v = json(&Reply::from(&rej).encode());
        assert_eq!(
            v,
            json!({"type":"error","code":"bad_request","message":"x"})
        );
    }
}
