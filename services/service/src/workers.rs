//! Background workers: named tasks on one tracker, stopped by the one shutdown token.
//!
//! * [`Workers::supervise`] restarts a worker whenever it ends before shutdown (a panic, or a
//!   return it should not make), after a growing pause: each start makes a fresh worker.
//! * [`Workers::once`] runs a worker that cannot be restarted (it owns something a restart
//!   could not rebuild). If it ends before shutdown it is recorded as down, and
//!   [`Workers::down`] makes the service's health say so: an operator sees it, nothing hides it.

use std::{
    collections::BTreeSet,
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use follow_bus::Backoff;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

#[derive(Debug, Clone)]
pub struct Workers {
    tracker: TaskTracker,
    cancel: CancellationToken,
    down: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl Workers {
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            cancel,
            down: Arc::default(),
        }
    }

    /// The shutdown token the workers stop on.
    pub fn cancel(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Runs `make()`'s future as worker `name` until shutdown, making and starting a new one
    /// each time it ends early.
    pub fn supervise<F, Fut>(&self, name: &'static str, mut make: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        let span = tracing::info_span!("worker", worker = name);
        self.tracker.spawn(
            async move {
                let mut pause = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
                loop {
                    let outcome = tokio::spawn(make().in_current_span()).await;
                    if cancel.is_cancelled() {
                        break;
                    }
                    match outcome {
                        Ok(()) => tracing::error!("worker stopped on its own; restarting"),
                        Err(e) => tracing::error!(error = %e, "worker panicked; restarting"),
                    }
                    tokio::select! {
                        () = cancel.cancelled() => break,
                        () = tokio::time::sleep(pause.delay()) => {}
                    }
                }
                tracing::debug!("worker stopped");
            }
            .instrument(span),
        );
    }

    /// Runs `work` as worker `name` once; if it ends before shutdown the worker is down.
    pub fn once<Fut>(&self, name: &'static str, work: Fut)
    where
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (cancel, down) = (self.cancel.clone(), Arc::clone(&self.down));
        let span = tracing::info_span!("worker", worker = name);
        self.tracker.spawn(
            async move {
                let outcome = tokio::spawn(work.in_current_span()).await;
                if cancel.is_cancelled() {
                    return;
                }
                match outcome {
                    Ok(()) => tracing::error!("worker stopped on its own; it cannot be restarted"),
                    Err(e) => {
                        tracing::error!(error = %e, "worker panicked; it cannot be restarted")
                    }
                }
                down.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(name);
            }
            .instrument(span),
        );
    }

    /// Workers that ended and were not restarted.
    pub fn down(&self) -> Vec<&'static str> {
        self.down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// Cancels and waits until every worker has stopped.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}
