//! The reconciler (docs/architecture.md, "Failure handling"): S3 is where an accepted upload
//! lives, and Valkey may lose what says so (a job, a result). The reconciler finds those images
//! while asking S3 about each a small, fixed number of times in its whole life, however many
//! images wait and however long: what Valkey and PostgreSQL know comes first.
//!
//! When a PENDING image is looked at:
//! * **at its token's expiry** (+ grace): the result record (`GET`), then the original (`HEAD`,
//!   unless a look saw it already) → a record is applied as if it came from the stream; an
//!   original without a record has its job queued again; neither → EXPIRED;
//! * **soon after its upload began** (its `waiting_upload` stage, seen by this instance's progress
//!   hub, plus `FOLLOW_RECONCILE_INTERVAL_SECS`): only if its guard is free by then (the upload
//!   ended without queueing a job), the original (`HEAD`) → its job is queued again: a gateway
//!   that died between storing an original and queueing its job;
//! * **after Valkey may have lost data** (a partition's epoch marker was missing, this instance
//!   lost its subscription, or Valkey could not be read): every PENDING image once, as at expiry
//!   but without expiring. Instances that notice the same loss sweep once between them.
//!
//! Before S3, the upload guard: a body still arriving, or a job or result on its stream
//! (`queued`, `spent`), needs no look; at expiry, results waiting unread postpone it. So an
//! image costs at most 3 S3 requests (2 at expiry, 1 after its upload began), plus 2 per loss
//! of Valkey data while it waits.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use follow_bus::{
    Committed, Epochs, GuardState, HealthChecker, HubStats, Job, Producer, ProgressTracker,
    UploadGuard, keys,
};
use follow_service::{
    objects::{self, Record, original_key},
    s3::Bucket,
};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Mutex, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

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
    pub epochs: Epochs,
    pub applier: ResultApplier,
    pub announcer: ProgressTracker,
    pub metrics: Arc<Metrics>,
    /// This instance's progress hub: how often it lost its subscription.
    pub hub: Arc<HubStats>,
    /// Images whose upload began ([`follow_bus::Hub::uploads`]).
    pub uploads: Arc<Mutex<mpsc::UnboundedReceiver<Uuid>>>,
    /// The pause between rounds, and between an upload's beginning and its look.
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

/// What the reconciler remembers between rounds: signs that Valkey may have lost data.
#[derive(Debug, Default)]
pub struct Watch {
    resyncs: u64,
    /// Valkey could not be read at the last round.
    unreadable: bool,
}

