//! Prometheus metrics of the gateway (`GET /metrics`) and the counters behind `GetPipelineStats`.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering::Relaxed},
};

use follow_bus::{ConsumerStats, ErrorCode, QueueInfo, Stage};
use follow_service::metrics::EncodeLabelSet;
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
struct StatusLabel {
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    error_code: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    uploads: Family<StatusLabel, Counter>,
    stage_seconds: Family<StageLabel, Histogram>,
    /// Uploads being received now.
    pub receiving: Gauge,
    /// Jobs being processed here now.
    pub processing: Gauge,
    processed: Counter,
    failed: Family<CodeLabel, Counter>,
    failed_total: AtomicU64,
    jobs_waiting: Gauge,
    jobs_in_progress: Gauge,
    jobs_dead: Gauge,
    oldest_job_seconds: Gauge<f64, AtomicU64>,
    jobs_retried: Counter,
    jobs_reclaimed: Counter,
    jobs_dead_lettered: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("follow_gateway");
        let m = Self {
            registry: Registry::default(),
            uploads: Family::default(),
            stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            receiving: Gauge::default(),
            processing: Gauge::default(),
            processed: Counter::default(),
            failed: Family::default(),
            failed_total: AtomicU64::new(0),
            jobs_waiting: Gauge::default(),
            jobs_in_progress: Gauge::default(),
            jobs_dead: Gauge::default(),
            oldest_job_seconds: Gauge::default(),
            jobs_retried: Counter::default(),
            jobs_reclaimed: Counter::default(),
            jobs_dead_lettered: Counter::default(),
        };
        registry.register(
            "uploads",
            "upload requests by HTTP status",
            m.uploads.clone(),
        );
        registry.register(
            "stage_seconds",
            "time spent in each pipeline stage",
            m.stage_seconds.clone(),
        );
        registry.register(
            "receiving",
            "uploads being received by this instance",
            m.receiving.clone(),
        );
        registry.register(
            "processing",
            "jobs being processed by this instance",
            m.processing.clone(),
        );
        registry.register(
            "images_processed",
            "results of processed images handed off by this instance",
            m.processed.clone(),
        );
        registry.register(
            "images_failed",
            "images failed, by error code",
            m.failed.clone(),
        );
        registry.register(
            "jobs_waiting",
            "accepted uploads no gateway has taken yet (all gateways)",
            m.jobs_waiting.clone(),
        );
        registry.register(
            "jobs_in_progress",
            "jobs taken and not handed off yet (all gateways)",
            m.jobs_in_progress.clone(),
        );
        registry.register(
            "jobs_dead",
            "jobs in image:jobs:dead (all gateways)",
            m.jobs_dead.clone(),
        );
        registry.register(
            "oldest_job_seconds",
            "age of the oldest job not handed off yet (all gateways)",
            m.oldest_job_seconds.clone(),
        );
        registry.register(
            "jobs_retried",
            "job handlings retried by this instance (storage or Valkey unavailable, or a failure)",
            m.jobs_retried.clone(),
        );
        registry.register(
            "jobs_reclaimed",
            "jobs this instance took over from a gateway that went away",
            m.jobs_reclaimed.clone(),
        );
        registry.register(
            "jobs_dead_lettered",
            "jobs this instance moved to image:jobs:dead",
            m.jobs_dead_lettered.clone(),
        );
        Self { registry, ..m }
    }

    pub fn upload(&self, status: u16) {
        self.uploads.get_or_create(&StatusLabel { status }).inc();
    }

    pub fn stage(&self, stage: Stage, seconds: f64) {
        self.stage_seconds
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .observe(seconds);
    }

    pub fn processed(&self) {
        self.processed.inc();
    }

    pub fn failed(&self, code: ErrorCode) {
        self.failed_total.fetch_add(1, Relaxed);
        self.failed
            .get_or_create(&CodeLabel {
                error_code: code.as_str(),
            })
            .inc();
    }

    pub fn processed_count(&self) -> u64 {
        self.processed.get()
    }

    pub fn failed_count(&self) -> u64 {
        self.failed_total.load(Relaxed)
    }

    /// `(code, count)` of every failure code seen.
    pub fn failures(&self) -> Vec<(ErrorCode, u64)> {
        ErrorCode::ALL
            .iter()
            .filter_map(|code| {
                let count = self
                    .failed
                    .get(&CodeLabel {
                        error_code: code.as_str(),
                    })?
                    .get();
                Some((*code, count))
            })
            .collect()
    }

    /// Takes in the queue as of now and the workers' counters, for a scrape.
    pub fn sample(&self, queue: Option<QueueInfo>, consumers: &Arc<ConsumerStats>) {
        if let Some(q) = queue {
            self.jobs_waiting
                .set(i64::try_from(q.lag.unwrap_or(0)).unwrap_or(i64::MAX));
            self.jobs_in_progress
                .set(i64::try_from(q.pending).unwrap_or(i64::MAX));
            self.jobs_dead
                .set(i64::try_from(q.dead).unwrap_or(i64::MAX));
            self.oldest_job_seconds
                .set(q.oldest.map_or(0.0, |age| age.as_secs_f64()));
        }
        for (counter, value) in [
            (&self.jobs_retried, &consumers.retried),
            (&self.jobs_reclaimed, &consumers.reclaimed),
            (&self.jobs_dead_lettered, &consumers.dead_lettered),
        ] {
            counter.inner().store(value.load(Relaxed), Relaxed);
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}
