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

use follow_bus::{
    Backoff, Consumer, ConsumerConfig, ConsumerStats, Handler, Hub, StreamMessage, Trimmer, Valkey,
    keys::Queue,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::server::HealthReporter;

use crate::health::Probe;
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

    /// A consumer of `config.queue` feeding `handler`, made afresh on every (re)start: after a
    /// panic the new one re-reads what the old one left pending.
    pub fn consume<M, H>(
        &self,
        name: &'static str,
        valkey: &Valkey,
        config: ConsumerConfig,
        stats: Arc<ConsumerStats>,
        handler: H,
    ) where
        M: StreamMessage + Clone + Send + Sync + 'static,
        H: Handler<M> + Clone + 'static,
    {
        let (valkey, cancel) = (valkey.clone(), self.cancel.clone());
        self.supervise(name, move || {
            let consumer = Consumer::<M>::new(&valkey, config.clone());
            let (mut handler, stats, cancel) =
                (handler.clone(), Arc::clone(&stats), cancel.clone());
            async move {
                match consumer {
                    Ok(consumer) => {
                        Box::pin(consumer.with_stats(stats).run(&mut handler, cancel)).await;
                    }
                    Err(e) => tracing::error!(error = %e, "cannot create the consumer"),
                }
            }
        });
    }

    /// Trims `queue`'s stream below what its group has not acknowledged, every 30 s.
    pub fn trim(&self, name: &'static str, valkey: &Valkey, queue: Queue) {
        let (valkey, cancel) = (valkey.clone(), self.cancel.clone());
        self.supervise(name, move || {
            let (trimmer, cancel) = (Trimmer::new(&valkey, queue), cancel.clone());
            async move {
                match trimmer {
                    Ok(t) => t.run(Duration::from_secs(30), cancel).await,
                    Err(e) => tracing::error!(error = %e, "cannot create the trimmer"),
                }
            }
        });
    }

    /// The progress hub's worker (a new one resubscribes and resyncs every watcher).
    pub fn hub(&self, hub: &Arc<Hub>) {
        let (hub, cancel) = (Arc::clone(hub), self.cancel.clone());
        self.supervise("progress-hub", move || hub.worker(cancel.clone()));
    }

    /// Keeps `grpc.health.v1` in step with `probe`, checked every 2 s.
    pub fn report_health<P: Probe>(
        &self,
        probe: P,
        reporter: HealthReporter,
        services: &'static [&'static str],
    ) {
        let cancel = self.cancel.clone();
        self.supervise("health-reporter", move || {
            crate::health::report(
                probe.clone(),
                reporter.clone(),
                services,
                Duration::from_secs(2),
                cancel.clone(),
            )
        });
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
