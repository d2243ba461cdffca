//! Prometheus metrics of the API (`GET /metrics`): what an operator needs to see the result
//! pipeline keep up (lag, pending, apply latency, dead letters), the reconciler, errors by code,
//! and watchers.

use std::sync::atomic::Ordering;

use follow_bus::{ConsumerStats, HealthChecker, HubStats, keys};
use follow_service::metrics::{
    Counter, EncodeLabelSet, EncodeLabelValue, Family, Gauge, Histogram, ProcessMetrics,
    QueueMetrics, Registry, exponential_buckets,
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
    Errored,
}

impl ResultLabel {
    fn as_str(self) -> &'static str {
        match self {
            Self::Processed => "processed",
            Self::Failed => "failed",
            Self::Ignored => "ignored",
            Self::Refused => "refused",
            Self::Errored => "errored",
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
    rpc_errors: Family<RpcErrorLabels, Counter>,
    results: Family<OutcomeLabels, Counter>,
    reconciled: Family<ReconciledLabels, Counter>,
    /// Requests the reconciler made to S3 (a `GET` of a result record, a `HEAD` of an original).
    pub reconciler_s3_requests: Counter,
    reconcile_sweeps: Counter,
    pub apply_seconds: Histogram,
    pub watchers: Gauge,
    /// Database reads made by watch streams (their opening, resyncs, route readiness).
    pub watch_db_reads: Counter,
    /// Images a watch found final by re-reading them, their commit notice never having come.
    pub watch_rechecks_settled: Counter,
    watchers_lagged: Counter,
    hub_channels: Gauge,
    results_queue: QueueMetrics,
    process: ProcessMetrics,
}

impl Metrics {
    /// Every metric of the service, registered in `registry` (`follow_api_*`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            rpc_errors: Family::default(),
            results: Family::default(),
            reconciled: Family::default(),
            reconciler_s3_requests: Counter::default(),
            reconcile_sweeps: Counter::default(),
            apply_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            watchers: Gauge::default(),
            watch_db_reads: Counter::default(),
            watch_rechecks_settled: Counter::default(),
            watchers_lagged: Counter::default(),
            hub_channels: Gauge::default(),
            // `image:result` as the API consumes it (dead: `follow-api dead list`).
            results_queue: QueueMetrics::register(registry, "results", "results"),
            process: ProcessMetrics::register(registry),
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
            "reconciler_s3_requests",
            "requests the reconciler made to S3 (result records read, originals looked for)",
            m.reconciler_s3_requests.clone(),
        );
        registry.register(
            "reconcile_sweeps",
            "times this instance made every pending image due for a look, Valkey having maybe \
             lost data",
            m.reconcile_sweeps.clone(),
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
            "watch_rechecks_settled",
            "re-reads by WatchImageStatus streams that found an image final whose commit notice \
             never came (a lost announcement)",
            m.watch_rechecks_settled.clone(),
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
        m
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

    pub fn reconcile_sweep(&self) {
        self.reconcile_sweeps.inc();
    }

    /// Takes in the hub's and the consumer's counters and the result queue as of now.
    pub async fn sample(&self, hub: &HubStats, valkey: &HealthChecker, consumer: &ConsumerStats) {
        self.process.sample(valkey);
        self.watchers_lagged
            .inner()
            .store(hub.lagged.load(Ordering::Relaxed), Ordering::Relaxed);
        self.hub_channels
            .set(i64::try_from(hub.channels.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
        self.results_queue
            .sample(valkey, keys::RESULTS, consumer)
            .await;
    }
}
