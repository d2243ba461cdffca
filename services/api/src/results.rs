//! Applying `image:result` entries to PostgreSQL.
//!
//! A batch is applied in one transaction, set-based (a handful of statements whatever its size,
//! which is what makes batching pay), with these effects for each result:
//! * the image moves from PENDING to PROCESSED (facts recorded) or FAILED (code, message); a
//!   result for an image that is unknown or no longer PENDING changes nothing, so redelivered and
//!   duplicated results are harmless;
//! * the image's waypoint, if that image is still its current one, becomes CONFIRMED or FAILED
//!   (its markers are never touched);
//! * the route becomes READY when every waypoint is CONFIRMED.
//!
//! Within a batch the first result of an image wins; later ones are ignored like redeliveries.
//!
//! A result the database refuses (a constraint or value error) can never apply. When the set
//! statements hit one, the batch is applied again result by result, each in a savepoint, so the
//! bad one is dead-lettered alone and the rest of the batch commits. Any other database error (PostgreSQL
//! down) fails the whole batch, which the consumer retries: never dead-lettered.
//!
//! After the commit (and before the acknowledgement) each image that changed is announced on
//! its progress channel ([`Progress::committed`]), so watchers on every instance read the new
//! state; announcing is best effort (a lost announcement delays a watcher until its next resync
//! or reconnect, it never loses state).

use std::{sync::Arc, time::Instant};

use follow_bus::{
    Delivery, Failure, Handler, ImageResult, Outcome, Processed, Progress, ProgressTracker,
    ResultOutcome,
};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::metrics::Metrics;

