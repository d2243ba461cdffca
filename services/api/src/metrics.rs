//! Prometheus metrics of the API (`GET /metrics`): what an operator needs to see the result
//! pipeline keep up (lag, pending, apply latency, dead letters), errors by code, and watchers.

use std::sync::{Arc, atomic::Ordering};

use follow_bus::{ConsumerStats, HubStats};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub rpc_errors: Family<Labels, Counter>,
    pub results: Family<Labels, Counter>,
    pub apply_seconds: Histogram,
    pub watchers: Gauge,
    watchers_lagged: Counter,
    hub_channels: Gauge,
    pub expired: Counter,
    consumer_pending: Gauge,
    consumer_lag: Gauge,
    handled: Counter,
    dead_lettered: Counter,
    retried: Counter,
    reclaimed: Counter,
}

/// What the result stream's group reports at scrape time.
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupSample {
    pub pending: u64,
    pub lag: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("follow_api");
        let m = Self {
            rpc_errors: Family::default(),
            results: Family::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watchers: Gauge::default(),
            watchers_lagged: Counter::default(),
            hub_channels: Gauge::default(),
            expired: Counter::default(),
            consumer_pending: Gauge::default(),
            consumer_lag: Gauge::default(),
            handled: Counter::default(),
            dead_lettered: Counter::default(),
            retried: Counter::default(),
            reclaimed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "rpc_errors",
            "RPCs that ended in an error, by method and gRPC code",
            m.rpc_errors.clone(),
        );
        registry.register(
            "results_applied",
            "image:result entries applied, by outcome (processed, failed, ignored, refused)",
            m.results.clone(),
        );
        registry.register(
            "result_apply_seconds",
            "time to apply one batch of results in one transaction",
            m.apply_seconds.clone(),
        );
        registry.register(
            "watchers_active",
            "open WatchImageStatus streams",
            m.watchers.clone(),
        );
        registry.register(
            "watchers_lagged",
            "WatchImageStatus streams dropped because the client fell too far behind",
            m.watchers_lagged.clone(),
        );
        registry.register(
            "hub_channels",
            "image progress channels this instance subscribes to (images watched here)",
            m.hub_channels.clone(),
        );
        registry.register(
            "images_expired",
            "pending images expired because their upload token ran out",
            m.expired.clone(),
        );
        registry.register(
            "consumer_pending",
            "entries delivered to api-workers and not acknowledged yet",
            m.consumer_pending.clone(),
        );
        registry.register(
            "consumer_lag",
            "entries of image:result not yet delivered to api-workers",
            m.consumer_lag.clone(),
        );
        registry.register(
            "consumer_handled",
            "entries this instance handed to the applier",
            m.handled.clone(),
        );
        registry.register(
            "consumer_dead_lettered",
            "entries this instance moved to image:result:dead",
            m.dead_lettered.clone(),
        );
        registry.register(
            "consumer_retried",
            "batches retried after a transient error",
            m.retried.clone(),
        );
        registry.register(
            "consumer_reclaimed",
            "entries taken over from idle consumers",
            m.reclaimed.clone(),
        );
        Self { registry, ..m }
    }

    pub fn rpc_error(&self, method: &'static str, code: tonic::Code) {
        self.rpc_errors
            .get_or_create(&vec![
                ("method", method.to_owned()),
                ("code", format!("{code:?}")),
            ])
            .inc();
    }

    pub fn result(&self, outcome: &'static str) {
        self.results
            .get_or_create(&vec![("outcome", outcome.to_owned())])
            .inc();
    }

    /// The text exposition, with the consumer's and the hub's counters and the group sample as
    /// of now.
    pub fn render(
        &self,
        consumer: Option<&Arc<ConsumerStats>>,
        hub: Option<&HubStats>,
        group: Option<GroupSample>,
    ) -> String {
        if let Some(hub) = hub {
            self.watchers_lagged
                .inner()
                .store(hub.lagged.load(Ordering::Relaxed), Ordering::Relaxed);
            self.hub_channels
                .set(i64::try_from(hub.channels.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        }
        if let Some(stats) = consumer {
            for (counter, value) in [
                (&self.handled, &stats.handled),
                (&self.dead_lettered, &stats.dead_lettered),
                (&self.retried, &stats.retried),
                (&self.reclaimed, &stats.reclaimed),
            ] {
                counter
                    .inner()
                    .store(value.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        if let Some(g) = group {
            self.consumer_pending
                .set(i64::try_from(g.pending).unwrap_or(i64::MAX));
            self.consumer_lag
                .set(i64::try_from(g.lag).unwrap_or(i64::MAX));
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}
