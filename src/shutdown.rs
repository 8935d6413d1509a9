//! The two phases of a graceful shutdown, shared by the HTTP side and every connection.
//!
//! Draining comes first: `/readyz` turns 503 and new upgrades are refused, while existing clients
//! are still served, so the load balancer takes the node out of rotation before anyone is cut
//! off. Then [`Drain::close_clients`] closes every connection with 1001.
//!
//! Connections are found through a registry sharded by connection key, touched once when a
//! connection opens and once when it closes. A cancellation token per connection would do the
//! same, but its state sits behind a mutex that every writer wake-up would take, and every
//! child token registers under the parent's single mutex.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::wire::{CloseReason, Outbox};

const SHARDS: usize = 64;

type Shard = Mutex<HashMap<u64, Weak<Outbox>>>;

#[derive(Debug)]
pub struct Drain {
    draining: AtomicBool,
    /// Set before the registry is swept, so a connection registering during the sweep closes
    /// itself.
    closing: AtomicBool,
    connections: Box<[Shard]>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            connections: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }
}

impl Drain {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Closes every open connection with 1001.
    pub fn close_clients(&self) {
        self.closing.store(true, Ordering::SeqCst);
        for shard in self.connections.iter() {
            for outbox in lock(shard).values().filter_map(Weak::upgrade) {
                outbox.close(CloseReason::Shutdown);
            }
        }
    }

    /// Adds an open connection; it is closed at once if clients are already being closed.
    pub fn register(&self, outbox: &Arc<Outbox>) {
        lock(self.shard(outbox.key)).insert(outbox.key, Arc::downgrade(outbox));
        if self.closing.load(Ordering::SeqCst) {
            outbox.close(CloseReason::Shutdown);
        }
    }

    /// Bytes queued for every open connection and not yet accepted by their sockets, summed at
    /// the metrics scrape (a node-wide counter updated per push would be one contended cache
    /// line on the fan-out path).
    pub fn queued_bytes(&self) -> usize {
        self.connections
            .iter()
            .map(|shard| {
                lock(shard)
                    .values()
                    .filter_map(Weak::upgrade)
                    .map(|o| o.queued_bytes())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Removes a closed connection.
    pub fn unregister(&self, key: u64) {
        lock(self.shard(key)).remove(&key);
    }

    fn shard(&self, key: u64) -> &Shard {
        &self.connections[key as usize % SHARDS]
    }
}

// A poisoned lock means a panic during a single insert or remove; the map is still whole.
fn lock(shard: &Shard) -> MutexGuard<'_, HashMap<u64, Weak<Outbox>>> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}
