//! Prometheus metrics (`GET /metrics`) and the counters behind `GetPipelineStats`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use follow_bus::{ErrorCode, Stage};
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
    pub uploads: Family<Labels, Counter>,
    pub stage_seconds: Family<Labels, Histogram>,
    pub in_flight: Gauge,
    pub queued: Gauge,
    pub outbox: Gauge,
    pub processed: AtomicU64,
    pub failed: AtomicU64,
    failed_by_code: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("follow_gateway");
        let stage_seconds: Family<Labels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 16)));
        let m = Self {
            registry: Registry::default(),
            uploads: Family::default(),
            stage_seconds,
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            outbox: Gauge::default(),
            processed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            failed_by_code: Family::default(),
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
            "pipeline_in_flight",
            "images between an accepted upload and their result",
            m.in_flight.clone(),
        );
        registry.register(
            "pipeline_queued",
            "accepted images waiting for a pipeline worker",
            m.queued.clone(),
        );
        registry.register(
            "outbox_length",
            "results waiting to be published to image:result",
            m.outbox.clone(),
        );
        registry.register(
            "images_failed",
            "images failed, by error code",
            m.failed_by_code.clone(),
        );
        Self { registry, ..m }
    }

    pub fn upload(&self, status: u16) {
        self.uploads
            .get_or_create(&vec![("status", status.to_string())])
            .inc();
    }

    pub fn stage(&self, stage: Stage, seconds: f64) {
        self.stage_seconds
            .get_or_create(&vec![("stage", stage.as_str().to_owned())])
            .observe(seconds);
    }

    pub fn failed(&self, code: ErrorCode) {
        self.failed.fetch_add(1, Relaxed);
        self.failed_by_code
            .get_or_create(&vec![("error_code", code.as_str().to_owned())])
            .inc();
    }

    /// `(code, count)` of every failure code seen.
    pub fn failures(&self) -> Vec<(ErrorCode, u64)> {
        ErrorCode::ALL
            .iter()
            .filter_map(|code| {
                let count = self
                    .failed_by_code
                    .get(&vec![("error_code", code.as_str().to_owned())])
                    .map(|c| c.get())?;
                Some((*code, count))
            })
            .collect()
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        let _ = encode(&mut text, &self.registry);
        text
    }
}
