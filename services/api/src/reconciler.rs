//! The reconciler (docs/architecture.md, "Failure handling"): S3 is where an accepted upload lives, so for
//! every PENDING image whose upload may have been accepted it looks there, at most once per
//! `FOLLOW_RECONCILE_INTERVAL_SECS` (instances lease different images):
//!
//! * a result record → applied as if it came from the stream (a result Valkey lost);
//! * an original without a record → its job is queued again, unless its upload guard says the
//!   job is queued already (the mark is set in the same `MULTI` as the job, so it is gone exactly
//!   when Valkey lost the job);
//! * neither, past the token's expiry and grace → EXPIRED, unless an upload is still being
//!   received (its guard is taken) or results are waiting to be applied (a backlog it has not
//!   read might hold this image's).

use std::{sync::Arc, time::Duration};

use follow_bus::{
    Committed, GuardState, HealthChecker, Job, Producer, ProgressTracker, UploadGuard, keys,
};
use follow_service::{
    objects::{self, Record, original_key},
    s3::Bucket,
};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{
    metrics::{Metrics, Reconciled},
    results::{Applied, ResultApplier},
    store::{self, Unsettled},
    views,
};

/// Images leased per round trip, and looked at concurrently.
const LEASE: i64 = 200;
const CONCURRENCY: usize = 16;
/// How long a guard made by a re-queue lives (replays meanwhile get 409 without S3).
const REQUEUED_GUARD: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone)]
pub struct Reconciler {
    pub pool: PgPool,
    pub bucket: Bucket,
    pub producer: Producer,
    pub guard: UploadGuard,
    pub valkey: HealthChecker,
    pub applier: ResultApplier,
    pub announcer: ProgressTracker,
    pub metrics: Arc<Metrics>,
    pub every: Duration,
    pub grace: Duration,
}

/// What settling one image did (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Recovered,
    Requeued,
    Expired,
    /// Nothing to do yet (waiting for an upload, a queued job, or storage).
    Waiting,
}

impl Reconciler {
    /// Runs a round every `every` until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            // A reconciler that fails at every start: how health's `workers: down` is tested.
            follow_service::failpoint("api-reconciler-round");
            if let Err(e) = self.round().await {
                tracing::warn!(error = %e, "reconciling failed; trying again next round");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// Looks at every image due; returns what was done to each.
    pub async fn round(&self) -> Result<Vec<Settled>, sqlx::Error> {
        // Expiring while results wait unread could expire an image whose result is among them.
        let backlog = match self.valkey.clone().queue_info(keys::RESULTS).await {
            Ok(Some(q)) => q.pending > 0 || q.lag != Some(0),
            Ok(None) => false,
            Err(e) => {
                tracing::debug!(error = %e, "the result queue is unavailable: nothing expires now");
                true
            }
        };
        let mut all = Vec::new();
        loop {
            let leased = store::lease_unsettled(&self.pool, self.every, self.grace, LEASE).await?;
            let count = leased.len();
            let settled: Vec<Settled> = futures_util::stream::iter(leased)
                .map(|image| self.settle(image, backlog))
                .buffer_unordered(CONCURRENCY)
                .collect()
                .await;
            all.extend(settled);
            if (count as i64) < LEASE {
                return Ok(all);
            }
        }
    }

    async fn settle(&self, image: Unsettled, backlog: bool) -> Settled {
        let span = tracing::info_span!("reconcile", image_id = %image.id);
        match self.look(&image, backlog).instrument(span).await {
            Ok(settled) => {
                match settled {
                    Settled::Recovered => self.metrics.reconciled(Reconciled::Recovered),
                    Settled::Requeued => self.metrics.reconciled(Reconciled::Requeued),
                    Settled::Expired => self.metrics.reconciled(Reconciled::Expired),
                    Settled::Waiting => {}
                }
                settled
            }
            Err(e) => {
                tracing::warn!(image_id = %image.id, error = %e, "could not reconcile an image; next round");
                Settled::Waiting
            }
        }
    }

    async fn look(&self, image: &Unsettled, backlog: bool) -> Result<Settled, String> {
        match objects::read_record(&self.bucket, &image.storage_key)
            .await
            .map_err(|e| e.to_string())?
        {
            Record::Found(result) => {
                let applied = self
                    .applier
                    .apply(&[("s3-record", &result)])
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(image_id = %image.id, ?applied, "result recovered from its record");
                return Ok(match applied.first() {
                    Some(Applied::Processed { .. } | Applied::Failed { .. }) => Settled::Recovered,
                    _ => Settled::Waiting,
                });
            }
            Record::Corrupt(reason) => {
                tracing::error!(image_id = %image.id, %reason, "a result record cannot be applied");
                return Ok(Settled::Waiting);
            }
            Record::Missing => {}
        }
        let guard = self
            .guard
            .clone()
            .state(image.id)
            .await
            .map_err(|e| e.to_string())?;
        let original = self
            .bucket
            .exists(&original_key(&image.storage_key))
            .await
            .map_err(|e| e.to_string())?;
        if original {
            if guard == GuardState::Queued {
                return Ok(Settled::Waiting);
            }
            let job = Job {
                image_id: image.id,
                storage_key: image.storage_key.clone(),
                content_type: image.content_type.clone(),
                owner: image.owner.clone(),
                accepted_at: OffsetDateTime::now_utc(),
            };
            self.producer
                .clone()
                .enqueue(&job, REQUEUED_GUARD)
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(image_id = %image.id, "an original without a job: queued again");
            return Ok(Settled::Requeued);
        }
        let due = image.expires_at + self.grace < OffsetDateTime::now_utc();
        if !due || backlog || guard == GuardState::Receiving {
            return Ok(Settled::Waiting);
        }
        let Some(expired) = store::expire(&self.pool, image.id, self.grace)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(Settled::Waiting);
        };
        tracing::info!(image_id = %image.id, "image expired: nothing uploaded before its token ran out");
        let committed = Committed {
            image_id: expired.id,
            image: views::image(&expired, None, String::new()),
            route_ready: false,
        };
        if let Err(e) = self.announcer.clone().announce(committed).await {
            tracing::debug!(error = %e, "announcing an expiry failed");
        }
        Ok(Settled::Expired)
    }
}
