//! What every RPC shares: the database pool, the bus, keys, and the views that turn database
//! records plus live Valkey state into API messages.

use std::{sync::Arc, time::Duration};

use follow_bus::{BusError, ErrorCode, Hub, Progress, ProgressTracker, Stage};
use follow_proto::{api::v1 as api, events::v1 as events, prost_types::Timestamp};
use follow_token::SigningKey;
use sqlx::{PgPool, Postgres, pool::PoolConnection};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    auth::Authenticator,
    breaker::CircuitBreaker,
    error::ApiError,
    metrics::Metrics,
    storage::Presigner,
    store::{ImageRecord, ImageStatus, RouteRecord, RouteStatus, WaypointStatus},
};

/// Settings of the RPCs, from [`crate::config::Config`].
#[derive(Debug, Clone)]
pub struct Limits {
    pub gateway_url: String,
    pub upload_token_ttl: Duration,
    pub max_file_size: u64,
    pub heartbeat: Duration,
}

#[derive(Debug)]
pub struct Shared {
    pub pool: PgPool,
    pub auth: Authenticator,
    pub progress: ProgressTracker,
    /// In front of every Valkey call an RPC depends on.
    pub breaker: CircuitBreaker,
    pub presigner: Presigner,
    pub signing_key: SigningKey,
    pub limits: Limits,
    pub hub: Hub,
    pub metrics: Arc<Metrics>,
    /// Database work of watch streams takes a permit first: see [`Shared::watch_db`].
    pub watch_db_permits: Semaphore,
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
        Box::pin(async {
            let conn = self.pool.acquire().await?;
            work(conn).await
        })
        .await
    }

    /// Records `reports` in the status hashes through the circuit breaker: fails fast with
    /// `UNAVAILABLE` while it is open.
    pub async fn record_progress(&self, reports: &[Progress]) -> Result<(), ApiError> {
        if !self.breaker.allow() {
            return Err(ApiError::BusUnavailable(None));
        }
        let result = self.progress.clone().record_all(reports).await;
        self.breaker.record(result.is_ok());
        result
            .map(|_| ())
            .map_err(|e| ApiError::BusUnavailable(Some(e)))
    }

    /// The live stage of pending images: `Queued` where Valkey has none (not uploaded yet, or
    /// the hash expired), `None` for all when Valkey cannot be asked (reads go on without it).
    pub async fn live_stages(&self, ids: &[Uuid]) -> Option<Vec<Option<(Stage, u64)>>> {
        if ids.is_empty() {
            return Some(Vec::new());
        }
        if !self.breaker.allow() {
            return None;
        }
        let reads = ids.iter().map(|id| {
            let mut tracker = self.progress.clone();
            async move { tracker.current(*id).await }
        });
        let result: Result<Vec<_>, BusError> = futures_util::future::try_join_all(reads).await;
        // A decode error is Valkey answering with something odd, not Valkey being down.
        self.breaker.record(
            result
                .as_ref()
                .map_or_else(|e| !e.is_unavailable(), |_| true),
        );
        match result {
            Ok(snapshots) => Some(
                snapshots
                    .into_iter()
                    .map(|s| s.map(|s| (s.stage, s.seq)))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "live stages unavailable");
                None
            }
        }
    }

    /// The API message of one image; `live` is its pipeline stage while PENDING.
    pub async fn image_view(&self, image: &ImageRecord, live: Option<Stage>) -> api::Image {
        let stage = match image.status {
            ImageStatus::Pending => live.map_or(events::Stage::Unspecified, events::Stage::from),
            ImageStatus::Processed => events::Stage::Done,
            ImageStatus::Failed | ImageStatus::Expired => events::Stage::Failed,
        };
        let preview_url = match (image.status, &image.preview_key) {
            (ImageStatus::Processed, Some(key)) => {
                self.presigner.url(key).await.unwrap_or_default()
            }
            _ => String::new(),
        };
        let dim = |v: Option<i32>| v.and_then(|v| u32::try_from(v).ok()).unwrap_or(0);
        api::Image {
            id: image.id.to_string(),
            route_id: image.route_id.to_string(),
            waypoint_id: image.waypoint_id.to_string(),
            status: match image.status {
                ImageStatus::Pending => api::ImageStatus::Pending,
                ImageStatus::Processed => api::ImageStatus::Processed,
                ImageStatus::Failed => api::ImageStatus::Failed,
                ImageStatus::Expired => api::ImageStatus::Expired,
            }
            .into(),
            stage: stage.into(),
            content_type: image.content_type.clone(),
            max_file_size: u64::try_from(image.declared_size).unwrap_or(0),
            width: dim(image.width),
            height: dim(image.height),
            processed_width: dim(image.processed_width),
            processed_height: dim(image.processed_height),
            byte_size: image
                .byte_size
                .and_then(|b| u64::try_from(b).ok())
                .unwrap_or(0),
            sha256: image.sha256.clone().unwrap_or_default(),
            error_code: error_code(image.error_code.as_deref()).into(),
            error_message: image.error_message.clone().unwrap_or_default(),
            preview_url,
            expire_time: Some(timestamp(image.expires_at)),
            create_time: Some(timestamp(image.created_at)),
            update_time: Some(timestamp(image.updated_at)),
        }
    }

    /// The API message of a route, with live stages of its pending images.
    pub async fn route_view(&self, route: &RouteRecord) -> api::Route {
        let pending: Vec<Uuid> = route
            .waypoints
            .iter()
            .filter(|w| w.image.status == ImageStatus::Pending)
            .map(|w| w.image.id)
            .collect();
        let stages = self.live_stages(&pending).await;
        let mut waypoints = Vec::with_capacity(route.waypoints.len());
        for w in &route.waypoints {
            let live = live_stage(&pending, stages.as_deref(), w.image.id);
            waypoints.push(api::Waypoint {
                id: w.id.to_string(),
                route_id: route.id.to_string(),
                position: u32::try_from(w.position).unwrap_or(0),
                marker_x: w.marker_x,
                marker_y: w.marker_y,
                status: match w.status {
                    WaypointStatus::Pending => api::WaypointStatus::Pending,
                    WaypointStatus::Confirmed => api::WaypointStatus::Confirmed,
                    WaypointStatus::Failed => api::WaypointStatus::Failed,
                }
                .into(),
                image: Some(self.image_view(&w.image, live).await),
            });
        }
        api::Route {
            id: route.id.to_string(),
            owner: route.owner.clone(),
            name: route.name.clone(),
            status: match route.status {
                RouteStatus::Pending => api::RouteStatus::Pending,
                RouteStatus::Ready => api::RouteStatus::Ready,
                RouteStatus::Published => api::RouteStatus::Published,
            }
            .into(),
            waypoints,
            create_time: Some(timestamp(route.created_at)),
            update_time: Some(timestamp(route.updated_at)),
            publish_time: route.published_at.map(timestamp),
        }
    }
}

/// The live stage of `id` from [`Shared::live_stages`] over `pending`.
pub fn live_stage(
    pending: &[Uuid],
    stages: Option<&[Option<(Stage, u64)>]>,
    id: Uuid,
) -> Option<Stage> {
    let stages = stages?;
    let index = pending.iter().position(|p| *p == id)?;
    Some(
        stages
            .get(index)
            .copied()
            .flatten()
            .map_or(Stage::Queued, |(s, _)| s),
    )
}

pub fn error_code(code: Option<&str>) -> events::ErrorCode {
    code.and_then(|c| c.parse::<ErrorCode>().ok())
        .map_or(events::ErrorCode::Unspecified, events::ErrorCode::from)
}

pub fn timestamp(t: OffsetDateTime) -> Timestamp {
    Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

/// A UUID from a request field, or `INVALID_ARGUMENT` naming the field.
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(value).map_err(|_| ApiError::invalid(field, "must be a UUID"))
}
