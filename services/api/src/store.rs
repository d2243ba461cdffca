//! Every SQL statement of the RPCs and the reconciler (the result applier's are in
//! [`crate::results`]): routes with their waypoints and current images, ownership built into
//! every read (another user's rows are simply not found), keyset pagination, publishing,
//! reissue, and the reconciler's leases and expiry. Statuses are the database's enums as Rust
//! enums, rows are named structs, and no statement is assembled at run time.

use follow_bus::OutputFile;
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "route.route_status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RouteStatus {
    Pending,
    Ready,
    Published,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(
    type_name = "route.waypoint_status",
    rename_all = "SCREAMING_SNAKE_CASE"
)]
pub enum WaypointStatus {
    Pending,
    Confirmed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type)]
#[sqlx(type_name = "image.image_status", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ImageStatus {
    Pending,
    Processed,
    Failed,
    Expired,
}

impl ImageStatus {
    pub fn is_final(self) -> bool {
        self != Self::Pending
    }
}

#[derive(Debug, Clone)]
pub struct RouteRecord {
    pub id: Uuid,
    pub owner: String,
    pub name: String,
    pub status: RouteStatus,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
    pub published_at: Option<OffsetDateTime>,
    pub waypoints: Vec<WaypointRecord>,
}

#[derive(Debug, Clone)]
pub struct WaypointRecord {
    pub id: Uuid,
    pub position: i32,
    pub marker_x: f64,
    pub marker_y: f64,
    pub status: WaypointStatus,
    pub image: ImageRecord,
}

/// One row of `image.images`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ImageRecord {
    pub id: Uuid,
    pub route_id: Uuid,
    pub waypoint_id: Uuid,
    pub status: ImageStatus,
    pub content_type: String,
    pub declared_size: i64,
    pub storage_key: String,
    pub preview_key: Option<String>,
    pub sha256: Option<String>,
    pub width: Option<i32>,
    pub height: Option<i32>,
    pub processed_width: Option<i32>,
    pub processed_height: Option<i32>,
    pub byte_size: Option<i64>,
    /// The preview's ThumbHash, once processed (none for images processed before it existed).
    pub thumbhash: Option<Vec<u8>>,
    /// Every stored file, once processed (none for images processed before the list existed).
    pub files: Option<sqlx::types::Json<Vec<OutputFile>>>,
    /// The names of the kinds of metadata stripped (`follow_bus::MetadataKind`), once processed.
    pub stripped_metadata: Option<Vec<String>>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The columns of [`ImageRecord`], of `image.images` aliased `i`: a literal, for `concat!`.
macro_rules! image_columns {
    () => {
        "i.id, i.route_id, i.waypoint_id, i.status, i.content_type, i.declared_size, \
         i.storage_key, i.preview_key, i.sha256, i.width, i.height, i.processed_width, \
         i.processed_height, i.byte_size, i.thumbhash, i.files, i.stripped_metadata, \
         i.error_code, i.error_message, \
         i.expires_at, i.created_at, i.updated_at"
    };
}
pub(crate) use image_columns;

/// One waypoint and its first image, as created.
#[derive(Debug, Clone)]
pub struct NewWaypoint {
    pub id: Uuid,
    pub marker_x: f64,
    pub marker_y: f64,
    pub image: NewImage,
}

#[derive(Debug, Clone)]
pub struct NewImage {
    pub id: Uuid,
    pub content_type: String,
    pub declared_size: i64,
    pub storage_key: String,
    pub expires_at: OffsetDateTime,
    /// When the reconciler first looks at it.
    pub next_check_at: OffsetDateTime,
}

/// The route `owner` created with `request_id`, if any.
pub async fn route_by_request(
    conn: &mut PgConnection,
    owner: &str,
    request_id: &str,
) -> Result<Option<Uuid>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM route.routes WHERE owner = $1 AND request_id = $2")
        .bind(owner)
        .bind(request_id)
        .fetch_optional(conn)
        .await
}

