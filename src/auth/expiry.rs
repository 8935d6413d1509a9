//! Closes a connection at its token's `exp` (no leeway) unless a refresh moved it.
//!
//! One small task per authenticated connection sleeps until the current expiry; a refresh
//! publishes the new `exp` on a watch channel, which re-arms the sleep (earlier or later). The
//! task ends when the connection starts closing or its session drops the sender. It lives outside
//! the writer so the send path stays untouched.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::wire::{CloseReason, Outbox};

/// Starts the expiry timer of a connection; send a new `exp` (unix seconds) to re-arm it.
pub fn watch(outbox: Arc<Outbox>, exp: u64) -> watch::Sender<u64> {
    let (tx, rx) = watch::channel(exp);
    tokio::spawn(run(outbox, rx));
    tx
}

async fn run(outbox: Arc<Outbox>, mut exp: watch::Receiver<u64>) {
    loop {
        let at = *exp.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(until(at)) => {
                // Re-check: a refresh may have landed just as the sleep ended.
                if *exp.borrow() == at {
                    outbox.close(CloseReason::TokenExpired);
                    return;
                }
            }
            changed = exp.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = outbox.closing() => return,
        }
    }
}

/// Time left until unix second `exp` (zero when it is past; "forever" for an `exp` beyond what
/// the clock can represent, which must not panic: the token is signed, but still input).
pub fn until(exp: u64) -> Duration {
    match UNIX_EPOCH.checked_add(Duration::from_secs(exp)) {
        Some(at) => at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
        None => Duration::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_exp_gives_a_duration() {
        assert_eq!(until(0), Duration::ZERO);
        assert_eq!(until(u64::MAX), Duration::MAX);
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 10;
        let left = until(soon);
        assert!(left > Duration::from_secs(8) && left <= Duration::from_secs(10));
    }
}
