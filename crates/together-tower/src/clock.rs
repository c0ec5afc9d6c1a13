//! A governor [`Clock`] that reads tokio's clock, so paused tokio time drives the limiter.

use std::time::Duration;

use governor::clock::Clock;
use governor::nanos::Nanos;
use tokio::time::Instant;

/// Time since a fixed start, read from tokio's clock.
///
/// Under `tokio::time::pause()` this clock stands still and jumps with `tokio::time::advance`
/// and auto-advance, so tests of waiting finish at once and measure exact virtual time.
/// Outside a runtime it reads the system's monotonic clock, as tokio does.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: Instant,
}

impl TokioClock {
    /// A clock that counts from now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }

    /// Time since the clock's start.
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.start)
    }

    /// The tokio instant at a reading of this clock, for `sleep_until`. A reading too far
    /// ahead to represent (a "wait forever" deadline) becomes about thirty years from now.
    pub fn instant_at(&self, reading: Duration) -> Instant {
        const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);
        self.start
            .checked_add(reading)
            .unwrap_or_else(|| Instant::now() + FAR_FUTURE)
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.elapsed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_paused_tokio_time() {
        let clock = TokioClock::new();
        assert_eq!(clock.now(), Nanos::from(0u64));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(Duration::from(clock.now()), Duration::from_millis(1_500));
        assert_eq!(
            clock.instant_at(Duration::from_millis(1_500)),
            Instant::now()
        );
    }
}