/// Inserts a route, its waypoints and their images. `Ok(false)` when `owner` already has a
/// route with `request_id` (a concurrent retry won): nothing was inserted.
pub async fn insert_route(
    conn: &mut PgConnection,
    route_id: Uuid,
    owner: &str,
    request_id: &str,
    name: &str,
    waypoints: &[NewWaypoint],
) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO route.routes (id, owner, name, request_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (owner, request_id) DO NOTHING",
    )
    .bind(route_id)
    .bind(owner)
    .bind(name)
    .bind(request_id)
    .execute(&mut *conn)
    .await?;
    if inserted.rows_affected() == 0 {
        return Ok(false);
    }
    // Columns as arrays: two statements for any number of waypoints.
    let positions: Vec<i32> = (0..).take(waypoints.len()).collect();
    let ids: Vec<Uuid> = waypoints.iter().map(|w| w.id).collect();
    let xs: Vec<f64> = waypoints.iter().map(|w| w.marker_x).collect();
    let ys: Vec<f64> = waypoints.iter().map(|w| w.marker_y).collect();
    let image_ids: Vec<Uuid> = waypoints.iter().map(|w| w.image.id).collect();
    sqlx::query(
        "INSERT INTO route.waypoints (id, route_id, position, marker_x, marker_y, current_image_id)
         SELECT id, $2, position, x, y, image_id
         FROM unnest($1::uuid[], $3::int[], $4::float8[], $5::float8[], $6::uuid[])
              AS w(id, position, x, y, image_id)",
    )
    .bind(&ids)
    .bind(route_id)
    .bind(&positions)
    .bind(&xs)
    .bind(&ys)
    .bind(&image_ids)
    .execute(&mut *conn)
    .await?;
    let images: Vec<&NewImage> = waypoints.iter().map(|w| &w.image).collect();
    insert_images(conn, route_id, &ids, &images).await?;
    Ok(true)
}

async fn insert_images(
    conn: &mut PgConnection,
    route_id: Uuid,
    waypoint_ids: &[Uuid],
    images: &[&NewImage],
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = images.iter().map(|i| i.id).collect();
    let types: Vec<&str> = images.iter().map(|i| i.content_type.as_str()).collect();
    let sizes: Vec<i64> = images.iter().map(|i| i.declared_size).collect();
    let keys: Vec<&str> = images.iter().map(|i| i.storage_key.as_str()).collect();
    let expiries: Vec<OffsetDateTime> = images.iter().map(|i| i.expires_at).collect();
    let checks: Vec<OffsetDateTime> = images.iter().map(|i| i.next_check_at).collect();
    sqlx::query(
        "INSERT INTO image.images (id, route_id, waypoint_id, content_type, declared_size,
                                   storage_key, expires_at, next_check_at)
         SELECT id, $2, waypoint_id, content_type, size, key, expires_at, next_check_at
         FROM unnest($1::uuid[], $3::uuid[], $4::text[], $5::int8[], $6::text[],
                     $7::timestamptz[], $8::timestamptz[])
              AS i(id, waypoint_id, content_type, size, key, expires_at, next_check_at)",
    )
    .bind(&ids)
    .bind(route_id)
    .bind(waypoint_ids)
    .bind(&types)
    .bind(&sizes)
    .bind(&keys)
    .bind(&expiries)
    .bind(&checks)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    id: Uuid,
    owner: String,
    name: String,
    status: RouteStatus,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    published_at: Option<OffsetDateTime>,
}

/// A waypoint joined with its current image; its own columns are renamed apart from the
/// image's (`id`, `status`).
#[derive(sqlx::FromRow)]
struct WaypointRow {
    waypoint_id_: Uuid,
    position: i32,
    marker_x: f64,
    marker_y: f64,
    waypoint_status_: WaypointStatus,
    #[sqlx(flatten)]
    image: ImageRecord,
}

