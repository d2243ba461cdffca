//! What every RPC shares: the database pool, the bus, keys, and views that join database
//! records with live Valkey state and presigned URLs.

use std::{collections::HashMap, sync::Arc, time::Duration};

use follow_bus::{BusError, Hub, OutputRole, Progress, ProgressTracker, RateLimiter, Stage};
use follow_proto::api::v1 as api;
use follow_service::{
    limits::{Slot, Tally},
    objects,
    s3::Bucket,
};
use follow_token::SigningKey;
use sqlx::{PgPool, Postgres, pool::PoolConnection};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    auth::User,
    breaker::CircuitBreaker,
    error::ApiError,
    metrics::Metrics,
    store::{ImageRecord, ImageStatus, RouteRecord},
    views::{self, LiveStages},
};

/// Settings of the RPCs, from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub gateway_url: String,
    pub upload_token_ttl: Duration,
    pub max_file_size: u64,
    pub heartbeat: Duration,
    /// A watch re-reads images the gateway is done with after this (`FOLLOW_WATCH_RECHECK_SECS`).
    pub recheck: Duration,
    pub preview_url_ttl: Duration,
    /// The grace after a token's expiry before its image, with nothing uploaded, expires.
    pub expiry_grace: Duration,
}

impl Limits {
    /// When a new image's upload token expires, and when the reconciler first looks at it: at
    /// its expiry (earlier only if its upload begins, or Valkey may have lost something).
    pub fn new_image_times(&self) -> (time::OffsetDateTime, time::OffsetDateTime) {
        let expires_at = time::OffsetDateTime::now_utc() + self.upload_token_ttl;
        (expires_at, expires_at + self.expiry_grace)
    }
}

#[derive(Debug)]
pub struct Shared {
    pub pool: PgPool,
    pub progress: ProgressTracker,
    /// In front of every Valkey call an RPC depends on.
    pub breaker: CircuitBreaker,
    pub bucket: Bucket,
    pub signing_key: SigningKey,
    pub limits: Limits,
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
    /// Database work of watch streams takes a permit first: see [`Shared::watch_db`].
    pub watch_db_permits: Semaphore,
    /// Upload tokens issued per user, across instances (`FOLLOW_UPLOAD_TOKENS_PER_MINUTE`).
    pub token_rate: RateLimiter,
    /// Watch streams open per user on this instance (`FOLLOW_MAX_WATCHES_PER_USER`).
    pub watches: Tally,
    pub cancel: CancellationToken,
}

impl Shared {
    /// Runs a watch stream's database `work` on a pooled connection, holding one of
    /// [`Shared::watch_db_permits`]; the work's future is made (and allocated) only then.
    /// Thousands of watches starting at once wait for a permit (a few bytes each) rather than
    /// each inside sqlx's acquire (~14 KiB of future), and never take every connection from the
    /// other RPCs.
    pub async fn watch_db<T, F>(
        &self,
        work: impl FnOnce(PoolConnection<Postgres>) -> F,
    ) -> Result<T, ApiError>
    where
        F: Future<Output = Result<T, ApiError>>,
    {
        let _permit = self
            .watch_db_permits
            .acquire()
            .await
            .map_err(|_| ApiError::Internal("watch database permits closed".into()))?;
        self.metrics.watch_db_reads.inc();
        Box::pin(async {
            let conn = self.pool.acquire().await?;
            work(conn).await
        })
        .await
    }

    /// Charges `user` for `cost` upload tokens about to be issued: `RESOURCE_EXHAUSTED` (with
    /// how long to wait) once the user's rate is spent. Through the circuit breaker: the tokens'
    /// `queued` stages need Valkey anyway.
    pub async fn charge_tokens(&self, user: &User, cost: usize) -> Result<(), ApiError> {
        let Some(probe) = self.breaker.try_call() else {
            return Err(ApiError::BusUnavailable(None));
        };
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let result = self.token_rate.check(&user.0, cost).await;
        probe.record(
            result
                .as_ref()
                .map_or_else(|e| !e.is_unavailable(), |_| true),
        );
        match result.map_err(|e| ApiError::BusUnavailable(Some(e)))? {
            None => Ok(()),
            Some(wait) => {
                tracing::info!(
                    cost,
                    ?wait,
                    "upload tokens refused: the user's rate is spent"
                );
                Err(ApiError::RateLimited(wait))
            }
        }
    }

