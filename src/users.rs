//! This node's authenticated connections by user, for the backend's `__control` disconnect.
//!
//! Touched only when a connection with a user opens or closes and when a control message
//! arrives, never per message. Sharded by user hash so connects of unrelated users rarely meet
//! on one lock; a lock is held only for a map update or to collect the outboxes to close.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::conn::{CloseReason, Outbox};
use crate::hub::channel_slot;

const SHARDS: usize = 32;

type Shard = Mutex<HashMap<String, HashMap<u64, Arc<Outbox>>>>;

/// User id -> that user's open connections on this node.
#[derive(Debug)]
pub struct Users {
    shards: Box<[Shard]>,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl Users {
    fn shard(
        &self,
        user: &str,
    ) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u64, Arc<Outbox>>>> {
        self.shards[channel_slot(user, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection of `user`.
    pub fn insert(&self, user: &str, outbox: &Arc<Outbox>) {
        self.shard(user)
            .entry(user.to_owned())
            .or_default()
            .insert(outbox.key, outbox.clone());
    }

    /// Forgets a closed connection of `user`.
    pub fn remove(&self, user: &str, key: u64) {
        let mut shard = self.shard(user);
        if let Some(conns) = shard.get_mut(user) {
            conns.remove(&key);
            if conns.is_empty() {
                shard.remove(user);
            }
        }
    }

    /// Starts closing every connection of `user` with `reason`; returns how many.
    pub fn close_all(&self, user: &str, reason: CloseReason) -> usize {
        let outboxes: Vec<Arc<Outbox>> = match self.shard(user).get(user) {
            Some(conns) => conns.values().cloned().collect(),
            None => return 0,
        };
        for outbox in &outboxes {
            outbox.close(reason.clone());
        }
        outboxes.len()
    }
}