/// What applying one result did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The image became PROCESSED; `route_ready` when that made its route READY.
    Processed {
        image_id: Uuid,
        route_id: Uuid,
        route_ready: bool,
    },
    Failed {
        image_id: Uuid,
        route_id: Uuid,
    },
    /// Unknown image, or one already final: nothing changed.
    Ignored {
        image_id: Uuid,
    },
    /// The database refuses this result (it is malformed beyond what the codec checks).
    Refused {
        image_id: Uuid,
        reason: String,
    },
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

    /// Tells watchers (on every instance) about each committed outcome, all at once on the
    /// multiplexed connection.
    async fn announce(&self, batch: &[Delivery], applied: &[Applied]) {
        let Some(tracker) = &self.announcer else {
            return;
        };
        let announcements = batch.iter().zip(applied).filter_map(|(delivery, applied)| {
            let failure = match (applied, &delivery.result.outcome) {
                (Applied::Processed { .. }, _) => None,
                (Applied::Failed { .. }, ResultOutcome::Failed(f)) => Some(f.clone()),
                _ => return None,
            };
            let image_id = delivery.result.image_id;
            let mut tracker = tracker.clone();
            Some(async move {
                let progress = Progress::committed(image_id, failure);
                if let Err(e) = tracker.announce(&progress).await {
                    tracing::warn!(%image_id, error = %e, "announcing a committed result failed");
                }
            })
        });
        futures_util::future::join_all(announcements).await;
    }

    /// Applies `batch` in one transaction. `Err` only for database errors that may pass (the
    /// batch then changed nothing).
    pub async fn apply(&self, batch: &[Delivery]) -> Result<Vec<Applied>, sqlx::Error> {
        match self.apply_set(batch).await {
            Err(e) if is_permanent(&e) => {
                tracing::warn!(error = %e, "a result of the batch is refused; applying one by one");
                self.apply_each(batch).await
            }
            other => other,
        }
    }

    /// The fast path: the whole batch in four statements.
    async fn apply_set(&self, batch: &[Delivery]) -> Result<Vec<Applied>, sqlx::Error> {
        let mut first = std::collections::HashSet::new();
        let mut processed = ProcessedColumns::default();
        let mut failed = FailedColumns::default();
        for delivery in batch {
            let (id, entry) = (delivery.result.image_id, delivery.id.0.as_str());
            if !first.insert(id) {
                continue;
            }
            match &delivery.result.outcome {
                ResultOutcome::Processed(p) => processed.push(id, entry, p)?,
                ResultOutcome::Failed(f) => failed.push(id, entry, f),
            }
        }
        let mut tx = self.pool.begin().await?;
        let mut changed: Vec<(Uuid, Uuid, Uuid, bool)> = sqlx::query_as(
            "UPDATE image.images i
             SET status = 'PROCESSED', result_entry_id = r.entry, sha256 = r.sha256,
                 preview_key = r.preview_key, width = r.width, height = r.height,
                 processed_width = r.pw, processed_height = r.ph, byte_size = r.bytes,
                 updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                         $7::int[], $8::int[], $9::int8[])
                  AS r(id, entry, sha256, preview_key, width, height, pw, ph, bytes)
             WHERE i.id = r.id AND i.status = 'PENDING'
             RETURNING i.id, i.route_id, i.waypoint_id, true",
        )
        .bind(&processed.ids)
        .bind(&processed.entries)
        .bind(&processed.sha256)
        .bind(&processed.preview_keys)
        .bind(&processed.widths)
        .bind(&processed.heights)
        .bind(&processed.processed_widths)
        .bind(&processed.processed_heights)
        .bind(&processed.byte_sizes)
        .fetch_all(&mut *tx)
        .await?;
        let failures: Vec<(Uuid, Uuid, Uuid, bool)> = sqlx::query_as(
            "UPDATE image.images i
             SET status = 'FAILED', result_entry_id = r.entry, error_code = r.code,
                 error_message = r.message, updated_at = now()
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS r(id, entry, code, message)
             WHERE i.id = r.id AND i.status = 'PENDING'
             RETURNING i.id, i.route_id, i.waypoint_id, false",
        )
        .bind(&failed.ids)
        .bind(&failed.entries)
        .bind(&failed.codes)
        .bind(&failed.messages)
        .fetch_all(&mut *tx)
        .await?;
        changed.extend(failures);
        // Only the waypoint's current image speaks for it (see `apply_one`).
        sqlx::query(
            "UPDATE route.waypoints w
             SET status = CASE WHEN r.ok THEN 'CONFIRMED' ELSE 'FAILED' END::route.waypoint_status,
                 updated_at = now()
             FROM unnest($1::uuid[], $2::uuid[], $3::bool[]) AS r(waypoint, image, ok)
             WHERE w.id = r.waypoint AND w.current_image_id = r.image",
        )
        .bind(changed.iter().map(|c| c.2).collect::<Vec<_>>())
        .bind(changed.iter().map(|c| c.0).collect::<Vec<_>>())
        .bind(changed.iter().map(|c| c.3).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        let candidates: Vec<Uuid> = changed.iter().filter(|c| c.3).map(|c| c.1).collect();
        let ready: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE route.routes r SET status = 'READY', updated_at = now()
             WHERE r.id = ANY($1) AND r.status = 'PENDING'
               AND NOT EXISTS (SELECT 1 FROM route.waypoints w
                               WHERE w.route_id = r.id AND w.status <> 'CONFIRMED')
             RETURNING r.id",
        )
        .bind(&candidates)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut applied: Vec<Applied> = batch
            .iter()
            .map(|d| {
                let image_id = d.result.image_id;
                // `changed` has each image once: only its first result in the batch takes it.
                match changed.iter().position(|c| c.0 == image_id) {
                    Some(pos) => match changed.swap_remove(pos) {
                        (_, route_id, _, true) => Applied::Processed {
                            image_id,
                            route_id,
                            route_ready: false,
                        },
                        (_, route_id, _, false) => Applied::Failed { image_id, route_id },
                    },
                    None => Applied::Ignored { image_id },
                }
            })
            .collect();
        // A route is reported ready once, with the last of its images in the batch.
        let mut ready: std::collections::HashSet<Uuid> = ready.into_iter().collect();
        for a in applied.iter_mut().rev() {
            if let Applied::Processed {
                route_id,
                route_ready,
                ..
            } = a
            {
                *route_ready = ready.remove(route_id);
            }
        }
        Ok(applied)
    }

    /// The slow path: one savepoint per result, so a refused one is isolated.
    async fn apply_each(&self, batch: &[Delivery]) -> Result<Vec<Applied>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut applied = Vec::with_capacity(batch.len());
        for delivery in batch {
            let mut savepoint = sqlx::Connection::begin(&mut *tx).await?;
            match apply_one(&mut savepoint, &delivery.id.0, &delivery.result).await {
                Ok(outcome) => {
                    savepoint.commit().await?;
                    applied.push(outcome);
                }
                Err(e) if is_permanent(&e) => {
                    savepoint.rollback().await?;
                    applied.push(Applied::Refused {
                        image_id: delivery.result.image_id,
                        reason: e.to_string(),
                    });
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await?;
        Ok(applied)
    }
}

impl Handler for ResultApplier {
    async fn handle(&mut self, batch: &[Delivery]) -> Vec<Outcome> {
        let started = Instant::now();
        let result = self.apply(batch).await;
        if let Some(m) = &self.metrics {
            m.apply_seconds.observe(started.elapsed().as_secs_f64());
        }
        match result {
            Ok(applied) => {
                // Committed, not acknowledged: the crash window the end-to-end suite tests.
                fail::fail_point!("api-results-after-commit");
                self.announce(batch, &applied).await;
                applied
                    .into_iter()
                    .map(|a| {
                        let (label, outcome) = match a {
                            Applied::Refused { image_id, reason } => {
                                tracing::error!(%image_id, %reason, "result refused by the database");
                                let reason = format!("refused by the database: {reason}");
                                ("refused", Outcome::DeadLetter(reason))
                            }
                            Applied::Ignored { image_id } => {
                                tracing::info!(%image_id, "result for an unknown or final image ignored");
                                ("ignored", Outcome::Ack)
                            }
                            Applied::Processed { image_id, route_id, route_ready } => {
                                tracing::info!(%image_id, %route_id, route_ready, "image processed");
                                ("processed", Outcome::Ack)
                            }
                            Applied::Failed { image_id, route_id } => {
                                tracing::info!(%image_id, %route_id, "image failed");
                                ("failed", Outcome::Ack)
                            }
                        };
                        if let Some(m) = &self.metrics {
                            m.result(label);
                        }
                        outcome
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, batch = batch.len(), "applying results failed; will retry");
                vec![Outcome::Retry; batch.len()]
            }
        }
    }
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
    fn push(&mut self, id: Uuid, entry: &str, p: &Processed) -> Result<(), sqlx::Error> {
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
    fn push(&mut self, id: Uuid, entry: &str, f: &Failure) {
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

async fn apply_one(
    conn: &mut PgConnection,
    entry_id: &str,
    result: &ImageResult,
) -> Result<Applied, sqlx::Error> {
    let image_id = result.image_id;
    let updated: Option<(Uuid, Uuid)> = match &result.outcome {
        ResultOutcome::Processed(p) => processed(conn, entry_id, image_id, p).await?,
        ResultOutcome::Failed(f) => failed(conn, entry_id, image_id, f).await?,
    };
    let Some((route_id, waypoint_id)) = updated else {
        return Ok(Applied::Ignored { image_id });
    };
    let is_processed = matches!(result.outcome, ResultOutcome::Processed(_));
    // Only the waypoint's current image speaks for it: a late result for a replaced image
    // (after ReissueUpload) updates that image alone.
    sqlx::query(
        "UPDATE route.waypoints SET status = $3::route.waypoint_status, updated_at = now()
         WHERE id = $1 AND current_image_id = $2",
    )
    .bind(waypoint_id)
    .bind(image_id)
    .bind(if is_processed { "CONFIRMED" } else { "FAILED" })
    .execute(&mut *conn)
    .await?;
    if !is_processed {
        return Ok(Applied::Failed { image_id, route_id });
    }
    let ready = sqlx::query(
        "UPDATE route.routes SET status = 'READY', updated_at = now()
         WHERE id = $1 AND status = 'PENDING'
           AND NOT EXISTS (SELECT 1 FROM route.waypoints
                           WHERE route_id = $1 AND status <> 'CONFIRMED')",
    )
    .bind(route_id)
    .execute(&mut *conn)
    .await?;
    Ok(Applied::Processed {
        image_id,
        route_id,
        route_ready: ready.rows_affected() == 1,
    })
}

async fn processed(
    conn: &mut PgConnection,
    entry_id: &str,
    image_id: Uuid,
    p: &Processed,
) -> Result<Option<(Uuid, Uuid)>, sqlx::Error> {
    let byte_size = i64::try_from(p.byte_size).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query_as(
        "UPDATE image.images
         SET status = 'PROCESSED', sha256 = $3, preview_key = $4, width = $5, height = $6,
             processed_width = $7, processed_height = $8, byte_size = $9,
             result_entry_id = $2, updated_at = now()
         WHERE id = $1 AND status = 'PENDING'
         RETURNING route_id, waypoint_id",
    )
    .bind(image_id)
    .bind(entry_id)
    .bind(&p.sha256)
    .bind(&p.preview_key)
    .bind(i64::from(p.width))
    .bind(i64::from(p.height))
    .bind(i64::from(p.processed_width))
    .bind(i64::from(p.processed_height))
    .bind(byte_size)
    .fetch_optional(conn)
    .await
}

async fn failed(
    conn: &mut PgConnection,
    entry_id: &str,
    image_id: Uuid,
    f: &Failure,
) -> Result<Option<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE image.images
         SET status = 'FAILED', error_code = $3, error_message = $4,
             result_entry_id = $2, updated_at = now()
         WHERE id = $1 AND status = 'PENDING'
         RETURNING route_id, waypoint_id",
    )
    .bind(image_id)
    .bind(entry_id)
    .bind(f.code.as_str())
    .bind(&f.message)
    .fetch_optional(conn)
    .await
}