/// `owner`'s routes among `ids`, in the order of `ids`, with waypoints and current images.
pub async fn routes(
    conn: &mut PgConnection,
    owner: &str,
    ids: &[Uuid],
) -> Result<Vec<RouteRecord>, sqlx::Error> {
    let rows: Vec<RouteRow> = sqlx::query_as(
        "SELECT id, owner, name, status, created_at, updated_at, published_at
         FROM route.routes WHERE owner = $1 AND id = ANY($2)",
    )
    .bind(owner)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let found: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let waypoints: Vec<WaypointRow> = sqlx::query_as(concat!(
        "SELECT w.id AS waypoint_id_, w.position, w.marker_x, w.marker_y,
                w.status AS waypoint_status_, ",
        image_columns!(),
        " FROM route.waypoints w JOIN image.images i ON i.id = w.current_image_id
         WHERE w.route_id = ANY($1)
         ORDER BY w.route_id, w.position"
    ))
    .bind(&found)
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids
        .iter()
        .filter_map(|id| rows.iter().find(|r| r.id == *id))
        .map(|row| RouteRecord {
            id: row.id,
            owner: row.owner.clone(),
            name: row.name.clone(),
            status: row.status,
            created_at: row.created_at,
            updated_at: row.updated_at,
            published_at: row.published_at,
            waypoints: waypoints
                .iter()
                .filter(|w| w.image.route_id == row.id)
                .map(|w| WaypointRecord {
                    id: w.waypoint_id_,
                    position: w.position,
                    marker_x: w.marker_x,
                    marker_y: w.marker_y,
                    status: w.waypoint_status_,
                    image: w.image.clone(),
                })
                .collect(),
        })
        .collect())
}

pub async fn route(
    conn: &mut PgConnection,
    owner: &str,
    id: Uuid,
) -> Result<Option<RouteRecord>, sqlx::Error> {
    Ok(routes(conn, owner, &[id]).await?.pop())
}

/// Where a page of `ListRoutes` starts: after this route in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct PageKey {
    pub created_at: OffsetDateTime,
    pub id: Uuid,
}

/// Up to `limit` of `owner`'s routes, newest first, after `after`.
pub async fn route_page(
    conn: &mut PgConnection,
    owner: &str,
    after: Option<PageKey>,
    limit: i64,
) -> Result<Vec<PageKey>, sqlx::Error> {
    sqlx::query_as(
        "SELECT created_at, id FROM route.routes
         WHERE owner = $1 AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3))
         ORDER BY created_at DESC, id DESC
         LIMIT $4",
    )
    .bind(owner)
    .bind(after.map(|a| a.created_at))
    .bind(after.map(|a| a.id))
    .bind(limit)
    .fetch_all(conn)
    .await
}

/// READY → PUBLISHED. `Ok(false)` when the route was not READY (or not `owner`'s).
pub async fn publish(conn: &mut PgConnection, owner: &str, id: Uuid) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE route.routes SET status = 'PUBLISHED', published_at = now(), updated_at = now()
         WHERE id = $1 AND owner = $2 AND status = 'READY'",
    )
    .bind(id)
    .bind(owner)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// `owner`'s waypoint with its current image, locked for a reissue.
pub async fn waypoint_for_update(
    conn: &mut PgConnection,
    owner: &str,
    waypoint_id: Uuid,
) -> Result<Option<ImageRecord>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        image_columns!(),
        " FROM route.waypoints w
         JOIN route.routes r ON r.id = w.route_id
         JOIN image.images i ON i.id = w.current_image_id
         WHERE w.id = $1 AND r.owner = $2
         FOR UPDATE OF w"
    ))
    .bind(waypoint_id)
    .bind(owner)
    .fetch_optional(conn)
    .await
}

/// A new current image for a waypoint, which becomes PENDING again.
pub async fn reissue(
    conn: &mut PgConnection,
    route_id: Uuid,
    waypoint_id: Uuid,
    image: &NewImage,
) -> Result<ImageRecord, sqlx::Error> {
    insert_images(conn, route_id, &[waypoint_id], &[image]).await?;
    sqlx::query(
        "UPDATE route.waypoints SET current_image_id = $2, status = 'PENDING', updated_at = now()
         WHERE id = $1",
    )
    .bind(waypoint_id)
    .bind(image.id)
    .execute(&mut *conn)
    .await?;
    sqlx::query_as(concat!(
        "SELECT ",
        image_columns!(),
        " FROM image.images i WHERE i.id = $1"
    ))
    .bind(image.id)
    .fetch_one(conn)
    .await
}

/// `owner`'s images among `ids` (any order; unknown and others' are left out).
pub async fn images(
    conn: &mut PgConnection,
    owner: &str,
    ids: &[Uuid],
) -> Result<Vec<ImageRecord>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        image_columns!(),
        " FROM image.images i JOIN route.routes r ON r.id = i.route_id
         WHERE i.id = ANY($1) AND r.owner = $2"
    ))
    .bind(ids)
    .bind(owner)
    .fetch_all(conn)
    .await
}

