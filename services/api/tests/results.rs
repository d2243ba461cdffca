//! Applying gateway results to a real PostgreSQL: state transitions, idempotency, refusal of
//! what can never apply, and retry (never dead-letter) while the database is down.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use common::*;
use follow_api::results::{Applied, ResultApplier};
use follow_bus::{Delivery, EntryId, ErrorCode, Handler as _, Outcome, Processed, ResultOutcome};
use uuid::Uuid;

fn delivery(n: u32, image_id: Uuid, outcome: ResultOutcome) -> Delivery {
    Delivery {
        id: EntryId(format!("1700000000000-{n}")),
        result: result(image_id, outcome),
        deliveries: 1,
    }
}

#[tokio::test]
async fn processing_every_image_confirms_the_waypoints_and_readies_the_route() {
    let (_pg, pool) = migrated().await;
    let markers = [(0.1, 0.2), (0.3, 0.4)];
    let route = insert_route(&pool, "alice", "r", &markers).await.unwrap();
    let applier = ResultApplier::new(pool.clone());
    let [(w1, i1), (w2, i2)] = route.waypoints[..] else {
        unreachable!()
    };

    let first = applier
        .apply(&[delivery(1, i1, processed_outcome())])
        .await
        .unwrap();
    assert_eq!(
        first,
        [Applied::Processed {
            image_id: i1,
            route_id: route.id,
            route_ready: false
        }]
    );
    assert_eq!(image_status(&pool, i1).await, "PROCESSED");
    assert_eq!(waypoint_status(&pool, w1).await, "CONFIRMED");
    assert_eq!(route_status(&pool, route.id).await, "PENDING");

    let second = applier
        .apply(&[delivery(2, i2, processed_outcome())])
        .await
        .unwrap();
    assert_eq!(
        second,
        [Applied::Processed {
            image_id: i2,
            route_id: route.id,
            route_ready: true
        }]
    );
    assert_eq!(waypoint_status(&pool, w2).await, "CONFIRMED");
    assert_eq!(route_status(&pool, route.id).await, "READY");

    let (sha, width, pw, entry): (String, i32, i32, String) = sqlx::query_as(
        "SELECT sha256, width, processed_width, result_entry_id FROM image.images WHERE id = $1",
    )
    .bind(i2)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (sha.as_str(), width, pw, entry.as_str()),
        ("cd".repeat(32).as_str(), 4000, 2048, "1700000000000-2")
    );
    // Markers are never touched.
    let got: Vec<(f64, f64)> =
        sqlx::query_as("SELECT marker_x, marker_y FROM route.waypoints ORDER BY position")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(got, markers);
}

#[tokio::test]
async fn a_result_applied_twice_has_no_second_effect() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let image = route.waypoints[0].1;
    let applier = ResultApplier::new(pool.clone());
    applier
        .apply(&[delivery(1, image, processed_outcome())])
        .await
        .unwrap();
    let before: (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT updated_at, result_entry_id FROM image.images WHERE id = $1")
            .bind(image)
            .fetch_one(&pool)
            .await
            .unwrap();

    // Redelivery of the same entry, a duplicate entry, and a contradicting late failure.
    let again = applier
        .apply(&[
            delivery(1, image, processed_outcome()),
            delivery(7, image, processed_outcome()),
            delivery(8, image, failed_outcome(ErrorCode::InvalidImage)),
        ])
        .await
        .unwrap();
    assert_eq!(again, vec![Applied::Ignored { image_id: image }; 3]);
    let after: (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT updated_at, result_entry_id FROM image.images WHERE id = $1")
            .bind(image)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(before, after);
    assert_eq!(image_status(&pool, image).await, "PROCESSED");
    assert_eq!(route_status(&pool, route.id).await, "READY");
}

#[tokio::test]
async fn a_failure_fails_the_image_and_its_waypoint_but_not_the_route() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let (waypoint, image) = route.waypoints[0];
    let applied = ResultApplier::new(pool.clone())
        .apply(&[delivery(1, image, failed_outcome(ErrorCode::ImageTooLarge))])
        .await
        .unwrap();
    assert_eq!(
        applied,
        [Applied::Failed {
            image_id: image,
            route_id: route.id
        }]
    );
    assert_eq!(image_status(&pool, image).await, "FAILED");
    assert_eq!(waypoint_status(&pool, waypoint).await, "FAILED");
    assert_eq!(route_status(&pool, route.id).await, "PENDING");
    let code: String = sqlx::query_scalar("SELECT error_code FROM image.images WHERE id = $1")
        .bind(image)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(code, "IMAGE_TOO_LARGE");
}

