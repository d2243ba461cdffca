//! Applying results to PostgreSQL: the `image:result` consumer's handler, and the reconciler's
//! way in for results recovered from their S3 records. One state machine, in one function
//! ([`apply_in`]), for a batch of any size:
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

use follow_bus::{
    Committed, Delivery, Handler, ImageResult, Outcome, ProgressTracker, ResultOutcome,
};
use follow_service::objects::preview_key;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

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
                image: views::image(image, None, String::new()),
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

/// What an image row says of a result before it is applied.
#[derive(sqlx::FromRow)]
struct Target {
    id: Uuid,
    route_id: Uuid,
    storage_key: String,
}

/// A changed image and whether the change confirms its waypoint.
#[derive(sqlx::FromRow)]
struct Changed {
    #[sqlx(flatten)]
    image: ImageRecord,
}

/// The state machine over `batch`, on `conn` (inside a transaction): what each result asks
/// ([`classify`], pure), the changes in one set of statements ([`store`]), and what each result
/// did ([`outcomes`], pure).
async fn apply_in(
    conn: &mut PgConnection,
    batch: &[(&str, &ImageResult)],
) -> Result<Vec<Applied>, sqlx::Error> {
    let ids: Vec<Uuid> = batch.iter().map(|(_, r)| r.image_id).collect();
    let targets: Vec<Target> =
        sqlx::query_as("SELECT id, route_id, storage_key FROM image.images WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut *conn)
            .await?;
    let asked = classify(batch, &targets)?;
    let stored = store(conn, &targets, &asked).await?;
    Ok(outcomes(batch, &asked.refused, stored))
}

/// What a batch asks of the database: the first result of each known image, as columns of
/// changes; results naming other objects refused.
#[derive(Default)]
struct Asked {
    processed: ProcessedColumns,
    failed: FailedColumns,
    refused: Vec<(Uuid, String)>,
}

fn classify(batch: &[(&str, &ImageResult)], targets: &[Target]) -> Result<Asked, sqlx::Error> {
    let mut asked = Asked::default();
    let mut first = HashSet::new();
    for (entry, result) in batch {
        let id = result.image_id;
        if !first.insert(id) {
            continue;
        }
        let Some(target) = targets.iter().find(|t| t.id == id) else {
            continue;
        };
        match &result.outcome {
            ResultOutcome::Processed(p) => {
                if p.storage_key != target.storage_key {
                    asked.refused.push((
                        id,
                        "poison: the result's storage_key is not the image's".into(),
                    ));
                } else if p.preview_key != preview_key(&target.storage_key) {
                    asked.refused.push((
                        id,
                        "poison: the result's preview_key is not the image's".into(),
                    ));
                } else {
                    asked.processed.push(id, entry, p)?;
                }
            }
            ResultOutcome::Failed(f) => asked.failed.push(id, entry, f),
        }
    }
    Ok(asked)
}

/// What the statements changed: the images, and the routes that became READY.
struct Stored {
    processed: Vec<Changed>,
    failed: Vec<Changed>,
    ready: HashSet<Uuid>,
}

/// Locks the routes `targets` belong to (in one order), moves the images, their waypoints and
/// the routes whose every waypoint is confirmed.
async fn store(
    conn: &mut PgConnection,
    targets: &[Target],
    asked: &Asked,
) -> Result<Stored, sqlx::Error> {
    let (processed, failed) = (&asked.processed, &asked.failed);
    // Every route this batch may touch, locked in one order before any of its waypoints moves.
    let mut routes: Vec<Uuid> = targets.iter().map(|t| t.route_id).collect();
    routes.sort_unstable();
    routes.dedup();
    sqlx::query("SELECT id FROM route.routes WHERE id = ANY($1) ORDER BY id FOR NO KEY UPDATE")
        .bind(&routes)
        .execute(&mut *conn)
        .await?;
    let processed_rows = processed.update(conn).await?;
    let failed_rows = failed.update(conn).await?;
    settle_waypoints(conn, &processed_rows, &failed_rows).await?;
    let candidates: Vec<Uuid> = processed_rows.iter().map(|c| c.image.route_id).collect();
    let ready = ready_routes(conn, &candidates).await?;
    Ok(Stored {
        processed: processed_rows,
        failed: failed_rows,
        ready: ready.into_iter().collect(),
    })
}

/// Each changed image's waypoint, CONFIRMED or FAILED with it. Only the waypoint's current
/// image speaks for it: a late result for a replaced image (after `ReissueUpload`) updates that
/// image alone.
async fn settle_waypoints(
    conn: &mut PgConnection,
    processed_rows: &[Changed],
    failed_rows: &[Changed],
) -> Result<(), sqlx::Error> {
    let changed = processed_rows
        .iter()
        .map(|c| (&c.image, true))
        .chain(failed_rows.iter().map(|c| (&c.image, false)));
    let (waypoints, images, oks): (Vec<Uuid>, Vec<Uuid>, Vec<bool>) = changed.fold(
        (Vec::new(), Vec::new(), Vec::new()),
        |(mut w, mut i, mut o), (image, ok)| {
            w.push(image.waypoint_id);
            i.push(image.id);
            o.push(ok);
            (w, i, o)
        },
    );
    sqlx::query(
        "UPDATE route.waypoints w
         SET status = CASE WHEN r.ok THEN 'CONFIRMED' ELSE 'FAILED' END::route.waypoint_status,
             updated_at = now()
         FROM unnest($1::uuid[], $2::uuid[], $3::bool[]) AS r(waypoint, image, ok)
         WHERE w.id = r.waypoint AND w.current_image_id = r.image",
    )
    .bind(&waypoints)
    .bind(&images)
    .bind(&oks)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The routes among `candidates` whose every waypoint is CONFIRMED, made READY.
async fn ready_routes(
    conn: &mut PgConnection,
    candidates: &[Uuid],
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE route.routes r SET status = 'READY', updated_at = now()
         WHERE r.id = ANY($1) AND r.status = 'PENDING'
           AND NOT EXISTS (SELECT 1 FROM route.waypoints w
                           WHERE w.route_id = r.id AND w.status <> 'CONFIRMED')
         RETURNING r.id",
    )
    .bind(candidates)
    .fetch_all(&mut *conn)
    .await
}

/// What each result of `batch` did, in batch order.
fn outcomes(
    batch: &[(&str, &ImageResult)],
    refused: &[(Uuid, String)],
    stored: Stored,
) -> Vec<Applied> {
    let Stored {
        processed: processed_rows,
        failed: failed_rows,
        mut ready,
    } = stored;
    // A route is reported ready once, with the last of its images in the batch.
    let mut applied: Vec<Applied> = batch
        .iter()
        .map(|(_, result)| {
            let image_id = result.image_id;
            if let Some(p) = processed_rows.iter().find(|c| c.image.id == image_id) {
                return Applied::Processed {
                    image: p.image.clone(),
                    route_ready: false,
                };
            }
            if let Some(f) = failed_rows.iter().find(|c| c.image.id == image_id) {
                return Applied::Failed {
                    image: f.image.clone(),
                };
            }
            match refused.iter().find(|(id, _)| *id == image_id) {
                Some((_, reason)) => Applied::Refused {
                    image_id,
                    reason: reason.clone(),
                },
                None => Applied::Ignored { image_id },
            }
        })
        .collect();
    // Each image takes its change once: later results of the same image in the batch are
    // duplicates.
    let mut seen = HashSet::new();
    for a in &mut applied {
        let duplicate = match a {
            Applied::Processed { image, .. } | Applied::Failed { image } => !seen.insert(image.id),
            _ => false,
        };
        if duplicate {
            let image_id = match a {
                Applied::Processed { image, .. } | Applied::Failed { image } => image.id,
                _ => continue,
            };
            *a = Applied::Ignored { image_id };
        }
    }
    for a in applied.iter_mut().rev() {
        if let Applied::Processed { image, route_ready } = a {
            *route_ready = ready.remove(&image.route_id);
        }
    }
    applied
}

#[derive(Default)]
struct ProcessedColumns {
    ids: Vec<Uuid>,
    entries: Vec<String>,
    sha256: Vec<String>,
    preview_keys: Vec<String>,
    widths: Vec<i32>,
    heights: Vec<i32>,
    processed_widths: Vec<i32>,
    processed_heights: Vec<i32>,
    byte_sizes: Vec<i64>,
}

impl ProcessedColumns {
    /// PENDING images (or EXPIRED ones their waypoint still points at) made PROCESSED.
    async fn update(&self, conn: &mut PgConnection) -> Result<Vec<Changed>, sqlx::Error> {
        sqlx::query_as(concat!(
            "UPDATE image.images i
         SET status = 'PROCESSED', result_entry_id = r.entry, sha256 = r.sha256,
             preview_key = r.preview_key, width = r.width, height = r.height,
             processed_width = r.pw, processed_height = r.ph, byte_size = r.bytes,
             error_code = NULL, error_message = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                     $7::int[], $8::int[], $9::int8[])
              AS r(id, entry, sha256, preview_key, width, height, pw, ph, bytes)
         WHERE i.id = r.id
           AND (i.status = 'PENDING'
                OR (i.status = 'EXPIRED' AND EXISTS (
                        SELECT 1 FROM route.waypoints w
                        WHERE w.id = i.waypoint_id AND w.current_image_id = i.id)))
         RETURNING ",
            image_columns!()
        ))
        .bind(&self.ids)
        .bind(&self.entries)
        .bind(&self.sha256)
        .bind(&self.preview_keys)
        .bind(&self.widths)
        .bind(&self.heights)
        .bind(&self.processed_widths)
        .bind(&self.processed_heights)
        .bind(&self.byte_sizes)
        .fetch_all(&mut *conn)
        .await
    }

    fn push(
        &mut self,
        id: Uuid,
        entry: &str,
        p: &follow_bus::Processed,
    ) -> Result<(), sqlx::Error> {
        let int = |v: u32| i32::try_from(v).map_err(|e| sqlx::Error::Encode(Box::new(e)));
        self.widths.push(int(p.width)?);
        self.heights.push(int(p.height)?);
        self.processed_widths.push(int(p.processed_width)?);
        self.processed_heights.push(int(p.processed_height)?);
        self.byte_sizes
            .push(i64::try_from(p.byte_size).map_err(|e| sqlx::Error::Encode(Box::new(e)))?);
        self.ids.push(id);
        self.entries.push(entry.to_owned());
        self.sha256.push(p.sha256.clone());
        self.preview_keys.push(p.preview_key.clone());
        Ok(())
    }
}

#[derive(Default)]
struct FailedColumns {
    ids: Vec<Uuid>,
    entries: Vec<String>,
    codes: Vec<&'static str>,
    messages: Vec<String>,
}

impl FailedColumns {
    /// PENDING images made FAILED.
    async fn update(&self, conn: &mut PgConnection) -> Result<Vec<Changed>, sqlx::Error> {
        sqlx::query_as(concat!(
            "UPDATE image.images i
         SET status = 'FAILED', result_entry_id = r.entry, error_code = r.code,
             error_message = r.message, updated_at = now()
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS r(id, entry, code, message)
         WHERE i.id = r.id AND i.status = 'PENDING'
         RETURNING ",
            image_columns!()
        ))
        .bind(&self.ids)
        .bind(&self.entries)
        .bind(&self.codes)
        .bind(&self.messages)
        .fetch_all(&mut *conn)
        .await
    }

    fn push(&mut self, id: Uuid, entry: &str, f: &follow_bus::Failure) {
        self.ids.push(id);
        self.entries.push(entry.to_owned());
        self.codes.push(f.code.as_str());
        self.messages.push(f.message.clone());
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
