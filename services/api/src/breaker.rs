//! A circuit breaker in front of Valkey writes that route creation depends on.
//!
//! After `threshold` consecutive failures it opens: calls fail at once (no 2 s timeout per
//! request while Valkey is down). After `cool_down` one call is let through as a probe; its
//! success closes the breaker, its failure opens it again.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

#[derive(Debug)]
pub struct CircuitBreaker {
    threshold: u32,
    cool_down: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One probe is in flight; others fail fast until it reports.
    HalfOpen,
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// Whether a call may go ahead now. A `true` must be followed by [`Self::record`].
    pub fn allow(&self) -> bool {
        let mut state = self.lock();
        match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        }
    }

    pub fn record(&self, success: bool) {
        let mut state = self.lock();
        *state = match (*state, success) {
            (_, true) => State::Closed { failures: 0 },
            (State::Closed { failures }, false) if failures + 1 < self.threshold => State::Closed {
                failures: failures + 1,
            },
            (_, false) => State::Open {
                until: Instant::now() + self.cool_down,
            },
        };
    }

    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is a plain value: a panic elsewhere cannot leave it half-written.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_probes_after_cool_down_and_closes_on_success() {
        let b = CircuitBreaker::new(3, Duration::ZERO);
        for _ in 0..2 {
            assert!(b.allow());
            b.record(false);
        }
        assert!(!b.is_open());
        assert!(b.allow());
        b.record(false);
        assert!(b.is_open());
        // cool-down of zero: the next call is the probe, and only one probe at a time.
        assert!(b.allow());
        assert!(!b.allow());
        b.record(false);
        assert!(b.allow());
        b.record(true);
        assert!(!b.is_open());
        assert!(b.allow() && b.allow());
    }

    #[test]
    fn stays_open_during_cool_down() {
        let b = CircuitBreaker::new(1, Duration::from_secs(3600));
        assert!(b.allow());
        b.record(false);
        assert!(!b.allow());
        assert!(b.is_open());
    }
}
