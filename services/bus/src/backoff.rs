//! The one retry delay of follow: exponential from `min` up to `max`, with jitter (backon's), and
//! reset after a success. Every retry loop waits with it, so a fleet that saw the same outage
//! does not retry in step when it ends.

use std::time::Duration;

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};

/// Delays that double from about `min` to at most `max`, each drawn at random from the upper
/// half of its step: `[d/2, d)` for a step `d`.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        // backon's jitter adds up to the step itself: steps of half the bounds.
        let builder = ExponentialBuilder::new()
            .with_min_delay(min / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay to wait now; the following one is about twice as long (up to `max`).
    pub fn delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Back to the shortest delay (after a success).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_its_bounds_with_jitter_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(1000));
        let seen: Vec<_> = (0..8).map(|_| b.delay()).collect();
        assert!(seen[0] >= ms(50) && seen[0] < ms(100), "{seen:?}");
        assert!(seen[1] >= ms(100) && seen[1] < ms(200), "{seen:?}");
        assert!(seen.iter().all(|d| *d <= ms(1000)), "{seen:?}");
        assert!(seen[7] >= ms(500), "capped at the top: {seen:?}");
        b.reset();
        assert!(b.delay() < ms(100));
        // Jitter: a fleet of backoffs does not wait in step.
        let firsts: std::collections::HashSet<_> = (0..20)
            .map(|_| Backoff::new(ms(100), ms(1000)).delay())
            .collect();
        assert!(firsts.len() > 10, "{firsts:?}");
    }
}
