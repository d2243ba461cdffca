//! The API's background workers, each a named task restarted by [`supervise`] if it panics:
//! the result consumer, the stream trimmer, the expiry job, the progress hub and the gRPC
//! health reporter. All stop on the one shutdown token.

use std::{future::Future, sync::Arc, time::Duration};

use follow_bus::{
    Consumer, ConsumerConfig, ErrorCode, Failure, Progress, ProgressTracker, Trimmer, keys,
};
use sqlx::PgPool;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{http::Probe, metrics::Metrics, results::ResultApplier, store};

/// Runs `make()`'s future as task `name` until `cancel`; a panic is logged and the worker is
/// started again after a pause, so one bug does not silently stop a duty of the service.
pub fn supervise<F, Fut>(
    tasks: &TaskTracker,
    cancel: &CancellationToken,
    name: &'static str,
    mut make: F,
) where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let cancel = cancel.clone();
    tasks.spawn(async move {
        loop {
            let outcome = tokio::spawn(make()).await;
            if cancel.is_cancelled() {
                break;
            }
            match outcome {
                Ok(()) => tracing::error!(worker = name, "worker stopped on its own; restarting"),
                Err(e) => tracing::error!(worker = name, error = %e, "worker panicked; restarting"),
            }
            tokio::select! {
                () = cancel.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        tracing::debug!(worker = name, "worker stopped");
    });
}

/// The `image:result` consumer with the result applier as its handler.
pub async fn consume(consumer: Consumer, mut applier: ResultApplier, cancel: CancellationToken) {
    consumer.run(&mut applier, cancel).await;
}

pub fn consumer_config(name: &str, batch: usize) -> ConsumerConfig {
    ConsumerConfig {
        batch_size: batch,
        ..ConsumerConfig::new(name)
    }
}

/// Trims `image:result` below what the group has not acknowledged, every `every`.
pub async fn trim(mut trimmer: Trimmer, every: Duration, cancel: CancellationToken) {
    loop {
        match trimmer.trim().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(trimmed = n, stream = keys::RESULT_STREAM, "stream trimmed"),
            Err(e) => tracing::warn!(error = %e, "trimming the result stream failed"),
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Expires pending images whose token ran out, every `every`, and tells their watchers.
pub async fn expire(
    pool: PgPool,
    mut announcer: ProgressTracker,
    metrics: Arc<Metrics>,
    grace: Duration,
    every: Duration,
    cancel: CancellationToken,
) {
    const PAGE: i64 = 500;
    loop {
        loop {
            let expired = match store::expire_due(&pool, grace, PAGE).await {
                Ok(expired) => expired,
                Err(e) => {
                    tracing::warn!(error = %e, "expiring pending images failed");
                    break;
                }
            };
            metrics.expired.inc_by(expired.len() as u64);
            for image_id in &expired {
                tracing::info!(%image_id, "image expired: no upload before its token ran out");
                let failure = Failure {
                    code: ErrorCode::TokenExpired,
                    message: "the upload token expired".into(),
                };
                if let Err(e) = announcer
                    .announce(&Progress::committed(*image_id, Some(failure)))
                    .await
                {
                    tracing::debug!(error = %e, "announcing an expiry failed");
                }
            }
            if (expired.len() as i64) < PAGE || cancel.is_cancelled() {
                break;
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

/// Keeps `grpc.health.v1` in step with the dependencies (checked every `every`).
pub async fn report_health(
    probe: Probe,
    reporter: HealthReporter,
    services: Vec<&'static str>,
    every: Duration,
    cancel: CancellationToken,
) {
    let mut last = None;
    loop {
        let ok = probe.check().await.ok();
        if last != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
            if last.is_some() {
                tracing::info!(serving = ok, "health changed");
            }
            last = Some(ok);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
