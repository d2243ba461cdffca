//! Prometheus metrics of the API (`GET /metrics`): what an operator needs to see the result
//! pipeline keep up (lag, pending, apply latency, dead letters), the reconciler, errors by code,
//! and watchers.

use std::sync::{Arc, atomic::Ordering};

use follow_bus::{ConsumerStats, HubStats, QueueInfo};
use follow_service::metrics::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcErrorLabels {
    method: &'static str,
    code: RpcCode,
}

/// A gRPC code as a label value (`NotFound`, `Unavailable`, …).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
struct RpcCode(tonic::Code);

impl EncodeLabelValue for RpcCode {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelValueEncoder<'_>,
    ) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_fmt(encoder, format_args!("{:?}", self.0))
    }
}

/// What applying a result did.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum ResultLabel {
    Processed,
    Failed,
    Ignored,
    Refused,
}

impl ResultLabel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Failed => "failed",
            Self::Ignored => "ignored",
            Self::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// What the reconciler did for a pending image.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
pub enum Reconciled {
    /// Its result record was found in S3 and applied.
    Recovered,
    /// Its original was found without a result: its job was queued again.
    Requeued,
    /// Nothing was uploaded before its token expired (and the grace passed).
    Expired,
}

impl Reconciled {
    fn as_str(self) -> &'static str {
        match self {
            Self::Recovered => "recovered",
            Self::Requeued => "requeued",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReconciledLabels {
    action: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rpc_errors: Family<RpcErrorLabels, Counter>,
    results: Family<OutcomeLabels, Counter>,
    reconciled: Family<ReconciledLabels, Counter>,
    pub apply_seconds: Histogram,
    pub watchers: Gauge,
    /// Database reads made by watch streams (their opening, resyncs, route readiness).
    pub watch_db_reads: Counter,
    watchers_lagged: Counter,
    hub_channels: Gauge,
    consumer_pending: Gauge,
    consumer_lag: Gauge,
    dead_letters: Gauge,
    oldest_dead_letter_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    handled: Counter,
    dead_lettered: Counter,
    retried: Counter,
    reclaimed: Counter,
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
            reconciled: Family::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watchers: Gauge::default(),
            watch_db_reads: Counter::default(),
            watchers_lagged: Counter::default(),
            hub_channels: Gauge::default(),
            consumer_pending: Gauge::default(),
            consumer_lag: Gauge::default(),
            dead_letters: Gauge::default(),
            oldest_dead_letter_seconds: Gauge::default(),
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
            "results applied, by outcome (processed, failed, ignored, refused)",
            m.results.clone(),
        );
        registry.register(
            "reconciled",
            "pending images the reconciler settled, by action (recovered, requeued, expired)",
            m.reconciled.clone(),
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
            "watch_db_reads",
            "database reads made by WatchImageStatus streams",
            m.watch_db_reads.clone(),
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
            "dead_letters",
            "entries in image:result:dead (list them with `follow-api dead list`)",
            m.dead_letters.clone(),
        );
        registry.register(
            "oldest_dead_letter_seconds",
            "age of the oldest entry in image:result:dead",
            m.oldest_dead_letter_seconds.clone(),
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
            "handlings retried after a transient error or a failure",
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
            .get_or_create(&RpcErrorLabels {
                method,
                code: RpcCode(code),
            })
            .inc();
    }

    pub fn result(&self, outcome: ResultLabel) {
        self.results
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub fn reconciled(&self, action: Reconciled) {
        self.reconciled
            .get_or_create(&ReconciledLabels {
                action: action.as_str(),
            })
            .inc();
    }

    /// Takes in the consumer's and the hub's counters and the result queue as of now.
    pub fn sample(&self, consumer: &Arc<ConsumerStats>, hub: &HubStats, queue: Option<QueueInfo>) {
        self.watchers_lagged
            .inner()
            .store(hub.lagged.load(Ordering::Relaxed), Ordering::Relaxed);
        self.hub_channels
            .set(i64::try_from(hub.channels.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        for (counter, value) in [
            (&self.handled, &consumer.handled),
            (&self.dead_lettered, &consumer.dead_lettered),
            (&self.retried, &consumer.retried),
            (&self.reclaimed, &consumer.reclaimed),
        ] {
            counter
                .inner()
                .store(value.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if let Some(q) = queue {
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.consumer_pending.set(gauge(q.pending));
            self.consumer_lag.set(gauge(q.lag.unwrap_or(0)));
            self.dead_letters.set(gauge(q.dead));
            self.oldest_dead_letter_seconds
                .set(q.oldest_dead.map_or(0.0, |age| age.as_secs_f64()));
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
