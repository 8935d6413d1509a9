//! Presence for a single node, in memory. Nothing expires: the node itself removes members.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Member, Presence};
use crate::error::BrokerError;

/// channel -> conn_id -> member.
#[derive(Debug, Default)]
pub struct MemoryPresence {
    channels: Mutex<HashMap<String, HashMap<String, Member>>>,
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Member>>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove_locked(
        channels: &mut HashMap<String, HashMap<String, Member>>,
        channel: &str,
        conn_id: &str,
    ) {
        if let Some(members) = channels.get_mut(channel) {
            members.remove(conn_id);
            if members.is_empty() {
                channels.remove(channel);
            }
        }
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn add(&self, channel: &str, member: &Member) -> Result<(), BrokerError> {
        self.channels()
            .entry(channel.to_owned())
            .or_default()
            .insert(member.conn_id.clone(), member.clone());
        Ok(())
    }

    async fn remove(&self, channel: &str, conn_id: &str) -> Result<(), BrokerError> {
        Self::remove_locked(&mut self.channels(), channel, conn_id);
        Ok(())
    }

    async fn remove_all(&self, conn_id: &str, channels: &[String]) -> Result<(), BrokerError> {
        let mut map = self.channels();
        for channel in channels {
            Self::remove_locked(&mut map, channel, conn_id);
        }
        Ok(())
    }

    async fn list(&self, channel: &str) -> Result<Vec<Member>, BrokerError> {
        Ok(self
            .channels()
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default())
    }

    async fn refresh(&self, _members: &[(String, Member)]) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn restore(&self, members: &[(String, Member)]) -> Result<(), BrokerError> {
        for (channel, member) in members {
            self.add(channel, member).await?;
        }
        Ok(())
    }
}
