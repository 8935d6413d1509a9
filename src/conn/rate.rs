//! The per-connection message rate: a token bucket plus the flood detector.
//!
//! Every complete data message counts (text or binary, valid or not); control frames do not. A
//! message the bucket has no token for is answered `rate_limited` and not executed. A client that
//! keeps sending more than twice the limit in each of 5 consecutive one-second windows is not
//! merely over budget but flooding, and is closed with 1008.

use std::time::{Duration, Instant};

/// Consecutive flooded seconds that close the connection.
const FLOOD_SECONDS: u8 = 5;

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
///
/// The bucket is GCRA (the generic cell rate algorithm, as governor implements it) on one
/// instant, so every connection's task holds 48 bytes for it rather than a rate limiter's 112.
pub struct MessageRate {
    inner: Option<Limited>,
}

struct Limited {
    /// When the bucket is full again: a message may come `(burst - 1) / limit` seconds before
    /// it, and each message allowed moves it `1 / limit` seconds later.
    full_at: Instant,
    window_start: Instant,
    /// Messages per second (not 0).
    limit: u32,
    /// Messages allowed at once (not 0).
    burst: u32,
    in_window: u32,
    /// Flooded seconds in a row, the current window excluded.
    flooded_seconds: u8,
    warned: bool,
}

impl MessageRate {
    /// `limit` messages per second with a bucket of `burst` (0: `limit`); `limit == 0` means
    /// unlimited.
    pub fn new(limit: u32, burst: u32) -> MessageRate {
        let now = Instant::now();
        let inner = (limit > 0).then_some(Limited {
            full_at: now,
            window_start: now,
            limit,
            burst: if burst == 0 { limit } else { burst },
            in_window: 0,
            flooded_seconds: 0,
            warned: false,
        });
        MessageRate { inner }
    }

    /// Counts one data message and decides its fate.
    pub fn check(&mut self) -> Verdict {
        let Some(l) = self.inner.as_mut() else {
            return Verdict::Allow;
        };
        let now = Instant::now();
        // More than twice the limit in one second is a flooded second.
        let flood_threshold = 2 * u64::from(l.limit);
        let elapsed = now.duration_since(l.window_start);
        if elapsed >= Duration::from_secs(1) {
            // A gap of a whole silent second breaks the run.
            if u64::from(l.in_window) > flood_threshold && elapsed < Duration::from_secs(2) {
                l.flooded_seconds = l.flooded_seconds.saturating_add(1);
            } else {
                l.flooded_seconds = 0;
            }
            let whole = Duration::from_secs(elapsed.as_secs());
            l.window_start += whole;
            l.in_window = 0;
        }
        l.in_window = l.in_window.saturating_add(1);
        if u64::from(l.in_window) > flood_threshold && l.flooded_seconds + 1 >= FLOOD_SECONDS {
            return Verdict::Flood;
        }
        let interval = Duration::from_secs(1) / l.limit;
        let full_at = l.full_at.max(now);
        if full_at.duration_since(now) > interval * (l.burst - 1) {
            let first = !l.warned;
            l.warned = true;
            return Verdict::Limited { first };
        }
        l.full_at = full_at + interval;
        Verdict::Allow
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
    fn a_message_comes_back_every_tenth_of_a_second_at_10_per_second() {
        let mut rate = MessageRate::new(10, 2);
        assert_eq!(rate.check(), Verdict::Allow);
        assert_eq!(rate.check(), Verdict::Allow);
        assert_eq!(rate.check(), Verdict::Limited { first: true });
        // 100 ms later (the bucket's clock moved back instead of waiting): one more message.
        let l = rate.inner.as_mut().unwrap();
        l.full_at -= Duration::from_millis(100);
        assert_eq!(rate.check(), Verdict::Allow);
        assert_eq!(rate.check(), Verdict::Limited { first: false });
        // A long silence fills the bucket up to the burst, not beyond.
        let l = rate.inner.as_mut().unwrap();
        l.full_at -= Duration::from_secs(60);
        assert_eq!(rate.check(), Verdict::Allow);
        assert_eq!(rate.check(), Verdict::Allow);
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