#[tokio::test]
async fn an_impossible_result_is_dead_lettered_alone_and_an_unknown_image_acknowledged() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5), (0.6, 0.6)])
        .await
        .unwrap();
    let [(_, good), (bad_waypoint, bad)] = route.waypoints[..] else {
        unreachable!()
    };
    let ResultOutcome::Processed(mut zero) = processed_outcome() else {
        unreachable!()
    };
    zero.processed_width = 0; // the schema requires positive dimensions
    let huge = ResultOutcome::Processed(Processed {
        byte_size: u64::MAX,
        ..zero.clone()
    });

    let mut applier = ResultApplier::new(pool.clone());
    let batch = [
        delivery(1, bad, ResultOutcome::Processed(zero)),
        delivery(2, Uuid::new_v4(), processed_outcome()),
        delivery(3, bad, huge),
        delivery(4, good, processed_outcome()),
    ];
    let outcomes = applier.handle(&batch).await;
    assert!(
        matches!(&outcomes[0], Outcome::DeadLetter(r) if r.contains("refused")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Ack);
    assert!(
        matches!(&outcomes[2], Outcome::DeadLetter(_)),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[3], Outcome::Ack);
    assert_eq!(
        image_status(&pool, good).await,
        "PROCESSED",
        "the rest of the batch commits"
    );
    assert_eq!(image_status(&pool, bad).await, "PENDING");
    assert_eq!(waypoint_status(&pool, bad_waypoint).await, "PENDING");
}

#[tokio::test]
async fn a_late_result_for_a_replaced_image_leaves_the_waypoint_alone() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let (waypoint, old) = route.waypoints[0];
    // ReissueUpload gave the waypoint a new current image.
    let new = reissue(&pool, route.id, waypoint).await;

    let applier = ResultApplier::new(pool.clone());
    applier
        .apply(&[delivery(1, old, failed_outcome(ErrorCode::InvalidImage))])
        .await
        .unwrap();
    assert_eq!(image_status(&pool, old).await, "FAILED");
    assert_eq!(waypoint_status(&pool, waypoint).await, "PENDING");
    applier
        .apply(&[delivery(2, new, processed_outcome())])
        .await
        .unwrap();
    assert_eq!(waypoint_status(&pool, waypoint).await, "CONFIRMED");
    assert_eq!(route_status(&pool, route.id).await, "READY");
}

#[tokio::test]
async fn while_postgres_is_down_the_batch_is_retried_not_dead_lettered() {
    let (mut pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let image = route.waypoints[0].1;
    // As the service will: fail fast instead of sqlx's default 30 s wait for a connection.
    let fast = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(std::time::Duration::from_secs(1))
        .connect(&pg.url())
        .await
        .unwrap();
    let mut applier = ResultApplier::new(fast);
    let batch = [delivery(1, image, processed_outcome())];

    pg.stop().await;
    assert_eq!(applier.handle(&batch).await, [Outcome::Retry]);
    pg.restart().await.unwrap();
    // The pool reconnects on its own once the server is back.
    follow_testkit::eventually_async(std::time::Duration::from_secs(30), "postgres back", || {
        let mut applier = applier.clone();
        let batch = batch.clone();
        async move { (applier.handle(&batch).await == [Outcome::Ack]).then_some(()) }
    })
    .await;
    assert_eq!(image_status(&pool, image).await, "PROCESSED");
}

#[tokio::test]
async fn a_late_result_never_moves_a_published_route_back() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let (waypoint, old) = route.waypoints[0];
    // The old upload is still pending when the waypoint gets a new image, which is processed.
    let new = reissue(&pool, route.id, waypoint).await;
    let applier = ResultApplier::new(pool.clone());
    applier
        .apply(&[delivery(1, new, processed_outcome())])
        .await
        .unwrap();
    sqlx::query("UPDATE route.routes SET status = 'PUBLISHED', published_at = now() WHERE id = $1")
        .bind(route.id)
        .execute(&pool)
        .await
        .unwrap();

    let late = applier
        .apply(&[delivery(2, old, processed_outcome())])
        .await
        .unwrap();
    assert_eq!(
        late,
        [Applied::Processed {
            image_id: old,
            route_id: route.id,
            route_ready: false
        }]
    );
    assert_eq!(route_status(&pool, route.id).await, "PUBLISHED");
}

#[tokio::test]
async fn within_one_batch_the_first_result_of_an_image_wins_and_ready_is_reported_once() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "dana", "r", &[(0.5, 0.5), (0.5, 0.5)])
        .await
        .unwrap();
    let (a, b) = (route.waypoints[0].1, route.waypoints[1].1);
    let batch = [
        delivery(1, a, processed_outcome()),
        delivery(2, a, failed_outcome(ErrorCode::Internal)),
        delivery(3, b, processed_outcome()),
        delivery(4, b, processed_outcome()),
    ];
    let applied = ResultApplier::new(pool.clone())
        .apply(&batch)
        .await
        .unwrap();
    assert_eq!(
        applied,
        [
            Applied::Processed {
                image_id: a,
                route_id: route.id,
                route_ready: false
            },
            Applied::Ignored { image_id: a },
            Applied::Processed {
                image_id: b,
                route_id: route.id,
                route_ready: true
            },
            Applied::Ignored { image_id: b },
        ]
    );
    assert_eq!(image_status(&pool, a).await, "PROCESSED");
    assert_eq!(route_status(&pool, route.id).await, "READY");
}
