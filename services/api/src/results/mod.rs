//! Applying results to PostgreSQL: the `image:result` consumer's handler, and the reconciler's
//! way in for results recovered from their S3 records. One state machine (`machine`: classify,
//! store, outcomes), for a batch of any size:
//!
//! * a `processed` result takes an image that is PENDING — or EXPIRED while its waypoint still
//!   points at it (a late photo is better than a lost one) — to PROCESSED; a `failed` result
//!   takes a PENDING image to FAILED; anything else (unknown image, already final, replaced)
//!   changes nothing, so redelivered and duplicated results are harmless. Within a batch the
//!   first result of an image wins;
//! * the image's waypoint, if that image is still its current one, becomes CONFIRMED or FAILED;
//! * the route becomes READY when every waypoint is CONFIRMED. The routes a batch touches are
//!   locked first, in one order, so with any number of instances applying at once the last
//!   waypoint's transaction always sees the others' commits: a route is READY exactly when its
//!   last waypoint is confirmed.
//!
//! A `processed` result must name the image's own objects (`storage_key` the row's, `preview_key`
//! derived from it); one that does not is refused as poison and never presigned. When a batch
//! fails for any reason but a passing one, its results are applied again one by one, each in a
//! savepoint: one the database refuses (a constraint or value error) is dead-lettered by itself,
//! one that fails otherwise is counted as a failure (dead-lettered after a few), and the rest
//! commits. A database outage fails the whole batch, which the consumer retries: never
//! dead-lettered.
//!
//! After the commit (and before the acknowledgement) each change is announced on its image's
//! progress channel as a [`Committed`] notice carrying the image as committed and whether its
//! route became READY: watchers on every instance need not read it back. A result for an image
//! that is final already announces it again (its first applier may have died between commit and
//! announcement). Announcing is best effort: a watch whose image reached `done` re-reads it
//! when no announcement follows (see `watch::session`); state is never lost.

use std::{collections::HashSet, sync::Arc, time::Instant};

use follow_bus::{Committed, Delivery, Handler, ImageResult, Outcome, ProgressTracker};
use sqlx::PgPool;
use uuid::Uuid;

mod machine;

use machine::apply_in;

use crate::{
    error::is_transient,
    metrics::{Metrics, ResultLabel},
    store::{ImageRecord, image_columns},
    views,
};

/// What applying one result did.
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    /// The image became PROCESSED; `route_ready` when that made its route READY.
    Processed {
        image: ImageRecord,
        route_ready: bool,
    },
    Failed {
        image: ImageRecord,
    },
    /// Unknown image, or one already final: nothing changed.
    Ignored {
        image_id: Uuid,
    },
    /// The result can never apply (it names other objects, or the database refuses it).
    Refused {
        image_id: Uuid,
        reason: String,
    },
    /// Applying it failed for a reason that may not last (counted: after a few, dead-lettered).
    Errored {
        image_id: Uuid,
        reason: String,
    },
}

impl Applied {
    fn label(&self) -> ResultLabel {
        match self {
            Self::Processed { .. } => ResultLabel::Processed,
            Self::Failed { .. } => ResultLabel::Failed,
            Self::Ignored { .. } => ResultLabel::Ignored,
            Self::Refused { .. } => ResultLabel::Refused,
            Self::Errored { .. } => ResultLabel::Errored,
        }
    }
}

/// Applies results; usable directly or as the consumer's [`Handler`].
#[derive(Debug, Clone)]
pub struct ResultApplier {
    pool: PgPool,
    announcer: Option<ProgressTracker>,
    metrics: Option<Arc<Metrics>>,
}

