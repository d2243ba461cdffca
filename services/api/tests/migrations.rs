//! The database schema (`migrations/`) against a real PostgreSQL: it applies, holds the
//! invariants the API relies on, and reverts cleanly.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use common::{insert_route, migrated};
use follow_api::MIGRATOR;
use uuid::Uuid;

#[tokio::test]
async fn applies_once_and_keeps_markers_bit_for_bit() {
    let (_pg, pool) = migrated().await;
    MIGRATOR.run(&pool).await.unwrap(); // idempotent

    let (x, y) = (0.123_456_789_012_345_67_f64, 1.0 - f64::EPSILON);
    insert_route(&pool, "alice", "req-1", &[(x, y)])
        .await
        .unwrap();
    let (gx, gy): (f64, f64) = sqlx::query_as("SELECT marker_x, marker_y FROM route.waypoints")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!((gx.to_bits(), gy.to_bits()), (x.to_bits(), y.to_bits()));
    // Bounds are inclusive.
    insert_route(&pool, "alice", "req-2", &[(0.0, 1.0)])
        .await
        .unwrap();
}

#[tokio::test]
async fn refuses_markers_outside_the_unit_square_and_nan() {
    let (_pg, pool) = migrated().await;
    for (i, (x, y)) in [
        (1.000_000_1, 0.5),
        (-0.000_001, 0.5),
        (0.5, 2.0),
        (f64::NAN, 0.5),
        (0.5, f64::INFINITY),
    ]
    .into_iter()
    .enumerate()
    {
        let err = insert_route(&pool, "alice", &format!("req-{i}"), &[(x, y)])
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("check constraint"),
            "({x}, {y}): {err}"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM route.routes")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(count, 0, "nothing half-created");
}

#[tokio::test]
async fn one_request_id_per_owner() {
    let (_pg, pool) = migrated().await;
    insert_route(&pool, "alice", "same", &[(0.5, 0.5)])
        .await
        .unwrap();
    insert_route(&pool, "bob", "same", &[(0.5, 0.5)])
        .await
        .unwrap();
    let err = insert_route(&pool, "alice", "same", &[(0.5, 0.5)])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("routes_owner_request_id_key"),
        "{err}"
    );
}

#[tokio::test]
async fn an_image_cannot_be_final_without_its_facts() {
    let (_pg, pool) = migrated().await;
    let image = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap()
        .waypoints[0]
        .1;
    for update in [
        "UPDATE image.images SET status = 'PROCESSED' WHERE id = $1",
        "UPDATE image.images SET status = 'FAILED' WHERE id = $1",
        "UPDATE image.images SET status = 'EXPIRED' WHERE id = $1",
        "UPDATE image.images SET sha256 = 'not-hex' WHERE id = $1",
    ] {
        let err = sqlx::query(update)
            .bind(image)
            .execute(&pool)
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("check constraint"),
            "{update}: {err}"
        );
    }
    sqlx::query(
        "UPDATE image.images SET status = 'PROCESSED', sha256 = $2, preview_key = 'p', width = 4000,
         height = 3000, processed_width = 2048, processed_height = 1536, byte_size = 1 WHERE id = $1",
    )
    .bind(image)
    .bind("ab".repeat(32))
    .execute(&pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn a_waypoint_must_point_at_an_existing_image_by_commit_time() {
    let (_pg, pool) = migrated().await;
    let mut tx = pool.begin().await.unwrap();
    let route = Uuid::new_v4();
    sqlx::query(
        "INSERT INTO route.routes (id, owner, name, request_id) VALUES ($1, 'a', 'r', 'x')",
    )
    .bind(route)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO route.waypoints (id, route_id, position, marker_x, marker_y, current_image_id)
         VALUES ($1, $2, 0, 0.5, 0.5, $3)",
    )
    .bind(Uuid::new_v4())
    .bind(route)
    .bind(Uuid::new_v4())
    .execute(&mut *tx)
    .await
    .unwrap();
    let err = tx.commit().await.unwrap_err();
    assert!(
        err.to_string().contains("waypoints_current_image_fk"),
        "{err}"
    );
}

#[tokio::test]
async fn reverts_cleanly_and_applies_again() {
    let (_pg, pool) = migrated().await;
    insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    MIGRATOR.undo(&pool, 0).await.unwrap();
    let schemas: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name IN ('route', 'image')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(schemas, 0);
    MIGRATOR.run(&pool).await.unwrap();
    insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
}
