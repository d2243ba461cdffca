//! A circuit breaker in front of Valkey calls the RPCs depend on.
//!
//! After `threshold` consecutive failures it opens: calls fail at once (no timeout per request
//! while Valkey is down). After `cool_down` one call is let through as a probe; its success
//! closes the breaker, its failure opens it again. Every call that is let through holds a
//! [`Call`] that records its outcome — and records a failure if it is dropped without one (the
//! RPC was cancelled mid-call), so the breaker can never stay half-open.

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

/// A call the breaker let through; its outcome is recorded once, on [`Call::record`] or drop.
#[derive(Debug)]
#[must_use = "a call records its outcome"]
pub struct Call<'a> {
    breaker: &'a CircuitBreaker,
    recorded: bool,
}

impl Call<'_> {
    pub fn record(mut self, success: bool) {
        self.recorded = true;
        self.breaker.record(success);
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            // Cancelled before it knew: count it as a failure, which reopens (and so later
            // re-probes) instead of leaving a probe in flight forever.
            self.breaker.record(false);
        }
    }
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            cool_down,
            state: Mutex::new(State::Closed { failures: 0 }),
        }
    }

    /// A call may go ahead now (`Some`), or the breaker is open (`None`).
    pub fn try_call(&self) -> Option<Call<'_>> {
        let mut state = self.lock();
        let allowed = match *state {
            State::Closed { .. } => true,
            State::Open { until } if Instant::now() >= until => {
                *state = State::HalfOpen;
                true
            }
            State::Open { .. } | State::HalfOpen => false,
        };
        drop(state);
        if allowed {
            Some(Call {
                breaker: self,
                recorded: false,
            })
        } else {
            None
        }
    }

    fn record(&self, success: bool) {
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

    fn fail(b: &CircuitBreaker) {
        b.try_call().expect("allowed").record(false);
    }

    #[test]
    fn opens_after_threshold_probes_after_cool_down_and_closes_on_success() {
        let b = CircuitBreaker::new(3, Duration::ZERO);
        fail(&b);
        fail(&b);
        assert!(!b.is_open());
        fail(&b);
        assert!(b.is_open());
        // cool-down of zero: the next call is the probe, and only one probe at a time.
        let probe = b.try_call().expect("the probe");
        assert!(b.try_call().is_none());
        probe.record(false);
        b.try_call().expect("the next probe").record(true);
        assert!(!b.is_open());
        assert!(b.try_call().is_some() && b.try_call().is_some());
    }

    #[test]
    fn stays_open_during_cool_down() {
        let b = CircuitBreaker::new(1, Duration::from_secs(3600));
        fail(&b);
        assert!(b.try_call().is_none());
        assert!(b.is_open());
    }

    #[test]
    fn a_probe_cancelled_before_it_records_never_leaves_it_half_open() {
        let b = CircuitBreaker::new(1, Duration::ZERO);
        fail(&b);
        let probe = b.try_call().expect("the probe");
        drop(probe); // the RPC was cancelled while Valkey was slow
        // Open again, cool-down over: another probe goes through and can close it.
        b.try_call().expect("a new probe").record(true);
        assert!(!b.is_open());
    }
}
