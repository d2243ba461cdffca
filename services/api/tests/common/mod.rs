//! Fixtures of the API's database tests: a migrated real PostgreSQL and routes in it.
#![allow(dead_code, unreachable_pub)]

pub mod stack;

use follow_bus::{
    ErrorCode, Failure, ImageResult, MetadataKind, OutputFile, OutputRole, Processed, ResultOutcome,
};
use follow_service::objects;
use follow_testkit::PostgresServer;
use sqlx::PgPool;
use uuid::Uuid;

/// A `processed` outcome naming the objects of `image` of `route` (as the gateway does).
pub fn processed_outcome(route: Uuid, image: Uuid) -> ResultOutcome {
    let storage_key = objects::storage_key(route, image);
    ResultOutcome::Processed(Processed {
        preview_key: objects::preview_key(&storage_key),
        storage_key,
        sha256: "cd".repeat(32),
        content_type: "image/jpeg".into(),
        width: 4000,
        height: 3000,
        processed_width: 2048,
        processed_height: 1536,
        byte_size: 300_000,
        thumbhash: vec![0x1f, 0x08, 0x0a],
        files: vec![
            output(OutputRole::Main, "image/jpeg", 2048, 1536, 300_000),
            output(OutputRole::Preview, "image/jpeg", 320, 240, 20_000),
            output(OutputRole::Main, "image/webp", 2048, 1536, 240_000),
            output(OutputRole::Preview, "image/webp", 320, 240, 16_000),
        ],
        stripped_metadata: vec![MetadataKind::Gps, MetadataKind::CaptureTime],
    })
}

fn output(role: OutputRole, content_type: &str, width: u32, height: u32, bytes: u64) -> OutputFile {
    OutputFile {
        role,
        content_type: content_type.into(),
        width,
        height,
        byte_size: bytes,
    }
}

pub fn failed_outcome(code: ErrorCode) -> ResultOutcome {
    ResultOutcome::Failed(Failure {
        code,
        message: "bad".into(),
    })
}

/// The `processed` result of a pending image, naming its objects as the gateway would.
pub async fn processed_for(pool: &PgPool, image: Uuid) -> ImageResult {
    let route: Uuid = sqlx::query_scalar("SELECT route_id FROM image.images WHERE id = $1")
        .bind(image)
        .fetch_one(pool)
        .await
        .unwrap();
    result(image, processed_outcome(route, image))
}

/// A gateway result for `image_id`, produced now.
pub fn result(image_id: Uuid, outcome: ResultOutcome) -> ImageResult {
    ImageResult {
        image_id,
        outcome,
        produced_at: time::OffsetDateTime::now_utc(),
        processing_ms: 100,
    }
}

pub async fn migrated() -> (PostgresServer, PgPool) {
    let pg = PostgresServer::start().await.unwrap();
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    follow_api::MIGRATOR.run(&pool).await.unwrap();
    (pg, pool)
}

/// A route as `CreateRouteWithWaypoints` leaves it.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: Uuid,
    /// (waypoint id, its pending image id), in order.
    pub waypoints: Vec<(Uuid, Uuid)>,
}

/// A route with one waypoint per marker, each with a pending image, in one transaction.
pub async fn insert_route(
    pool: &PgPool,
    owner: &str,
    request_id: &str,
    markers: &[(f64, f64)],
) -> Result<Route, sqlx::Error> {
    let route = Route {
        id: Uuid::new_v4(),
        waypoints: markers
            .iter()
            .map(|_| (Uuid::new_v4(), Uuid::new_v4()))
            .collect(),
    };
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO route.routes (id, owner, name, request_id) VALUES ($1, $2, 'r', $3)")
        .bind(route.id)
        .bind(owner)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
    for (position, (&(x, y), &(waypoint, image))) in
        markers.iter().zip(&route.waypoints).enumerate()
    {
        sqlx::query(
            "INSERT INTO route.waypoints (id, route_id, position, marker_x, marker_y, current_image_id)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(waypoint)
        .bind(route.id)
        .bind(position as i32)
        .bind(x)
        .bind(y)
        .bind(image)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO image.images (id, route_id, waypoint_id, content_type, declared_size, storage_key, expires_at)
             VALUES ($1, $2, $3, 'image/jpeg', 1000, $4, now() + interval '1 hour')",
        )
        .bind(image)
        .bind(route.id)
        .bind(waypoint)
        .bind(objects::storage_key(route.id, image))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(route)
}

pub async fn route_status(pool: &PgPool, id: Uuid) -> String {
    status(
        pool,
        "SELECT status::text FROM route.routes WHERE id = $1",
        id,
    )
    .await
}

pub async fn waypoint_status(pool: &PgPool, id: Uuid) -> String {
    status(
        pool,
        "SELECT status::text FROM route.waypoints WHERE id = $1",
        id,
    )
    .await
}

pub async fn image_status(pool: &PgPool, id: Uuid) -> String {
    status(
        pool,
        "SELECT status::text FROM image.images WHERE id = $1",
        id,
    )
    .await
}

async fn status(pool: &PgPool, sql: &'static str, id: Uuid) -> String {
    sqlx::query_scalar(sql)
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// What `ReissueUpload` does to the database: a new pending image becomes the waypoint's
/// current one; the old image stays. Returns the new image's id.
pub async fn reissue(pool: &PgPool, route_id: Uuid, waypoint_id: Uuid) -> Uuid {
    let image = Uuid::new_v4();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO image.images (id, route_id, waypoint_id, content_type, declared_size, storage_key, expires_at)
         VALUES ($1, $2, $3, 'image/png', 10, $4, now() + interval '1 hour')",
    )
    .bind(image)
    .bind(route_id)
    .bind(waypoint_id)
    .bind(objects::storage_key(route_id, image))
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE route.waypoints SET current_image_id = $2, status = 'PENDING' WHERE id = $1",
    )
    .bind(waypoint_id)
    .bind(image)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    image
}

/// What the reconciler does to an image nothing was uploaded for: its token expired long ago.
pub async fn expire(pool: &PgPool, image: Uuid) {
    sqlx::query("UPDATE image.images SET expires_at = now() - interval '1 day' WHERE id = $1")
        .bind(image)
        .execute(pool)
        .await
        .unwrap();
    let expired = follow_api::store::expire(pool, image, std::time::Duration::from_secs(300))
        .await
        .unwrap();
    assert!(expired.is_some(), "expired");
}
