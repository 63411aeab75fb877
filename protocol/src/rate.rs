//! A token bucket for data-rate limits, free of IO: it says how long to wait,
//! the caller sleeps (both ends throttle with it: the agent before sending,
//! the receiver before reading more from a data stream, so QUIC flow control
//! slows the senders down).

use std::time::{Duration, Instant};

/// Refills at `rate` bytes per second, holds at most a quarter second's worth
/// (the burst), and may go into debt: a `take` larger than the tokens left is
/// allowed at once and paid for by the wait it returns.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket of `bytes_per_sec` (at least 1), empty at `now`.
    pub fn new(bytes_per_sec: u64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: bytes_per_sec.max(1) as f64,
            tokens: 0.0,
            last: now,
        }
    }

    /// The rate, in bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Changes the rate from now on (debt already owed is kept).
    pub fn set_rate(&mut self, bytes_per_sec: u64, now: Instant) {
        self.refill(now);
        self.rate = bytes_per_sec.max(1) as f64;
        self.tokens = self.tokens.min(self.burst());
    }

    fn burst(&self) -> f64 {
        self.rate / 4.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst());
        self.last = self.last.max(now);
    }

    /// Takes `n` bytes at `now`; returns how long to wait before they may go
    /// (zero if the bucket held them).
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a sender taking `chunk` bytes at a time for `secs` of
    /// simulated time, sleeping as told; returns the achieved rate.
    fn achieved(rate: u64, chunk: u64, secs: f64) -> f64 {
        let t0 = Instant::now();
        let mut now = t0;
        let mut b = TokenBucket::new(rate, now);
        let mut sent = 0u64;
        while now.duration_since(t0).as_secs_f64() < secs {
            now += b.take(chunk, now);
            sent += chunk;
        }
        sent as f64 / now.duration_since(t0).as_secs_f64()
    }

    #[test]
    fn long_run_rate_matches_the_limit() {
        for (rate, chunk) in [
            (10 << 20, 64 << 10),
            (50 << 20, 256 << 10),
            (200 << 20, 1 << 20),
            (1000, 4096),
        ] {
            let got = achieved(rate, chunk, 30.0);
            let err = (got - rate as f64).abs() / rate as f64;
            assert!(
                err < 0.02,
                "rate {rate}, chunk {chunk}: achieved {got:.0} ({err:.3})"
            );
        }
    }

    #[test]
    fn idle_time_buys_at_most_the_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        // An hour idle, then 1 MiB: only a quarter second was saved up.
        let wait = b.take(1 << 20, t0 + Duration::from_secs(3600));
        assert!((wait.as_secs_f64() - 0.75).abs() < 1e-6, "waited {wait:?}");
    }

    #[test]
    fn set_rate_applies_from_now_and_clock_going_back_is_harmless() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1 << 20, t0);
        assert_eq!(b.take(1 << 20, t0), Duration::from_secs(1));
        b.set_rate(2 << 20, t0);
        assert_eq!(b.rate(), 2 << 20);
        // The 1 MiB debt is now paid at 2 MiB/s, plus 1 MiB more.
        assert_eq!(b.take(1 << 20, t0), Duration::from_secs(1));
        // A `now` earlier than the last one refills nothing and does not panic.
        let _ = b.take(1, t0.checked_sub(Duration::from_secs(1)).unwrap_or(t0));
        assert_eq!(TokenBucket::new(0, t0).rate(), 1);
    }
}