/// A PENDING image the reconciler looks at, with what a job for it needs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unsettled {
    pub id: Uuid,
    pub storage_key: String,
    pub content_type: String,
    pub owner: String,
    pub expires_at: OffsetDateTime,
    /// A look found its original in S3 already (it stays there until the image is processed).
    pub original_seen: bool,
    /// Made due by a sweep: Valkey may have lost its job or its result.
    pub swept: bool,
}

/// Leases up to `limit` PENDING images due for a look, pushing their next look `lease` later
/// (the look sets the one after): instances running the reconciler at once take different
/// images, and an image whose look was cut short is looked at again.
pub async fn lease_unsettled(
    pool: &PgPool,
    lease: std::time::Duration,
    limit: i64,
) -> Result<Vec<Unsettled>, sqlx::Error> {
    sqlx::query_as(
        "UPDATE image.images i
         SET next_check_at = now() + make_interval(secs => $1)
         FROM route.routes r
         WHERE r.id = i.route_id
           AND i.id IN (SELECT id FROM image.images
                        WHERE status = 'PENDING' AND next_check_at <= now()
                        ORDER BY next_check_at LIMIT $2
                        FOR UPDATE SKIP LOCKED)
         RETURNING i.id, i.storage_key, i.content_type, r.owner, i.expires_at, i.original_seen,
                   i.swept",
    )
    .bind(lease.as_secs_f64())
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// After a look at a PENDING image: when the next one is due, and whether its original is
/// known to be in S3.
pub async fn look_later(
    pool: &PgPool,
    id: Uuid,
    at: OffsetDateTime,
    original_seen: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE image.images
         SET next_check_at = $2, original_seen = original_seen OR $3, swept = false
         WHERE id = $1 AND status = 'PENDING'",
    )
    .bind(id)
    .bind(at)
    .bind(original_seen)
    .execute(pool)
    .await
    .map(drop)
}

/// Brings the next look at `ids` (images whose upload began) forward to `after` from now, where
/// it is later than that.
pub async fn look_soon(
    pool: &PgPool,
    ids: &[Uuid],
    after: std::time::Duration,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE image.images SET next_check_at = now() + make_interval(secs => $2)
         WHERE id = ANY($1) AND status = 'PENDING'
           AND next_check_at > now() + make_interval(secs => $2)",
    )
    .bind(ids)
    .bind(after.as_secs_f64())
    .execute(pool)
    .await
    .map(drop)
}

/// After Valkey may have lost data, the trouble being over at `over`: makes every PENDING image
/// due for a look now, unless an instance did since `over`; returns how many it made due
/// (`None` when another instance swept already).
pub async fn sweep(pool: &PgPool, over: OffsetDateTime) -> Result<Option<u64>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let won = sqlx::query("UPDATE image.reconcile_sweeps SET swept_at = now() WHERE swept_at < $1")
        .bind(over)
        .execute(&mut *tx)
        .await?
        .rows_affected()
        == 1;
    if !won {
        return Ok(None);
    }
    let due = sqlx::query(
        "UPDATE image.images SET next_check_at = now(), swept = true
         WHERE status = 'PENDING'",
    )
    .execute(&mut *tx)
    .await?
    .rows_affected();
    tx.commit().await?;
    Ok(Some(due))
}

/// Expires `id` if it is still PENDING and its token expired more than `grace` ago; its waypoint
/// (where it is still the current image) fails. The expired row, if it was.
pub async fn expire(
    pool: &PgPool,
    id: Uuid,
    grace: std::time::Duration,
) -> Result<Option<ImageRecord>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let expired: Option<ImageRecord> = sqlx::query_as(concat!(
        "UPDATE image.images i SET status = 'EXPIRED', error_code = 'TOKEN_EXPIRED',
                error_message = 'the upload token expired before an image was uploaded',
                updated_at = now()
         WHERE i.id = $1 AND i.status = 'PENDING'
           AND i.expires_at < now() - make_interval(secs => $2)
         RETURNING ",
        image_columns!()
    ))
    .bind(id)
    .bind(grace.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    if expired.is_some() {
        sqlx::query(
            "UPDATE route.waypoints SET status = 'FAILED', updated_at = now()
             WHERE current_image_id = $1",
        )
        .bind(id)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(expired)
}