    /// One of `user`'s watch slots, or `RESOURCE_EXHAUSTED` when all are open.
    pub fn watch_slot(&self, user: &User) -> Result<Slot, ApiError> {
        self.watches.take(&user.0).ok_or_else(|| {
            ApiError::TooManyStreams(format!(
                "you have {} watches open already; close one first",
                self.watches.max()
            ))
        })
    }

    /// Records `reports` in the status hashes through the circuit breaker: fails fast with
    /// `UNAVAILABLE` while it is open.
    pub async fn record_progress(&self, reports: &[Progress]) -> Result<(), ApiError> {
        let Some(probe) = self.breaker.try_call() else {
            return Err(ApiError::BusUnavailable(None));
        };
        let result = self.progress.clone().record_all(reports).await;
        probe.record(result.is_ok());
        result
            .map(|_| ())
            .map_err(|e| ApiError::BusUnavailable(Some(e)))
    }

    /// The live stage of each of `ids` (pending images).
    pub async fn live_stages(&self, ids: &[Uuid]) -> LiveStages {
        if ids.is_empty() {
            return LiveStages::Known(HashMap::new());
        }
        let Some(probe) = self.breaker.try_call() else {
            return LiveStages::Unavailable;
        };
        let reads = ids.iter().map(|id| {
            let mut tracker = self.progress.clone();
            async move { tracker.current(*id).await }
        });
        let result: Result<Vec<_>, BusError> = futures_util::future::try_join_all(reads).await;
        // A decode error is Valkey answering with something odd, not Valkey being down.
        probe.record(
            result
                .as_ref()
                .map_or_else(|e| !e.is_unavailable(), |_| true),
        );
        match result {
            Ok(snapshots) => LiveStages::Known(
                ids.iter()
                    .zip(snapshots)
                    .filter_map(|(id, s)| Some((*id, s?.stage())))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "live stages unavailable");
                LiveStages::Unavailable
            }
        }
    }

    /// Fills the short-lived URLs of a processed image's view: its preview's and each file's
    /// (their objects named from the view's ids, role and type). Presigning is local: no round
    /// trip to S3. A URL that cannot be signed stays empty.
    pub async fn sign(&self, view: &mut api::Image) {
        let (Ok(route), Ok(image)) = (Uuid::try_parse(&view.route_id), Uuid::try_parse(&view.id))
        else {
            return;
        };
        if view.status() != api::ImageStatus::Processed {
            return;
        }
        let storage_key = objects::storage_key(route, image);
        let ttl = self.limits.preview_url_ttl;
        if view.preview_url.is_empty() {
            let key = objects::preview_key(&storage_key);
            view.preview_url = self
                .bucket
                .presigned_get(&key, ttl)
                .await
                .unwrap_or_default();
        }
        for file in view.files.iter_mut().filter(|f| f.url.is_empty()) {
            let Ok(role) = OutputRole::try_from(file.role()) else {
                continue;
            };
            if let Some(key) = objects::output_key(&storage_key, role, &file.content_type) {
                file.url = self
                    .bucket
                    .presigned_get(&key, ttl)
                    .await
                    .unwrap_or_default();
            }
        }
    }

    /// The API message of one image; `live` is its pipeline stage while PENDING.
    pub async fn image_view(&self, image: &ImageRecord, live: Option<Stage>) -> api::Image {
        let mut view = views::image(image, live);
        self.sign(&mut view).await;
        view
    }

    /// The API message of a route, with live stages of its pending images.
    pub async fn route_view(&self, route: &RouteRecord) -> api::Route {
        let pending: Vec<Uuid> = route
            .waypoints
            .iter()
            .filter(|w| w.image.status == ImageStatus::Pending)
            .map(|w| w.image.id)
            .collect();
        let live = self.live_stages(&pending).await;
        let mut view = views::route(route, &live);
        for image in view.waypoints.iter_mut().filter_map(|w| w.image.as_mut()) {
            self.sign(image).await;
        }
        view
    }
}

/// A UUID from a request field, or `INVALID_ARGUMENT` naming the field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}