impl Reconciler {
    /// Runs a round every `every` until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut watch = Watch {
            resyncs: self.hub.resyncs.load(Ordering::Relaxed),
            unreadable: false,
        };
        loop {
            // A reconciler that fails at every start: how health's `workers: down` is tested.
            follow_service::failpoint("api-reconciler-round");
            if let Err(e) = self.round(&mut watch).await {
                tracing::warn!(error = %e, "reconciling failed; trying again next round");
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.every) => {}
            }
        }
    }

    /// Notices losses and uploads that began, then looks at every image due; returns what was
    /// done to each.
    pub async fn round(&self, watch: &mut Watch) -> Result<Vec<Settled>, sqlx::Error> {
        self.notice_losses(watch).await?;
        self.notice_uploads().await?;
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
            let leased = store::lease_unsettled(&self.pool, self.every, LEASE).await?;
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

    /// Sweeps (makes every PENDING image due) when Valkey may have lost data since the last
    /// round: a partition's epoch marker was gone, this instance's hub lost its subscription,
    /// or Valkey could not be read for a while (a job may not have been queued meanwhile). The
    /// sweep is due once the trouble is over; another instance's sweep after that serves too.
    async fn notice_losses(&self, watch: &mut Watch) -> Result<(), sqlx::Error> {
        let now = OffsetDateTime::now_utc();
        let mut over = None;
        match self.epochs.renew().await {
            Ok(0) => {}
            Ok(missing) => {
                tracing::warn!(
                    missing,
                    "partitions lost their epoch marker: Valkey lost data"
                );
                over = Some(now);
            }
            Err(e) => {
                tracing::debug!(error = %e, "the epoch markers cannot be read");
                watch.unreadable = true;
                return Ok(());
            }
        }
        if std::mem::take(&mut watch.unreadable) {
            over = Some(now);
        }
        let resyncs = self.hub.resyncs.load(Ordering::Relaxed);
        if resyncs != watch.resyncs {
            watch.resyncs = resyncs;
            over = Some(over.map_or(self.hub.resynced_at(), |o| o.max(self.hub.resynced_at())));
        }
        if let Some(over) = over
            && let Some(due) = store::sweep(&self.pool, over).await?
        {
            tracing::info!(
                due,
                "Valkey may have lost data: every pending image looked at once"
            );
            self.metrics.reconcile_sweep();
        }
        Ok(())
    }

    /// Brings the look at images whose upload began forward (to one interval from now).
    async fn notice_uploads(&self) -> Result<(), sqlx::Error> {
        let mut ids = Vec::new();
        {
            let mut uploads = self.uploads.lock().await;
            while let Ok(id) = uploads.try_recv() {
                ids.push(id);
            }
        }
        for chunk in ids.chunks(1000) {
            store::look_soon(&self.pool, chunk, self.every).await?;
        }
        Ok(())
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
        let now = OffsetDateTime::now_utc();
        let expiry = image.expires_at + self.grace;
        let expiring = now >= expiry;
        let later = |at: OffsetDateTime, original_seen: bool| async move {
            store::look_later(&self.pool, image.id, at, original_seen)
                .await
                .map(|()| Settled::Waiting)
                .map_err(|e| e.to_string())
        };
        // What Valkey knows first: it costs no S3 request.
        let guard = self
            .guard
            .clone()
            .state(image.id)
            .await
            .map_err(|e| e.to_string())?;
        match guard {
            // The body is arriving: its outcome comes by the stream.
            GuardState::Receiving => return later(now + self.every, false).await,
            // Its job or its result is (or was) on a stream: only a loss brings a look.
            GuardState::Queued | GuardState::Spent => {
                return later(expiry.max(now + self.every), false).await;
            }
            GuardState::Free if expiring && backlog => return later(now + self.every, false).await,
            GuardState::Free => {}
        }
        // Soon after an upload began, and it did not queue a job: only a stored original says
        // it was accepted (its result record cannot exist without a job).
        let full = expiring || image.swept;
        if full && let Some(settled) = self.record(image).await? {
            return Ok(settled);
        }
        let original = image.original_seen || {
            self.metrics.reconciler_s3_requests.inc();
            self.bucket
                .exists(&original_key(&image.storage_key))
                .await
                .map_err(|e| e.to_string())?
        };
        if original {
            self.requeue(image).await?;
            later(expiry.max(now + self.every), true).await?;
            return Ok(Settled::Requeued);
        }
        if !expiring {
            return later(expiry, false).await;
        }
        self.expire(image).await
    }

    /// The image's result record, applied if there is one (`None`: there is none).
    async fn record(&self, image: &Unsettled) -> Result<Option<Settled>, String> {
        self.metrics.reconciler_s3_requests.inc();
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
                Ok(Some(match applied.first() {
                    Some(Applied::Processed { .. } | Applied::Failed { .. }) => Settled::Recovered,
                    _ => Settled::Waiting,
                }))
            }
            Record::Corrupt(reason) => {
                tracing::error!(image_id = %image.id, %reason, "a result record cannot be applied");
                // Operators' matter: looked at again only after the next loss of Valkey data.
                let never = OffsetDateTime::now_utc() + Duration::from_secs(365 * 24 * 3600);
                store::look_later(&self.pool, image.id, never, false)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Some(Settled::Waiting))
            }
            Record::Missing => Ok(None),
        }
    }

    async fn requeue(&self, image: &Unsettled) -> Result<(), String> {
        let job = Job {
            image_id: image.id,
            storage_key: image.storage_key.clone(),
            content_type: image.content_type.clone(),
            owner: image.owner.clone(),
            accepted_at: OffsetDateTime::now_utc(),
            sha256: None,
        };
        self.producer
            .clone()
            .enqueue(&job, REQUEUED_GUARD)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(image_id = %image.id, "an original without a job: queued again");
        Ok(())
    }

    async fn expire(&self, image: &Unsettled) -> Result<Settled, String> {
        let Some(expired) = store::expire(&self.pool, image.id, self.grace)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(Settled::Waiting);
        };
        tracing::info!(image_id = %image.id, "image expired: nothing uploaded before its token ran out");
        let committed = Committed {
            image_id: expired.id,
            image: views::image(&expired, None),
            route_ready: false,
        };
        if let Err(e) = self.announcer.clone().announce(committed).await {
            tracing::debug!(error = %e, "announcing an expiry failed");
        }
        Ok(Settled::Expired)
    }
}
