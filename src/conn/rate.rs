//! The per-connection message rate: a token bucket plus the flood detector.
//!
//! Every complete data message counts (text or binary, valid or not); control frames do not. A
//! message the bucket has no token for is answered `rate_limited` and not executed. A client that
//! keeps sending more than twice the limit in each of 5 consecutive one-second windows is not
//! merely over budget but flooding, and is closed with 1008.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Consecutive flooded seconds that close the connection.
const FLOOD_SECONDS: u32 = 5;

/// What to do with one incoming data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Execute it.
    Allow,
    /// Answer `rate_limited`; `first` is true the first time for this connection (log it once).
    Limited { first: bool },
    /// Close the connection as a flood.
    Flood,
}

/// Rate state of one connection; `None` inside when the limit is 0 (unlimited).
pub struct MessageRate {
    inner: Option<Limited>,
}

struct Limited {
    bucket: DefaultDirectRateLimiter,
    /// More than this many messages in one second is a flooded second.
    flood_threshold: u64,
    window_start: Instant,
    in_window: u64,
    /// Flooded seconds in a row, the current window excluded.
    flooded_seconds: u32,
    warned: bool,
}

impl MessageRate {
    /// `limit` messages per second with a bucket of `burst`; `limit == 0` means unlimited.
    pub fn new(limit: u32, burst: u32) -> MessageRate {
        let inner = NonZeroU32::new(limit).map(|per_second| {
            let burst = NonZeroU32::new(burst).unwrap_or(per_second);
            Limited {
                bucket: RateLimiter::direct(Quota::per_second(per_second).allow_burst(burst)),
                flood_threshold: 2 * u64::from(limit),
                window_start: Instant::now(),
                in_window: 0,
                flooded_seconds: 0,
                warned: false,
            }
        });
        MessageRate { inner }
    }

    /// Counts one data message and decides its fate.
    pub fn check(&mut self) -> Verdict {
        let Some(l) = self.inner.as_mut() else {
            return Verdict::Allow;
        };
        let now = Instant::now();
        let elapsed = now.duration_since(l.window_start);
        if elapsed >= Duration::from_secs(1) {
            // A gap of a whole silent second breaks the run.
            if l.in_window > l.flood_threshold && elapsed < Duration::from_secs(2) {
                l.flooded_seconds += 1;
            } else {
                l.flooded_seconds = 0;
            }
            let whole = Duration::from_secs(elapsed.as_secs());
            l.window_start += whole;
            l.in_window = 0;
        }
        l.in_window += 1;
        if l.in_window > l.flood_threshold && l.flooded_seconds + 1 >= FLOOD_SECONDS {
            return Verdict::Flood;
        }
        match l.bucket.check() {
            Ok(()) => Verdict::Allow,
            Err(_) => {
                let first = !l.warned;
                l.warned = true;
                Verdict::Limited { first }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_allows_everything() {
        let mut rate = MessageRate::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(rate.check(), Verdict::Allow);
        }
    }

    #[test]
    fn the_burst_passes_then_messages_are_limited() {
        let mut rate = MessageRate::new(10, 20);
        for i in 0..20 {
            assert_eq!(rate.check(), Verdict::Allow, "message {i}");
        }
        assert_eq!(rate.check(), Verdict::Limited { first: true });
        assert_eq!(rate.check(), Verdict::Limited { first: false });
    }

    #[test]
    fn a_silent_gap_resets_the_flood_run() {
        let mut rate = MessageRate::new(1, 1);
        let l = rate.inner.as_mut().unwrap();
        l.flooded_seconds = 3;
        l.in_window = 100;
        // Three seconds later: the last window was flooded but a gap followed.
        l.window_start = Instant::now() - Duration::from_secs(3);
        rate.check();
        assert_eq!(rate.inner.as_ref().unwrap().flooded_seconds, 0);
    }
}
