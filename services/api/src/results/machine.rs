//! The state machine over a batch of results, inside one transaction: what each result asks
//! ([`classify`], pure), the changes in one set of statements ([`store`]), and what each result
//! did ([`outcomes`], pure). The rules are in the parent module's doc.

use std::collections::HashSet;

use follow_bus::{ImageResult, ResultOutcome, codec};
use follow_service::objects::preview_key;
use sqlx::PgConnection;
use uuid::Uuid;

use super::Applied;
use crate::store::{ImageRecord, image_columns};

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
pub(super) async fn apply_in(
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
    /// Empty when the result carried none.
    thumbhashes: Vec<Vec<u8>>,
    /// As the result's fields are written (`follow_bus::codec`).
    files: Vec<String>,
    stripped: Vec<String>,
}

impl ProcessedColumns {
    /// PENDING images (or EXPIRED ones their waypoint still points at) made PROCESSED.
    async fn update(&self, conn: &mut PgConnection) -> Result<Vec<Changed>, sqlx::Error> {
        sqlx::query_as(concat!(
            "UPDATE image.images i
         SET status = 'PROCESSED', result_entry_id = r.entry, sha256 = r.sha256,
             preview_key = r.preview_key, width = r.width, height = r.height,
             processed_width = r.pw, processed_height = r.ph, byte_size = r.bytes,
             thumbhash = NULLIF(r.thumbhash, ''::bytea),
             files = NULLIF(r.files, '[]'::jsonb),
             stripped_metadata = string_to_array(r.stripped, ','),
             error_code = NULL, error_message = NULL, updated_at = now()
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::int[],
                     $7::int[], $8::int[], $9::int8[], $10::bytea[], $11::jsonb[], $12::text[])
              AS r(id, entry, sha256, preview_key, width, height, pw, ph, bytes, thumbhash,
                   files, stripped)
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
        .bind(&self.thumbhashes)
        .bind(&self.files)
        .bind(&self.stripped)
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
        self.thumbhashes.push(p.thumbhash.clone());
        self.files.push(codec::files_text(&p.files));
        self.stripped.push(codec::kinds_text(&p.stripped_metadata));
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