impl ResultApplier {
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            announcer: None,
            metrics: None,
        }
    }

    /// Announces committed outcomes to watchers through `tracker`.
    pub fn with_announcer(mut self, tracker: ProgressTracker) -> Self {
        self.announcer = Some(tracker);
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Applies `(source, result)` pairs in one transaction (`source`: the stream entry id, or
    /// where a recovered result came from), then announces and counts what changed. `Err` only
    /// for database errors that may pass (nothing was changed then).
    pub async fn apply(&self, batch: &[(&str, &ImageResult)]) -> Result<Vec<Applied>, sqlx::Error> {
        let started = Instant::now();
        let applied = match self.apply_once(batch).await {
            Err(e) if !is_transient(&e) => {
                tracing::warn!(error = %e, "the batch failed; applying its results one by one");
                self.apply_each(batch).await
            }
            other => other,
        }?;
        if let Some(m) = &self.metrics {
            m.apply_seconds.observe(started.elapsed().as_secs_f64());
            for a in &applied {
                m.result(a.label());
            }
        }
        // Committed, not acknowledged: the crash window the end-to-end suite tests.
        follow_service::failpoint("api-results-after-commit");
        self.announce(&applied).await;
        Ok(applied)
    }

    async fn apply_once(
        &self,
        batch: &[(&str, &ImageResult)],
    ) -> Result<Vec<Applied>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let applied = apply_in(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// The same, one result per savepoint, so a refused one is isolated.
    async fn apply_each(
        &self,
        batch: &[(&str, &ImageResult)],
    ) -> Result<Vec<Applied>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Vec::with_capacity(batch.len());
        for one in batch {
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match apply_in(&mut savepoint, std::slice::from_ref(one)).await {
                Ok(outcome) => {
                    savepoint.commit().await?;
                    applied.extend(outcome);
                }
                Err(e) if is_transient(&e) => return Err(e),
                Err(e) => {
                    savepoint.rollback().await?;
                    let (image_id, reason) = (one.1.image_id, e.to_string());
                    applied.push(if is_permanent(&e) {
                        Applied::Refused {
                            image_id,
                            reason: format!("refused by the database: {reason}"),
                        }
                    } else {
                        Applied::Errored { image_id, reason }
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(applied)
    }

    /// Tells watchers (on every instance) about each committed change, all at once, and again
    /// about each image a result came for that is final already: the instance that committed
    /// it may have died before announcing (this result is its redelivery), or its announcement
    /// may have been lost. Watchers never show an event twice, so saying it again is harmless.
    async fn announce(&self, applied: &[Applied]) {
        let Some(tracker) = &self.announcer else {
            return;
        };
        let changed: HashSet<Uuid> = applied
            .iter()
            .filter_map(|a| match a {
                Applied::Processed { image, .. } | Applied::Failed { image } => Some(image.id),
                _ => None,
            })
            .collect();
        let ignored: Vec<Uuid> = applied
            .iter()
            .filter_map(|a| match a {
                Applied::Ignored { image_id } if !changed.contains(image_id) => Some(*image_id),
                _ => None,
            })
            .collect();
        let again = match self.already_final(&ignored).await {
            Ok(again) => again,
            Err(e) => {
                tracing::warn!(error = %e, "could not read final images to announce them again");
                Vec::new()
            }
        };
        let announced = applied.iter().filter_map(|a| match a {
            Applied::Processed { image, route_ready } => Some((image, *route_ready)),
            Applied::Failed { image } => Some((image, false)),
            Applied::Ignored { .. } | Applied::Refused { .. } | Applied::Errored { .. } => None,
        });
        let announced = announced.chain(again.iter().map(|f| (&f.image, f.route_ready)));
        let announcements = announced.map(|(image, route_ready)| {
            let mut tracker = tracker.clone();
            let committed = Committed {
                image_id: image.id,
                image: views::image(image, None),
                route_ready,
            };
            async move {
                let image_id = committed.image_id;
                if let Err(e) = tracker.announce(committed).await {
                    tracing::warn!(%image_id, error = %e, "announcing a committed result failed");
                }
            }
        });
        futures_util::future::join_all(announcements).await;
    }

    /// The images of `ids` that are final, as committed, with whether their route is READY.
    async fn already_final(&self, ids: &[Uuid]) -> Result<Vec<Final>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_as(concat!(
            "SELECT ",
            image_columns!(),
            ", r.status IN ('READY', 'PUBLISHED') AS route_ready
             FROM image.images i JOIN route.routes r ON r.id = i.route_id
             WHERE i.id = ANY($1) AND i.status <> 'PENDING'"
        ))
        .bind(ids)
        .fetch_all(&self.pool)
        .await
    }
}

/// An image already final, and whether its route is READY.
#[derive(sqlx::FromRow)]
struct Final {
    #[sqlx(flatten)]
    image: ImageRecord,
    route_ready: bool,
}

impl Handler<ImageResult> for ResultApplier {
    async fn handle(&mut self, batch: &[Delivery<ImageResult>]) -> Vec<Outcome> {
        let entries: Vec<(&str, &ImageResult)> = batch
            .iter()
            .map(|d| (d.id.0.as_str(), &d.message))
            .collect();
        match self.apply(&entries).await {
            Ok(applied) => applied
                .into_iter()
                .map(|a| match a {
                    Applied::Refused { image_id, reason } => {
                        tracing::error!(%image_id, %reason, "result refused");
                        Outcome::dead_letter(reason)
                    }
                    Applied::Errored { image_id, reason } => {
                        tracing::error!(%image_id, %reason, "applying a result failed");
                        Outcome::Fail(format!("applying failed: {reason}"))
                    }
                    Applied::Ignored { image_id } => {
                        tracing::info!(%image_id, "result for an unknown or final image ignored");
                        Outcome::Ack
                    }
                    Applied::Processed { image, route_ready } => {
                        tracing::info!(image_id = %image.id, route_id = %image.route_id, route_ready, "image processed");
                        Outcome::Ack
                    }
                    Applied::Failed { image } => {
                        tracing::info!(image_id = %image.id, route_id = %image.route_id, "image failed");
                        Outcome::Ack
                    }
                })
                .collect(),
            Err(e) => {
                // Only a transient error reaches here (others are judged result by result).
                tracing::warn!(error = %e, batch = batch.len(), "applying results failed; will retry");
                vec![Outcome::Retry; batch.len()]
            }
        }
    }
}

/// Constraint violations (class 23) and data exceptions (class 22) will fail every time.
fn is_permanent(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("23") || c.starts_with("22")),
        sqlx::Error::Encode(_) => true,
        _ => false,
    }
}
