//! Who a member is, and the join/leave events announcing one.
//!
//! A member's JSON is written once when it joins and then stored and sent as it is: the Redis
//! store keeps it as the hash value, and join/leave events embed it verbatim, so the same bytes
//! describe the member in a query, in its join and in its leave.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Prefix of the broker channel carrying a channel's join/leave events: `__presence:<channel>`.
/// Reserved (it starts with `__`), so no client can subscribe to it directly.
pub const EVENTS_PREFIX: &str = "__presence:";

/// The broker channel of `channel`'s presence events.
pub fn events_channel(channel: &str) -> String {
    format!("{EVENTS_PREFIX}{channel}")
}

/// Whether a hub/broker key is a presence-event channel rather than a client channel.
pub fn is_events_channel(key: &str) -> bool {
    key.starts_with(EVENTS_PREFIX)
}

/// Largest `info` claim, in bytes of its compact JSON encoding.
pub const MAX_INFO_BYTES: usize = 1024;

/// One subscribed connection as a presence query shows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The connection id from the client's `welcome`.
    pub conn_id: String,
    /// The node id the connection is on.
    pub node: String,
    /// The authenticated user (`sub`), `null` for anonymous connections.
    pub user: Option<String>,
    /// The token's `info` object, absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Info>,
}

impl Member {
    /// The member's JSON (field order `conn_id`, `node`, `user`, `info`: the Redis reaper relies
    /// on `node` following `conn_id`).
    pub fn to_json(&self) -> String {
        // A struct of strings and already-valid JSON always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A token's `info` claim: a JSON object, kept as its compact text and shared, not re-parsed.
#[derive(Debug, Clone)]
pub struct Info(Arc<RawValue>);

impl Info {
    /// Wraps the compact JSON text of an object (checked by the caller: the token verifier).
    pub fn from_json(json: String) -> Result<Info, serde_json::Error> {
        RawValue::from_string(json).map(|raw| Info(Arc::from(raw)))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for Info {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for Info {}

impl Hash for Info {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.get().hash(state)
    }
}

impl Serialize for Info {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Info {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(|raw| Info(Arc::from(raw)))
    }
}

/// A presence event as the client receives it (and as it travels on the broker):
/// `{"type":"join","channel":"news","member":{..}}`. `channel` is a validated name (no escaping
/// needed) and `member_json` the member's JSON.
pub fn event_json(kind: EventKind, channel: &str, member_json: &str) -> String {
    let kind = kind.as_str();
    let mut out = String::with_capacity(40 + channel.len() + member_json.len());
    out.push_str(r#"{"type":""#);
    out.push_str(kind);
    out.push_str(r#"","channel":""#);
    out.push_str(channel);
    out.push_str(r#"","member":"#);
    out.push_str(member_json);
    out.push('}');
    out
}

/// Join or leave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Join,
    Leave,
}

impl EventKind {
    /// The event's `type` (and the metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Join => "join",
            EventKind::Leave => "leave",
        }
    }
}

/// The `conn_id` of the member an event is about, read without allocating; `None` if the
/// payload is not an event.
pub fn event_conn_id(payload: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Event<'a> {
        #[serde(borrow)]
        member: EventMember<'a>,
    }
    #[derive(Deserialize)]
    struct EventMember<'a> {
        #[serde(borrow)]
        conn_id: std::borrow::Cow<'a, str>,
    }
    serde_json::from_slice::<Event>(payload)
        .ok()
        .map(|e| e.member.conn_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_json_keeps_info_verbatim_and_omits_it_when_absent() {
        let mut m = Member {
            conn_id: "c1".into(),
            node: "n1".into(),
            user: None,
            info: None,
        };
        assert_eq!(m.to_json(), r#"{"conn_id":"c1","node":"n1","user":null}"#);
        m.info = Some(Info::from_json(r#"{"name":"Al","n":[1,2]}"#.into()).unwrap());
        let json = m.to_json();
        assert_eq!(
            json,
            r#"{"conn_id":"c1","node":"n1","user":null,"info":{"name":"Al","n":[1,2]}}"#
        );
        let back: Member = serde_json::from_str(&json).unwrap();
        assert_eq!(back, m);
        let event = event_json(EventKind::Leave, "news", &json);
        assert_eq!(
            event,
            format!(r#"{{"type":"leave","channel":"news","member":{json}}}"#)
        );
        assert_eq!(event_conn_id(event.as_bytes()).as_deref(), Some("c1"));
        assert_eq!(event_conn_id(b"{}"), None);
        assert_eq!(event_conn_id(b"junk"), None);
    }
}
