//! The Redis Cluster slot map as the sharded pub/sub layer needs it: which master owns the slot of
//! a channel, and a probe channel name whose slot a given master owns.
//!
//! Read from `CLUSTER SLOTS` (answered by every Redis 7 node; `CLUSTER SHARDS` says the same in a
//! deeper shape). Pure data: no connection is made here.

use redis::Value;

/// Number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of a key or shard channel name: CRC16/XMODEM of the name, or of its hash tag
/// (the part between the first `{` and the next `}`, when not empty), modulo 16384.
pub fn slot_of(name: &[u8]) -> u16 {
    let tagged = name
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &name[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(name);
    crc16::State::<crc16::XMODEM>::calculate(tagged) % SLOTS
}

/// Broker channels starting with this carry presence events (`__presence:<channel>`).
const PRESENCE_EVENTS: &str = "__presence:";

/// The Redis shard channel of a broker channel in cluster mode: `<prefix><channel>`, except the
/// presence events of a channel, `<prefix>__presence:{<prefix><channel>}`, so they share the slot
/// of the channel's presence key and the presence scripts may SPUBLISH them (a script may only
/// touch its own slot). Shard channels and keys are separate namespaces: the same name is fine.
pub fn sharded_name(prefix: &str, channel: &str) -> String {
    match channel.strip_prefix(PRESENCE_EVENTS) {
        Some(of) => format!("{prefix}{PRESENCE_EVENTS}{{{prefix}{of}}}"),
        None => format!("{prefix}{channel}"),
    }
}

/// The broker channel of a shard channel name (the inverse of [`sharded_name`]); `None` for a
/// name outside the prefix.
pub fn broker_channel<'a>(prefix: &str, name: &'a str) -> Option<std::borrow::Cow<'a, str>> {
    let channel = name.strip_prefix(prefix)?;
    if let Some(tagged) = channel.strip_prefix(PRESENCE_EVENTS) {
        if let Some(of) = tagged
            .strip_prefix('{')
            .and_then(|t| t.strip_prefix(prefix))
            .and_then(|t| t.strip_suffix('}'))
        {
            return Some(format!("{PRESENCE_EVENTS}{of}").into());
        }
    }
    Some(channel.into())
}

/// Slot ranges and the master (`host:port`) that owns each.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// `(first, last, master)`, sorted by `first`.
    ranges: Vec<(u16, u16, String)>,
}

impl SlotMap {
    /// Builds a map from `(first, last, master)` ranges.
    pub fn new(mut ranges: Vec<(u16, u16, String)>) -> SlotMap {
        ranges.sort();
        SlotMap { ranges }
    }

    /// Parses a `CLUSTER SLOTS` reply. An empty host means "the node that answered", whose host
    /// is `asked_host`.
    pub fn from_cluster_slots(reply: &Value, asked_host: &str) -> Option<SlotMap> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return None,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return None;
            };
            let host = if host.is_empty() || host == "?" {
                asked_host.to_owned()
            } else {
                host
            };
            ranges.push((
                u16::try_from(*first).ok()?,
                u16::try_from(*last).ok()?,
                format!("{host}:{port}"),
            ));
        }
        Some(SlotMap::new(ranges))
    }

    /// The master owning `slot`, `None` while the slot is not served.
    pub fn owner(&self, slot: u16) -> Option<&str> {
        let i = self.ranges.partition_point(|(first, _, _)| *first <= slot);
        let (first, last, master) = self.ranges.get(i.checked_sub(1)?)?;
        (*first <= slot && slot <= *last).then_some(master.as_str())
    }

    /// The master owning the slot of `name`.
    pub fn owner_of(&self, name: &str) -> Option<&str> {
        self.owner(slot_of(name.as_bytes()))
    }

    /// Whether every slot is served.
    pub fn is_complete(&self) -> bool {
        let mut next = 0u32;
        for (first, last, _) in &self.ranges {
            if u32::from(*first) != next {
                return false;
            }
            next = u32::from(*last) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// `<base><n>` for the smallest `n` whose slot `master` owns; `None` if it owns no slot.
    pub fn probe_channel(&self, base: &str, master: &str) -> Option<String> {
        if !self.ranges.iter().any(|(_, _, m)| m == master) {
            return None;
        }
        // A master owning k of 16384 slots is hit after about 16384/k tries.
        (0..4 * u32::from(SLOTS))
            .map(|n| format!("{base}{n}"))
            .find(|name| self.owner_of(name) == Some(master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_events_share_the_slot_of_the_presence_key() {
        let name = sharded_name("p:", "__presence:news");
        assert_eq!(name, "p:__presence:{p:news}");
        assert_eq!(slot_of(name.as_bytes()), slot_of(b"p:__presence:{p:news}"));
        assert_eq!(slot_of(name.as_bytes()), slot_of(b"p:news"));
        assert_eq!(broker_channel("p:", &name).unwrap(), "__presence:news");
        assert_eq!(sharded_name("p:", "news"), "p:news");
        assert_eq!(broker_channel("p:", "p:news").unwrap(), "news");
        assert_eq!(broker_channel("p:", "p:__control").unwrap(), "__control");
        assert_eq!(broker_channel("p:", "q:news"), None);
    }

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.0.15.
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_ne!(slot_of(b"foo{}{bar}"), slot_of(b"bar"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b""), 0);
    }

    fn master(host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::BulkString(host.as_bytes().to_vec()),
            Value::Int(port),
            Value::BulkString(b"id".to_vec()),
        ])
    }

    #[test]
    fn cluster_slots_reply_is_read() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(10922),
                master("10.0.0.2", 7001),
                master("10.0.0.5", 7004),
            ]),
            Value::Array(vec![Value::Int(0), Value::Int(5460), master("", 7000)]),
            Value::Array(vec![
                Value::Int(10923),
                Value::Int(16383),
                master("10.0.0.3", 7002),
            ]),
        ]);
        let map = SlotMap::from_cluster_slots(&reply, "seed").unwrap();
        assert!(map.is_complete());
        assert_eq!(map.owner(0), Some("seed:7000"));
        assert_eq!(map.owner(5461), Some("10.0.0.2:7001"));
        assert_eq!(map.owner(16383), Some("10.0.0.3:7002"));
        assert_eq!(map.owner_of("foo"), Some("10.0.0.3:7002"));
        for m in ["seed:7000", "10.0.0.2:7001", "10.0.0.3:7002"] {
            let probe = map.probe_channel("p:__probe:n:", m).unwrap();
            assert_eq!(map.owner_of(&probe), Some(m));
        }
        assert_eq!(map.probe_channel("p", "other:1"), None);
        let partial = SlotMap::new(vec![(0, 100, "a:1".into())]);
        assert!(!partial.is_complete());
        assert_eq!(partial.owner(101), None);
        assert!(SlotMap::from_cluster_slots(&Value::Int(1), "h").is_none());
    }
}
