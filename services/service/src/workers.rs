//! Background workers: named tasks on one tracker, stopped by the one shutdown token.
//!
//! [`Workers::supervise`] restarts a worker whenever it ends before shutdown (a panic, or a
//! return it should not make), after a growing pause with jitter: each start makes a fresh
//! worker. A worker that ends early [`DOWN_AFTER`] times in a row, none of its runs lasting
//! [`STEADY`], is crash-looping: [`Workers::down`] names it, and the service's health says
//! `workers: down` until a run of it lasts [`STEADY`]. An operator sees it; nothing hides it.

use std::{
    collections::BTreeMap,
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

/// A run of a worker that lasts this long shows it works: its early ends are forgotten.
pub const STEADY: Duration = Duration::from_secs(30);
/// Early ends in a row after which a worker is reported down.
pub const DOWN_AFTER: u32 = 3;

#[derive(Debug, Clone)]
pub struct Workers {
    tracker: TaskTracker,
    cancel: CancellationToken,
    down: Down,
}

/// How many workers of each name are reported down (the consumers of a queue, one per
/// partition, share their name): a name is down while any of its workers is.
#[derive(Debug, Clone, Default)]
struct Down(Arc<Mutex<BTreeMap<&'static str, usize>>>);

impl Down {
    /// One worker of `name` is down or up again; `reported` is what it said last.
    fn report(&self, name: &'static str, reported: &mut bool, is_down: bool) {
        if *reported == is_down {
            return;
        }
        *reported = is_down;
        let mut down = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = down.entry(name).or_default();
        if is_down {
            *count += 1;
        } else {
            *count -= 1;
            if *count == 0 {
                down.remove(name);
            }
        }
    }

    fn names(&self) -> Vec<&'static str> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .copied()
            .collect()
    }
}

impl Workers {
    pub fn new(cancel: CancellationToken) -> Self {
        Self {
            tracker: TaskTracker::new(),
            cancel,
            down: Down::default(),
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
        let (cancel, down) = (self.cancel.clone(), self.down.clone());
        let mark = move |reported: &mut bool, is_down: bool| down.report(name, reported, is_down);
        let span = tracing::info_span!("worker", worker = name);
        self.tracker.spawn(
            async move {
                let mut pause = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
                let (mut early_ends, mut reported) = (0, false);
                loop {
                    let mut run = tokio::spawn(make().in_current_span());
                    let outcome = tokio::select! {
                        outcome = &mut run => outcome,
                        () = tokio::time::sleep(STEADY) => {
                            early_ends = 0;
                            pause.reset();
                            mark(&mut reported, false);
                            run.await
                        }
                    };
                    if cancel.is_cancelled() {
                        break;
                    }
                    match outcome {
                        Ok(()) => tracing::error!("worker stopped on its own; restarting"),
                        Err(e) => tracing::error!(error = %e, "worker panicked; restarting"),
                    }
                    early_ends += 1;
                    if early_ends >= DOWN_AFTER {
                        tracing::error!(early_ends, "worker keeps failing: reported down");
                        mark(&mut reported, true);
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

    /// A consumer of `config.queue` on each of its partitions, each feeding a clone of `handler`
    /// and made afresh on every (re)start: after a panic the new one re-reads what the old one
    /// left pending.
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
        for partition in valkey.partitions().all() {
            let (valkey, cancel, config) =
                (valkey.clone(), self.cancel.clone(), config.on(partition));
            let (handler, stats) = (handler.clone(), Arc::clone(&stats));
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
    }

    /// Trims `queue`'s streams below what its group has not acknowledged, every 30 s.
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

    /// Workers that keep failing (see the module's doc).
    pub fn down(&self) -> Vec<&'static str> {
        self.down.names()
    }

    /// Cancels and waits until every worker has stopped.
    pub async fn stop(&self) {
        self.cancel.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_name_is_down_while_any_of_its_workers_is() {
        let down = Down::default();
        let (mut first, mut second, mut trimmer) = (false, false, false);
        down.report("consumer", &mut first, true);
        down.report("consumer", &mut second, true);
        down.report("consumer", &mut second, false);
        // A worker that was never down changes nothing when it runs steadily.
        down.report("trimmer", &mut trimmer, false);
        down.report("consumer", &mut second, false);
        assert_eq!(down.names(), ["consumer"]);
        down.report("consumer", &mut first, false);
        assert!(down.names().is_empty());
    }
}
