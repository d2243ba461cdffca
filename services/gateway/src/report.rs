//! Reporting one image's stages (`image:status:{id}` + `image:progress:{id}`) in order, without
//! ever holding its work up: a small task writes them one after the other; a Valkey error is
//! logged and the image goes on (progress is best effort, results are not).

use std::{sync::Arc, time::Instant};

use follow_bus::{Failure, Progress, ProgressTracker, Stage};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Reporter {
    stages: StageSender,
    done: tokio::task::JoinHandle<()>,
}

/// The sending side of a [`Reporter`], usable from the blocking pool.
#[derive(Debug, Clone)]
pub struct StageSender {
    image_id: Uuid,
    tx: mpsc::UnboundedSender<Progress>,
}

impl StageSender {
    pub fn stage(&self, stage: Stage) {
        let _ = self.tx.send(Progress::reached(self.image_id, stage));
    }

    pub fn failed(&self, failure: Failure) {
        let _ = self.tx.send(Progress::failed(self.image_id, failure));
    }
}

impl Reporter {
    pub fn start(progress: &ProgressTracker, metrics: &Arc<Metrics>, image_id: Uuid) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Progress>();
        let (mut progress, metrics) = (progress.clone(), Arc::clone(metrics));
        let done = tokio::spawn(async move {
            let mut last: Option<(Stage, Instant)> = None;
            while let Some(p) = rx.recv().await {
                if let Some((stage, since)) = last.replace((p.stage(), Instant::now())) {
                    metrics.stage(stage, since.elapsed().as_secs_f64());
                }
                if let Err(e) = progress.record(&p).await {
                    tracing::debug!(%image_id, stage = %p.stage(), error = %e, "progress not recorded");
                }
            }
        });
        Self {
            stages: StageSender { image_id, tx },
            done,
        }
    }

    pub fn stage(&self, stage: Stage) {
        self.stages.stage(stage);
    }

    pub fn failed(&self, failure: Failure) {
        self.stages.failed(failure);
    }

    pub fn sender(&self) -> StageSender {
        self.stages.clone()
    }

    /// Waits until every report so far is written (or given up on: each write has Valkey's
    /// response timeout).
    pub async fn finish(self) {
        drop(self.stages);
        let _ = self.done.await;
    }
}
