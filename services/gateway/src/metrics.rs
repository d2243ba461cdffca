//! Prometheus metrics of the gateway (`GET /metrics`) and the counters behind `GetPipelineStats`.

use std::{
    sync::atomic::{AtomicU64, Ordering::Relaxed},
    time::Instant,
};

use follow_bus::{ConsumerStats, ErrorCode, HealthChecker, Stage, keys};
use follow_service::metrics::{
    Counter, EncodeLabelSet, Family, Gauge, Histogram, ProcessMetrics, QueueMetrics, Registry,
    exponential_buckets,
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
struct StepLabel {
    step: &'static str,
}

/// A step of accepting an upload (`upload_step_seconds{step}`): where the time to its answer
/// goes.
#[derive(Debug, Clone, Copy)]
pub enum UploadStep {
    /// The one-time guard taken.
    Guard,
    /// S3 asked whether the image has its upload already (beside the body when it streams).
    Checks,
    /// The body received and checked, from the guard on.
    Body,
    /// The original stored (its streamed `PUT` finished, its spool file put, or its parts
    /// completed).
    Store,
    /// The record's absence checked after the original was stored.
    RecordCheck,
    /// The job queued.
    Enqueue,
}

impl UploadStep {
    fn as_str(self) -> &'static str {
        match self {
            Self::Guard => "guard",
            Self::Checks => "checks",
            Self::Body => "body",
            Self::Store => "store",
            Self::RecordCheck => "record_check",
            Self::Enqueue => "enqueue",
        }
    }
}

/// A step of an upload being timed ([`Metrics::time`]); observed when dropped.
#[derive(Debug)]
pub struct StepTimer {
    histogram: Histogram,
    since: Instant,
}

impl Drop for StepTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.since.elapsed().as_secs_f64());
    }
}

/// An image's failure, by its contract code (`INVALID_IMAGE`, …).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    error_code: &'static str,
}

/// The gateway's metrics; `processed` and `failed` also answer `GetPipelineStats`.
#[derive(Debug)]
pub struct Metrics {
    uploads: Family<StatusLabel, Counter>,
    upload_steps: Family<StepLabel, Histogram>,
    stage_seconds: Family<StageLabel, Histogram>,
    /// Uploads being received now.
    pub receiving: Gauge,
    /// Jobs being processed here now.
    pub processing: Gauge,
    processed: Counter,
    failed: Family<CodeLabel, Counter>,
    failed_total: AtomicU64,
    jobs: QueueMetrics,
    process: ProcessMetrics,
}

impl Metrics {
    /// Every metric of the service, registered in `registry` (`follow_gateway_*`).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            uploads: Family::default(),
            upload_steps: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            stage_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 16))
            }),
            receiving: Gauge::default(),
            processing: Gauge::default(),
            processed: Counter::default(),
            failed: Family::default(),
            failed_total: AtomicU64::new(0),
            // `image:jobs`, as every gateway shares it, and this instance's workers.
            jobs: QueueMetrics::register(registry, "jobs", "jobs"),
            process: ProcessMetrics::register(registry),
        };
        registry.register(
            "uploads",
            "upload requests by HTTP status",
            m.uploads.clone(),
        );
        registry.register(
            "upload_step_seconds",
            "time spent in each step of accepting an upload, by step",
            m.upload_steps.clone(),
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
        m
    }

    pub fn upload(&self, status: u16) {
        self.uploads.get_or_create(&StatusLabel { status }).inc();
    }

    /// Times `step` of an upload from now until the timer is dropped.
    pub fn time(&self, step: UploadStep) -> StepTimer {
        let histogram = self
            .upload_steps
            .get_or_create(&StepLabel {
                step: step.as_str(),
            })
            .clone();
        StepTimer {
            histogram,
            since: Instant::now(),
        }
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

    /// Takes in the job queue as of now and the workers' counters, for a scrape.
    pub async fn sample(&self, valkey: &HealthChecker, consumers: &ConsumerStats) {
        self.process.sample(valkey);
        self.jobs.sample(valkey, keys::JOBS, consumers).await;
    }
}
