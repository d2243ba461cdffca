//! Every SQL statement of the RPCs (the result consumer's are in [`crate::results`]): routes
//! with their waypoints and current images, ownership built into every read (another user's
//! rows are simply not found), keyset pagination, publishing, reissue and expiry.

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteStatus {
    Pending,
    Ready,
    Published,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaypointStatus {
    Pending,
    Confirmed,
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ImageRecord {
    pub id: Uuid,
    pub route_id: Uuid,
    pub waypoint_id: Uuid,
    #[sqlx(try_from = "String")]
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
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub expires_at: OffsetDateTime,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl TryFrom<String> for ImageStatus {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        Ok(match s.as_str() {
            "PENDING" => Self::Pending,
            "PROCESSED" => Self::Processed,
            "FAILED" => Self::Failed,
            "EXPIRED" => Self::Expired,
            other => return Err(format!("unknown image status {other}")),
        })
    }
}

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
}

const IMAGE_COLUMNS: &str = "i.id, i.route_id, i.waypoint_id, i.status::text AS status, \
     i.content_type, i.declared_size, i.storage_key, i.preview_key, i.sha256, i.width, i.height, \
     i.processed_width, i.processed_height, i.byte_size, i.error_code, i.error_message, \
     i.expires_at, i.created_at, i.updated_at";

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
    sqlx::query(
        "INSERT INTO image.images
             (id, route_id, waypoint_id, content_type, declared_size, storage_key, expires_at)
         SELECT id, $2, waypoint_id, content_type, size, key, expires_at
         FROM unnest($1::uuid[], $3::uuid[], $4::text[], $5::int8[], $6::text[], $7::timestamptz[])
              AS i(id, waypoint_id, content_type, size, key, expires_at)",
    )
    .bind(&ids)
    .bind(route_id)
    .bind(waypoint_ids)
    .bind(&types)
    .bind(&sizes)
    .bind(&keys)
    .bind(&expiries)
    .execute(conn)
    .await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct RouteRow {
    id: Uuid,
    owner: String,
    name: String,
    status: String,
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
    waypoint_status_: String,
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
        "SELECT id, owner, name, status::text AS status, created_at, updated_at, published_at
         FROM route.routes WHERE owner = $1 AND id = ANY($2)",
    )
    .bind(owner)
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let found: Vec<Uuid> = rows.iter().map(|r| r.id).collect();
    let query = format!(
        "SELECT w.id AS waypoint_id_, w.position, w.marker_x, w.marker_y,
                w.status::text AS waypoint_status_, {IMAGE_COLUMNS}
         FROM route.waypoints w JOIN image.images i ON i.id = w.current_image_id
         WHERE w.route_id = ANY($1)
         ORDER BY w.route_id, w.position"
    );
    let waypoints: Vec<WaypointRow> = sqlx::query_as(sqlx::AssertSqlSafe(query))
        .bind(&found)
        .fetch_all(&mut *conn)
        .await?;
    let mut routes = Vec::with_capacity(rows.len());
    for id in ids {
        let Some(row) = rows.iter().find(|r| r.id == *id) else {
            continue;
        };
        let waypoints = waypoints
            .iter()
            .filter(|w| w.image.route_id == row.id)
            .map(|w| {
                Ok(WaypointRecord {
                    id: w.waypoint_id_,
                    position: w.position,
                    marker_x: w.marker_x,
                    marker_y: w.marker_y,
                    status: match w.waypoint_status_.as_str() {
                        "PENDING" => WaypointStatus::Pending,
                        "CONFIRMED" => WaypointStatus::Confirmed,
                        "FAILED" => WaypointStatus::Failed,
                        other => return Err(decode_error("waypoint status", other)),
                    },
                    image: w.image.clone(),
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        routes.push(RouteRecord {
            id: row.id,
            owner: row.owner.clone(),
            name: row.name.clone(),
            status: match row.status.as_str() {
                "PENDING" => RouteStatus::Pending,
                "READY" => RouteStatus::Ready,
                "PUBLISHED" => RouteStatus::Published,
                other => return Err(decode_error("route status", other)),
            },
            created_at: row.created_at,
            updated_at: row.updated_at,
            published_at: row.published_at,
            waypoints,
        });
    }
    Ok(routes)
}

fn decode_error(what: &str, value: &str) -> sqlx::Error {
    sqlx::Error::Decode(format!("unknown {what} {value:?}").into())
}

pub async fn route(
    conn: &mut PgConnection,
    owner: &str,
    id: Uuid,
) -> Result<Option<RouteRecord>, sqlx::Error> {
    Ok(routes(conn, owner, &[id]).await?.pop())
}

/// Where a page of `ListRoutes` starts: after this route in newest-first order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageKey {
    pub created_at: OffsetDateTime,
    pub id: Uuid,
}

/// Up to `limit` of `owner`'s route ids, newest first, after `after`.
pub async fn route_page(
    conn: &mut PgConnection,
    owner: &str,
    after: Option<PageKey>,
    limit: i64,
) -> Result<Vec<(Uuid, OffsetDateTime)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, created_at FROM route.routes
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
    let query = format!(
        "SELECT {IMAGE_COLUMNS}
         FROM route.waypoints w
         JOIN route.routes r ON r.id = w.route_id
         JOIN image.images i ON i.id = w.current_image_id
         WHERE w.id = $1 AND r.owner = $2
         FOR UPDATE OF w"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(query))
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
    image_by_id(conn, image.id)
        .await?
        .ok_or(sqlx::Error::RowNotFound)
}

async fn image_by_id(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<ImageRecord>, sqlx::Error> {
    let query = format!("SELECT {IMAGE_COLUMNS} FROM image.images i WHERE i.id = $1");
    sqlx::query_as(sqlx::AssertSqlSafe(query))
        .bind(id)
        .fetch_optional(conn)
        .await
}

/// `owner`'s images among `ids` (any order; unknown and others' are left out).
pub async fn images(
    conn: &mut PgConnection,
    owner: &str,
    ids: &[Uuid],
) -> Result<Vec<ImageRecord>, sqlx::Error> {
    let query = format!(
        "SELECT {IMAGE_COLUMNS}
         FROM image.images i JOIN route.routes r ON r.id = i.route_id
         WHERE i.id = ANY($1) AND r.owner = $2"
    );
    sqlx::query_as(sqlx::AssertSqlSafe(query))
        .bind(ids)
        .bind(owner)
        .fetch_all(conn)
        .await
}

/// Marks PENDING images whose token expired more than `grace` ago as EXPIRED, and their
/// waypoints (where still current) as FAILED, at most `limit` per call. Returns the images.
pub async fn expire_due(
    pool: &PgPool,
    grace: std::time::Duration,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let expired: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE image.images SET status = 'EXPIRED', error_code = 'TOKEN_EXPIRED',
                error_message = 'the upload token expired before an image was processed',
                updated_at = now()
         WHERE id IN (SELECT id FROM image.images
                      WHERE status = 'PENDING' AND expires_at < now() - make_interval(secs => $1)
                      ORDER BY expires_at LIMIT $2
                      FOR UPDATE SKIP LOCKED)
         RETURNING id",
    )
    .bind(grace.as_secs_f64())
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE route.waypoints SET status = 'FAILED', updated_at = now()
         WHERE current_image_id = ANY($1)",
    )
    .bind(&expired)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(expired)
}
