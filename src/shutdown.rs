//! The two phases of a graceful shutdown, shared by the HTTP side and every connection.
//!
//! Draining comes first: `/readyz` turns 503 and new upgrades are refused, while existing clients
//! are still served, so the load balancer takes the node out of rotation before anyone is cut
//! off. Then `close_clients` is cancelled and every connection closes with 1001.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

#[derive(Debug, Default)]
pub struct Drain {
    draining: AtomicBool,
    /// Parent of every connection's close token.
    close_clients: CancellationToken,
}

impl Drain {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Closes every connection with 1001.
    pub fn close_clients(&self) {
        self.close_clients.cancel();
    }

    /// A token cancelled when clients are closed, for one connection (which may also cancel it
    /// on its own without affecting the others).
    pub fn connection_token(&self) -> CancellationToken {
        self.close_clients.child_token()
    }
}
