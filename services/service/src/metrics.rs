//! Prometheus metrics: the metric types the services use (from `prometheus-client`), typed label
//! sets (`#[derive(EncodeLabelSet)]`), the metrics of a work queue, and the `/metrics` text.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use follow_bus::{ConsumerStats, HealthChecker, QueueInfo, keys::Queue};
pub use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

pub use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// The OpenMetrics text of `registry`, as a response.
pub fn response(registry: &Registry) -> Response {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// What this process holds: its connections to Valkey (`valkey_connections`: the one shared by
/// every ordinary command, and each blocking reader's and subscriber's) and its heap
/// (`heap_bytes`, counted by the allocator: [`crate::heap`]).
#[derive(Debug, Default)]
pub struct ProcessMetrics {
    connections: Gauge,
    heap: Gauge,
}

impl ProcessMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "valkey_connections",
            "connections to Valkey this process holds: one shared by every ordinary command, \
             one per blocking reader (consumer) and per subscriber (the progress hub)",
            m.connections.clone(),
        );
        registry.register(
            "heap_bytes",
            "bytes allocated on the heap and not yet freed (counted by the allocator)",
            m.heap.clone(),
        );
        m
    }

    pub fn sample(&self, valkey: &HealthChecker) {
        self.connections
            .set(i64::try_from(valkey.open_connections()).unwrap_or(i64::MAX));
        self.heap
            .set(i64::try_from(crate::heap::in_use()).unwrap_or(i64::MAX));
    }
}

/// The label of a per-partition metric (`partition="p3"`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

/// The metrics of a work queue and of this process's consumers of it, under the service's
/// registry: backlog (waiting, in progress, oldest), dead letters, and what the consumers did.
#[derive(Debug)]
pub struct QueueMetrics {
    partition_waiting: Family<PartitionLabel, Gauge>,
    partition_in_progress: Family<PartitionLabel, Gauge>,
    partition_oldest_seconds: Family<PartitionLabel, Gauge<f64, AtomicU64>>,
    waiting: Gauge,
    in_progress: Gauge,
    oldest_seconds: Gauge<f64, AtomicU64>,
    dead: Gauge,
    oldest_dead_seconds: Gauge<f64, AtomicU64>,
    handled: Counter,
    retried: Counter,
    reclaimed: Counter,
    dead_lettered: Counter,
}

impl QueueMetrics {
    /// Registers the queue's metrics as `{prefix}_*` in `registry`; `what` names an entry in
    /// the help texts (`results`, `jobs`).
    pub fn register(registry: &mut Registry, prefix: &str, what: &str) -> Self {
        let m = Self {
            partition_waiting: Family::default(),
            partition_in_progress: Family::default(),
            partition_oldest_seconds: Family::default(),
            waiting: Gauge::default(),
            in_progress: Gauge::default(),
            oldest_seconds: Gauge::default(),
            dead: Gauge::default(),
            oldest_dead_seconds: Gauge::default(),
            handled: Counter::default(),
            retried: Counter::default(),
            reclaimed: Counter::default(),
            dead_lettered: Counter::default(),
        };
        let name = |metric: &str| format!("{prefix}_{metric}");
        registry.register(
            name("waiting"),
            format!("{what} not taken by a consumer yet (all instances)"),
            m.waiting.clone(),
        );
        registry.register(
            name("in_progress"),
            format!("{what} taken and not acknowledged yet (all instances)"),
            m.in_progress.clone(),
        );
        registry.register(
            name("oldest_seconds"),
            format!("age of the oldest of the {what} not acknowledged yet"),
            m.oldest_seconds.clone(),
        );
        registry.register(
            name("dead"),
            format!("{what} in the dead stream (all instances)"),
            m.dead.clone(),
        );
        registry.register(
            name("oldest_dead_seconds"),
            format!("age of the oldest of the {what} in the dead stream"),
            m.oldest_dead_seconds.clone(),
        );
        registry.register(
            name("partition_waiting"),
            format!("{what} not taken by a consumer yet, by partition"),
            m.partition_waiting.clone(),
        );
        registry.register(
            name("partition_in_progress"),
            format!("{what} taken and not acknowledged yet, by partition"),
            m.partition_in_progress.clone(),
        );
        registry.register(
            name("partition_oldest_seconds"),
            format!("age of the oldest of the {what} not acknowledged yet, by partition"),
            m.partition_oldest_seconds.clone(),
        );
        registry.register(
            name("handled"),
            format!("{what} handed to this instance's handler (each retry counts)"),
            m.handled.clone(),
        );
        registry.register(
            name("retried"),
            format!("{what} handlings retried here (a dependency unavailable, or a failure)"),
            m.retried.clone(),
        );
        registry.register(
            name("reclaimed"),
            format!("{what} this instance took over from consumers that went away"),
            m.reclaimed.clone(),
        );
        registry.register(
            name("dead_lettered"),
            format!("{what} this instance moved to the dead stream"),
            m.dead_lettered.clone(),
        );
        m
    }

    /// Asks Valkey for `queue`'s backlog on each partition (through `checker`) and takes it in
    /// with the consumers' counters; without Valkey the backlog keeps its last values.
    pub async fn sample(&self, checker: &HealthChecker, queue: Queue, consumers: &ConsumerStats) {
        let partitions = match checker.clone().partitions_info(queue).await {
            Ok(partitions) => partitions,
            Err(e) => {
                tracing::debug!(queue = queue.name, error = %e, "metrics: the queue is unavailable");
                Vec::new()
            }
        };
        let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        for (partition, info) in &partitions {
            let label = PartitionLabel {
                partition: partition.to_string(),
            };
            let info = info.unwrap_or(QueueInfo {
                pending: 0,
                lag: None,
                oldest: None,
                dead: 0,
                oldest_dead: None,
            });
            self.partition_waiting
                .get_or_create(&label)
                .set(gauge(info.lag.unwrap_or(0)));
            self.partition_in_progress
                .get_or_create(&label)
                .set(gauge(info.pending));
            self.partition_oldest_seconds
                .get_or_create(&label)
                .set(info.oldest.map_or(0.0, |age| age.as_secs_f64()));
        }
        let total = QueueInfo::total(partitions.into_iter().filter_map(|(_, info)| info));
        self.take(total, consumers);
    }

    fn take(&self, queue: Option<QueueInfo>, consumers: &ConsumerStats) {
        if let Some(q) = queue {
            let gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.waiting.set(gauge(q.lag.unwrap_or(0)));
            self.in_progress.set(gauge(q.pending));
            self.oldest_seconds
                .set(q.oldest.map_or(0.0, |age| age.as_secs_f64()));
            self.dead.set(gauge(q.dead));
            self.oldest_dead_seconds
                .set(q.oldest_dead.map_or(0.0, |age| age.as_secs_f64()));
        }
        for (counter, value) in [
            (&self.handled, &consumers.handled),
            (&self.retried, &consumers.retried),
            (&self.reclaimed, &consumers.reclaimed),
            (&self.dead_lettered, &consumers.dead_lettered),
        ] {
            counter.inner().store(value.load(Relaxed), Relaxed);
        }
    }
}
