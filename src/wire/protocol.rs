//! The WebSocket message protocol: parsing client requests, encoding replies.
//!
//! Parsing borrows from the frame's text: a publish's `data` stays the client's exact JSON text
//! (it goes to the broker as is), and the request `id` is echoed verbatim. A malformed request is
//! a [`Rejection`] value, never an error that ends the connection.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::{frame, Member};

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
        /// Also receive the channel's join/leave events.
        presence_events: bool,
        /// Recovery: the last position the client saw.
        since: Option<Since<'a>>,
    },
    History {
        channel: Cow<'a, str>,
        /// `None`: the history size.
        limit: Option<u64>,
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
        /// Reply with the count only, no `members`.
        count_only: bool,
    },
    Ping,
    Refresh {
        token: Cow<'a, str>,
    },
}

/// `"since":{"epoch":"..","offset":N}` of a subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since<'a> {
    pub epoch: Cow<'a, str>,
    pub offset: u64,
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
    #[serde(borrow, default, deserialize_with = "present")]
    presence_events: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    count_only: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    limit: Option<&'a RawValue>,
}

/// The object form of `since`; fields raw for precise errors.
#[derive(Deserialize)]
struct RawSince<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    epoch: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    offset: Option<&'a RawValue>,
}

/// A present field, even `null` (serde would read `null` into `None`, losing `"data": null`).
pub(crate) fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<&'de RawValue>, D::Error> {
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
    // An optional boolean flag: absent is false; anything but `true`/`false` is refused.
    let flag = |value: Option<&RawValue>, message: &'static str| match value.map(RawValue::get) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(_) => Err(bad(message)),
    };
    let command = match kind.as_ref() {
        "subscribe" => {
            let channel = channel()?;
            let since = match raw.since.filter(|v| v.get() != "null") {
                None => None,
                Some(value) => Some(parse_since(value).map_err(bad)?),
            };
            let presence_events = flag(
                raw.presence_events,
                "field `presence_events` must be a boolean",
            )?;
            Command::Subscribe {
                channel,
                since,
                presence_events,
            }
        }
        "history" => {
            let channel = channel()?;
            let limit = match raw.limit.filter(|v| v.get() != "null") {
                None => None,
                Some(value) => Some(
                    serde_json::from_str::<u64>(value.get())
                        .map_err(|_| bad("field `limit` must be a non-negative integer"))?,
                ),
            };
            Command::History { channel, limit }
        }
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
            count_only: flag(raw.count_only, "field `count_only` must be a boolean")?,
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

/// `since`: an object with a string `epoch` and a non-negative integer `offset`.
fn parse_since(value: &RawValue) -> Result<Since<'_>, &'static str> {
    const SHAPE: &str =
        "field `since` must be an object {\"epoch\": string, \"offset\": non-negative integer}";
    if !value.get().trim_start().starts_with('{') {
        return Err(SHAPE);
    }
    let raw: RawSince = serde_json::from_str(value.get()).map_err(|_| SHAPE)?;
    let epoch = raw.epoch.and_then(json_str).ok_or(SHAPE)?;
    let offset = raw
        .offset
        .and_then(|v| serde_json::from_str::<u64>(v.get()).ok())
        .ok_or(SHAPE)?;
    Ok(Since { epoch, offset })
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

/// Checks a channel name: 1 to 200 bytes of `A-Z a-z 0-9 _ - . : @ / | + = ~` (v1.2 added the
/// last four, so identity-provider subjects like `auth0|42` have a `user:` channel).
pub fn validate_channel(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("channel name is empty");
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err("channel name is longer than 200 bytes");
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-.:@/|+=~".contains(&b);
    if !name.bytes().all(allowed) {
        return Err("channel names may only contain A-Z a-z 0-9 _ - . : @ / | + = ~");
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

/// [`encode_delivery`] of a positioned message: the same object with `"offset":N` last.
pub fn encode_delivery_at(channel: &str, payload: &[u8], offset: u64) -> Bytes {
    frame::text(
        DELIVERY_OVERHEAD + OFFSET_OVERHEAD + channel.len() + payload.len(),
        |out| {
            write_delivery(out, channel, payload);
            out.pop();
            write_offset(out, offset);
            out.push(b'}');
        },
    )
}

/// `,"offset":` plus at most 20 digits.
const OFFSET_OVERHEAD: usize = 30;

fn write_offset(out: &mut Vec<u8>, offset: u64) {
    out.extend_from_slice(br#","offset":"#);
    let mut digits = [0u8; 20];
    let mut n = offset;
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// One `history` reply: `{"type":"history","channel":..,"id":..,"epoch":..,"offset":N,
/// "messages":[{"offset":..,"data":..}, ...]}`; `data` as in a delivery.
pub fn encode_history(
    channel: &str,
    id: Option<&RawValue>,
    epoch: &str,
    offset: u64,
    messages: &[(u64, Bytes)],
) -> Bytes {
    let size: usize = messages.iter().map(|(_, m)| m.len() + 40).sum();
    frame::text(128 + channel.len() + epoch.len() + size, |out| {
        out.extend_from_slice(br#"{"type":"history","channel":""#);
        out.extend_from_slice(channel.as_bytes());
        out.push(b'"');
        if let Some(id) = id {
            out.extend_from_slice(br#","id":"#);
            out.extend_from_slice(id.get().as_bytes());
        }
        out.extend_from_slice(br#","epoch":"#);
        let _ = serde_json::to_writer(&mut *out, epoch);
        write_offset(out, offset);
        out.extend_from_slice(br#","messages":["#);
        for (i, (offset, payload)) in messages.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(br#"{"offset":"#);
            out.extend_from_slice(offset.to_string().as_bytes());
            out.extend_from_slice(br#","data":"#);
            write_data(out, payload);
            out.push(b'}');
        }
        out.extend_from_slice(b"]}");
    })
}

const DELIVERY_HEAD: &[u8] = br#"{"type":"message","channel":""#;
const DELIVERY_MID: &[u8] = br#"","data":"#;
const DELIVERY_OVERHEAD: usize = DELIVERY_HEAD.len() + DELIVERY_MID.len() + 3;

fn write_delivery(out: &mut Vec<u8>, channel: &str, payload: &[u8]) {
    out.extend_from_slice(DELIVERY_HEAD);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(DELIVERY_MID);
    write_data(out, payload);
    out.push(b'}');
}

/// A payload as the `data` value: valid JSON as is, anything else as a JSON string.
fn write_data(out: &mut Vec<u8>, payload: &[u8]) {
    if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        out.extend_from_slice(payload);
    } else {
        let text = String::from_utf8_lossy(payload);
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, text.as_ref());
    }
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
        /// History on: the channel's epoch and newest offset.
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// Only for a subscribe with `since`.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
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
        /// History on: the offset the message got.
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
    },
    Presence {
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a RawValue>,
        /// Every member, exactly.
        count: usize,
        /// Absent for a `count_only` query.
        #[serde(skip_serializing_if = "Option::is_none")]
        members: Option<&'a [Member]>,
        /// Set when `members` was capped at `PUBGATE_PRESENCE_MAX_MEMBERS`.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        truncated: bool,
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
        assert!(matches!(
            r.command,
            Command::Subscribe { channel, since: None, .. } if channel == "news"
        ));
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
    fn presence_flags_are_optional_booleans() {
        let r = parse_request(r#"{"type":"subscribe","channel":"c","presence_events":true}"#);
        assert!(matches!(
            r.unwrap().command,
            Command::Subscribe {
                presence_events: true,
                ..
            }
        ));
        let r = parse_request(r#"{"type":"subscribe","channel":"c","presence_events":false}"#);
        assert!(matches!(
            r.unwrap().command,
            Command::Subscribe {
                presence_events: false,
                ..
            }
        ));
        let r = parse_request(r#"{"type":"presence","channel":"c","count_only": true }"#);
        assert!(matches!(
            r.unwrap().command,
            Command::Presence {
                count_only: true,
                ..
            }
        ));
        let r = parse_request(r#"{"type":"presence","channel":"c"}"#);
        assert!(matches!(
            r.unwrap().command,
            Command::Presence {
                count_only: false,
                ..
            }
        ));
        for text in [
            r#"{"type":"subscribe","channel":"c","presence_events":1,"id":7}"#,
            r#"{"type":"subscribe","channel":"c","presence_events":"true","id":7}"#,
            r#"{"type":"presence","channel":"c","count_only":null,"id":7}"#,
        ] {
            assert_eq!(
                reject(text),
                (ErrorCode::BadRequest, Some("7".into())),
                "{text}"
            );
        }
    }

    #[test]
    fn since_and_limit_are_parsed_strictly() {
        let r = parse_request(
            r#"{"type":"subscribe","channel":"c","since":{"epoch":"e1","offset":17}}"#,
        )
        .unwrap();
        match r.command {
            Command::Subscribe { since: Some(s), .. } => {
                assert_eq!((&*s.epoch, s.offset), ("e1", 17))
            }
            other => panic!("{other:?}"),
        }
        let r = parse_request(r#"{"type":"subscribe","channel":"c","since":null}"#).unwrap();
        assert!(matches!(r.command, Command::Subscribe { since: None, .. }));
        for bad in [
            r#""since":1"#,
            r#""since":[]"#,
            r#""since":{}"#,
            r#""since":{"epoch":"e"}"#,
            r#""since":{"offset":1}"#,
            r#""since":{"epoch":2,"offset":1}"#,
            r#""since":{"epoch":"e","offset":-1}"#,
            r#""since":{"epoch":"e","offset":1.5}"#,
            r#""since":{"epoch":"e","offset":"1"}"#,
            r#""since":{"epoch":"e","offset":18446744073709551616}"#,
        ] {
            let text = format!(r#"{{"type":"subscribe","channel":"c","id":3,{bad}}}"#);
            assert_eq!(
                reject(&text),
                (ErrorCode::BadRequest, Some("3".into())),
                "{bad}"
            );
        }
        let r = parse_request(r#"{"type":"history","channel":"c","limit":5}"#).unwrap();
        assert!(matches!(r.command, Command::History { limit: Some(5), .. }));
        let r = parse_request(r#"{"type":"history","channel":"c"}"#).unwrap();
        assert!(matches!(r.command, Command::History { limit: None, .. }));
        for bad in [r#"-1"#, r#""5""#, "2.5", "{}"] {
            let text = format!(r#"{{"type":"history","channel":"c","limit":{bad}}}"#);
            assert_eq!(reject(&text).0, ErrorCode::BadRequest, "{bad}");
        }
    }

    #[test]
    fn positioned_deliveries_end_with_the_offset() {
        let f = encode_delivery_at("news", br#"{"x":1}"#, 18);
        assert_eq!(
            json(&f),
            json!({"type":"message","channel":"news","data":{"x":1},"offset":18})
        );
        let f = encode_delivery_at("n", b"hi", u64::MAX);
        assert_eq!(json(&f)["offset"], json!(u64::MAX));
        let f = encode_history("n", None, "e", 2, &[(2, Bytes::from_static(b"raw"))]);
        assert_eq!(
            json(&f),
            json!({"type":"history","channel":"n","epoch":"e","offset":2,
                   "messages":[{"offset":2,"data":"raw"}]})
        );
    }

    #[test]
    fn escaped_strings_are_understood() {
        let r = parse_request(r#"{"type":"sub\u0073cribe","channel":"n\u0065ws"}"#).unwrap();
        assert!(matches!(
            r.command,
            Command::Subscribe { channel, since: None, .. } if channel == "news"
        ));
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
        // v1.2: `| + = ~`, for identity-provider subjects in `user:` channels.
        assert!(validate_channel("user:auth0|42").is_ok());
        assert!(validate_channel("a+b=c~d").is_ok());
        for bad in ["a#", "a,b", "a%20", "a\"b", "a\\b", "a^", "a`", "a'"] {
            assert!(validate_channel(bad).is_err(), "{bad}");
        }
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
            epoch: None,
            offset: None,
            recovered: None,
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
