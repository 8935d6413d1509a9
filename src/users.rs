//! This node's authenticated connections by user, for the backend's `__control` disconnect.
//!
//! Touched only when a connection with a user opens or closes and when a control message
//! arrives, never per message. Sharded by user hash so connects of unrelated users rarely meet
//! on one lock; a lock is held only for a map update or to collect the outboxes to close.
//!
//! A token is checked at the upgrade and the connection registers here a moment later, once the
//! WebSocket is up. A disconnect that arrives in between must not miss it, so each shard also
//! remembers when each user was last disconnected (for [`RECENT`]): a connection whose token
//! was verified before that moment is closed as it registers. Both happen under the shard's
//! lock, so a disconnect either finds the connection registered or is found by it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::shard;
use crate::wire::{CloseReason, Outbox};

const SHARDS: usize = 32;

/// How long a disconnect is remembered. Far longer than an upgrade takes from the token check
/// to registration; a connection that took longer than this is closed at registration, since
/// no remembered disconnect can clear it (fail closed).
pub const RECENT: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Shard {
    conns: HashMap<String, HashMap<u64, Arc<Outbox>>>,
    /// User -> when a disconnect for it last arrived; entries older than [`RECENT`] are pruned
    /// whenever a disconnect arrives in the shard.
    disconnected: HashMap<String, Instant>,
}

/// User id -> that user's open connections on this node.
#[derive(Debug)]
pub struct Users {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Users {
    fn default() -> Self {
        Users {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl Users {
    fn shard(&self, user: &str) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[shard::index(user, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Records a connection of `user` whose token was verified at `verified_at`. If a disconnect
    /// for `user` arrived since then, the connection is closed (`Disconnected`) and `true` is
    /// returned; it is recorded either way, so [`Users::remove`] stays symmetric.
    pub fn insert(&self, user: &str, outbox: &Arc<Outbox>, verified_at: Instant) -> bool {
        let mut shard = self.shard(user);
        shard
            .conns
            .entry(user.to_owned())
            .or_default()
            .insert(outbox.key, outbox.clone());
        let revoked = verified_at.elapsed() > RECENT
            || shard
                .disconnected
                .get(user)
                .is_some_and(|at| *at >= verified_at);
        drop(shard);
        if revoked {
            outbox.close(CloseReason::Disconnected);
        }
        revoked
    }

    /// Forgets a closed connection of `user`.
    pub fn remove(&self, user: &str, key: u64) {
        let mut shard = self.shard(user);
        if let Some(conns) = shard.conns.get_mut(user) {
            conns.remove(&key);
            if conns.is_empty() {
                shard.conns.remove(user);
            }
        }
    }

    /// Starts closing every connection of `user` with `reason`, and remembers the moment so a
    /// connection verified before it and registering after it is closed too; returns how many
    /// connections were open.
    pub fn close_all(&self, user: &str, reason: CloseReason) -> usize {
        let outboxes: Vec<Arc<Outbox>> = {
            let mut shard = self.shard(user);
            let now = Instant::now();
            shard
                .disconnected
                .retain(|_, at| now.duration_since(*at) <= RECENT);
            shard.disconnected.insert(user.to_owned(), now);
            match shard.conns.get(user) {
                Some(conns) => conns.values().cloned().collect(),
                None => return 0,
            }
        };
        for outbox in &outboxes {
            outbox.close(reason.clone());
        }
        outboxes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Member;

    fn outbox(key: u64) -> Arc<Outbox> {
        let member = Member {
            conn_id: format!("c{key}"),
            node: "n".into(),
            user: Some("alice".into()),
            info: None,
        };
        Arc::new(Outbox::new(
            key,
            member,
            crate::wire::Budget {
                frames: 1,
                bytes: usize::MAX,
            },
        ))
    }

    /// The race of the review: token checked, then the disconnect, then the registration.
    #[test]
    fn a_disconnect_between_token_check_and_registration_closes_the_connection() {
        let users = Users::default();
        let checked_before = Instant::now();
        assert_eq!(users.close_all("alice", CloseReason::Disconnected), 0);
        let late = outbox(1);
        assert!(users.insert("alice", &late, checked_before));
        assert_eq!(late.close_reason(), CloseReason::Disconnected);
        // A token checked after the disconnect is a new login: it stays open.
        let fresh = outbox(2);
        assert!(!users.insert("alice", &fresh, Instant::now()));
        assert!(!fresh.is_closing());
        // Other users are not affected.
        let bob = outbox(3);
        assert!(!users.insert("bob", &bob, checked_before));
        assert!(!bob.is_closing());
    }
}
