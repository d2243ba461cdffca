//! The one retry delay of follow: doubling from `min` up to `max`, reset after a success.

use std::time::Duration;

/// Doubling delays between `min` and `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// The delay to wait now; the following one doubles (up to `max`).
    pub fn delay(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(35));
        let seen: Vec<_> = (0..4).map(|_| b.delay()).collect();
        assert_eq!(seen, [ms(10), ms(20), ms(35), ms(35)]);
        b.reset();
        assert_eq!(b.delay(), ms(10));
    }
}
