//! Presence for a single node, in memory. Nothing expires: the node itself removes members.
//!
//! Events go through the embedded broker like any publish, so they reach the hub on the same
//! path as on Redis. They are published after the map's lock is released; the node never runs
//! two operations for one member at once (one connection's requests are sequential), so a
//! member's join and leave still go out in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::{event_json, events_channel, EventKind, Heartbeat, Listing, Member, Presence};
use crate::broker::Broker;
use crate::error::BrokerError;

type Channels = HashMap<String, HashMap<String, Member>>;

/// channel -> conn_id -> member.
#[derive(Default)]
pub struct MemoryPresence {
    channels: Mutex<Channels>,
    /// Where join/leave events are published; `None` announces nothing.
    events: Option<Arc<dyn Broker>>,
}

impl MemoryPresence {
    /// A store that announces nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that publishes join/leave events on `broker`.
    pub fn with_events(broker: Arc<dyn Broker>) -> Self {
        MemoryPresence {
            channels: Mutex::default(),
            events: Some(broker),
        }
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_locked(channels: &mut Channels, channel: &str, conn_id: &str) -> Option<Member> {
        let members = channels.get_mut(channel)?;
        let removed = members.remove(conn_id);
        if members.is_empty() {
            channels.remove(channel);
        }
        removed
    }

    async fn announce(&self, kind: EventKind, events: Vec<(String, Member)>) -> usize {
        let Some(broker) = &self.events else {
            return events.len();
        };
        for (channel, member) in &events {
            let event = event_json(kind, channel, &member.to_json());
            // The embedded broker never fails a publish.
            let _ = broker
                .publish(&events_channel(channel), Bytes::from(event))
                .await;
        }
        events.len()
    }

    async fn remove_iter<'a>(
        &self,
        pairs: impl Iterator<Item = (&'a str, &'a str)>,
    ) -> Result<usize, BrokerError> {
        let removed: Vec<(String, Member)> = {
            let mut map = self.channels();
            pairs
                .filter_map(|(channel, conn_id)| {
                    Self::remove_locked(&mut map, channel, conn_id).map(|m| (channel.to_owned(), m))
                })
                .collect()
        };
        Ok(self.announce(EventKind::Leave, removed).await)
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn add(&self, channel: &str, member: &Member) -> Result<bool, BrokerError> {
        let new = self
            .channels()
            .entry(channel.to_owned())
            .or_default()
            .insert(member.conn_id.clone(), member.clone())
            .is_none();
        if new {
            self.announce(EventKind::Join, vec![(channel.to_owned(), member.clone())])
                .await;
        }
        Ok(new)
    }

    async fn remove_pairs(&self, pairs: &[(&str, &str)]) -> Result<usize, BrokerError> {
        self.remove_iter(pairs.iter().copied()).await
    }

    async fn list(&self, channel: &str, max: usize) -> Result<Listing, BrokerError> {
        let channels = self.channels();
        let Some(members) = channels.get(channel) else {
            return Ok(Listing::default());
        };
        Ok(Listing {
            count: members.len(),
            members: members.values().take(max).cloned().collect(),
        })
    }

    async fn restore(&self, members: &[(String, Member)]) -> Result<usize, BrokerError> {
        let mut joins = 0;
        for (channel, member) in members {
            joins += self.add(channel, member).await? as usize;
        }
        Ok(joins)
    }

    async fn unindex(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn heartbeat(&self) -> Result<Heartbeat, BrokerError> {
        Ok(Heartbeat::default())
    }

    async fn reap(&self, _node: &str) -> Result<usize, BrokerError> {
        Ok(0)
    }
}
