//! Applying gateway results to a real PostgreSQL: state transitions, idempotency, late results,
//! refusal of what can never apply (and of results naming other objects), retry (never
//! dead-letter) while the database is down, and READY under concurrent appliers.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use common::*;
use follow_api::results::{Applied, ResultApplier};
use follow_bus::{
    Delivery, EntryId, ErrorCode, Handler as _, ImageResult, Outcome, Processed, ResultOutcome,
};
use uuid::Uuid;

/// A result as the consumer hands it over.
fn delivery(n: u32, image_id: Uuid, outcome: ResultOutcome) -> Delivery<ImageResult> {
    Delivery {
        id: EntryId(format!("1700000000000-{n}")),
        message: result(image_id, outcome),
        deliveries: 1,
        failures: 0,
    }
}

/// Applies `deliveries` in one batch, as the consumer's handler would.
async fn apply(applier: &ResultApplier, deliveries: &[Delivery<ImageResult>]) -> Vec<Said> {
    let batch: Vec<(&str, &ImageResult)> = deliveries
        .iter()
        .map(|d| (d.id.0.as_str(), &d.message))
        .collect();
    applier
        .apply(&batch)
        .await
        .unwrap()
        .iter()
        .map(said)
        .collect()
}

/// What an [`Applied`] says, in short.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Said {
    Processed(Uuid, bool),
    Failed(Uuid),
    Ignored(Uuid),
    Refused(Uuid),
    Errored(Uuid),
}

fn said(a: &Applied) -> Said {
    match a {
        Applied::Processed { image, route_ready } => Said::Processed(image.id, *route_ready),
        Applied::Failed { image } => Said::Failed(image.id),
        Applied::Ignored { image_id } => Said::Ignored(*image_id),
        Applied::Refused { image_id, .. } => Said::Refused(*image_id),
        Applied::Errored { image_id, .. } => Said::Errored(*image_id),
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

    let first = apply(
        &applier,
        &[delivery(1, i1, processed_outcome(route.id, i1))],
    )
    .await;
    assert_eq!(first, [Said::Processed(i1, false)]);
    assert_eq!(image_status(&pool, i1).await, "PROCESSED");
    assert_eq!(waypoint_status(&pool, w1).await, "CONFIRMED");
    assert_eq!(route_status(&pool, route.id).await, "PENDING");

    let second = apply(
        &applier,
        &[delivery(2, i2, processed_outcome(route.id, i2))],
    )
    .await;
    assert_eq!(second, [Said::Processed(i2, true)]);
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
    let ok = || processed_outcome(route.id, image);
    apply(&applier, &[delivery(1, image, ok())]).await;
    let before: (time::OffsetDateTime, String) =
        sqlx::query_as("SELECT updated_at, result_entry_id FROM image.images WHERE id = $1")
            .bind(image)
            .fetch_one(&pool)
            .await
            .unwrap();

    // Redelivery of the same entry, a duplicate entry, and a contradicting late failure.
    let again = apply(
        &applier,
        &[
            delivery(1, image, ok()),
            delivery(7, image, ok()),
            delivery(8, image, failed_outcome(ErrorCode::InvalidImage)),
        ],
    )
    .await;
    assert_eq!(again, vec![Said::Ignored(image); 3]);
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
    let applier = ResultApplier::new(pool.clone());
    let applied = apply(
        &applier,
        &[delivery(1, image, failed_outcome(ErrorCode::ImageTooLarge))],
    )
    .await;
    assert_eq!(applied, [Said::Failed(image)]);
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
    let ResultOutcome::Processed(mut zero) = processed_outcome(route.id, bad) else {
        unreachable!()
    };
    zero.processed_width = 0; // the schema requires positive dimensions
    let huge = ResultOutcome::Processed(Processed {
        byte_size: u64::MAX,
        ..zero.clone()
    });
    let unknown = Uuid::new_v4();

    let mut applier = ResultApplier::new(pool.clone());
    let batch = [
        delivery(1, bad, ResultOutcome::Processed(zero)),
        delivery(2, unknown, processed_outcome(route.id, unknown)),
        delivery(3, bad, huge),
        delivery(4, good, processed_outcome(route.id, good)),
    ];
    let outcomes = applier.handle(&batch).await;
    assert!(
        matches!(&outcomes[0], Outcome::DeadLetter { reason, .. } if reason.contains("refused")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Ack);
    assert!(
        matches!(&outcomes[2], Outcome::DeadLetter { .. }),
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
async fn a_result_naming_another_images_objects_is_poison_and_changes_nothing() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let other = insert_route(&pool, "mallory", "m", &[(0.5, 0.5)])
        .await
        .unwrap();
    let image = route.waypoints[0].1;
    let ResultOutcome::Processed(genuine) = processed_outcome(route.id, image) else {
        unreachable!()
    };
    let ResultOutcome::Processed(theirs) = processed_outcome(other.id, other.waypoints[0].1) else {
        unreachable!()
    };
    let forged_image = ResultOutcome::Processed(Processed {
        storage_key: theirs.storage_key.clone(),
        preview_key: theirs.preview_key.clone(),
        ..genuine.clone()
    });
    let forged_preview = ResultOutcome::Processed(Processed {
        preview_key: theirs.preview_key.clone(),
        ..genuine.clone()
    });
    let mut applier = ResultApplier::new(pool.clone());
    for forged in [forged_image, forged_preview] {
        let outcomes = applier.handle(&[delivery(1, image, forged)]).await;
        assert!(
            matches!(&outcomes[0], Outcome::DeadLetter { reason, .. } if reason.starts_with("poison")),
            "{outcomes:?}"
        );
    }
    assert_eq!(image_status(&pool, image).await, "PENDING");
    let preview: Option<String> =
        sqlx::query_scalar("SELECT preview_key FROM image.images WHERE id = $1")
            .bind(image)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(preview, None, "nothing to presign");
}

#[tokio::test]
async fn a_late_photo_for_an_expired_image_is_applied_while_its_waypoint_points_at_it() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5), (0.6, 0.6)])
        .await
        .unwrap();
    let [(w1, i1), (w2, i2)] = route.waypoints[..] else {
        unreachable!()
    };
    let applier = ResultApplier::new(pool.clone());
    apply(
        &applier,
        &[delivery(1, i1, processed_outcome(route.id, i1))],
    )
    .await;
    // The reconciler expired the other image (its token ran out, nothing was in S3 then).
    expire(&pool, i2).await;
    assert_eq!(waypoint_status(&pool, w2).await, "FAILED");
    // A failure that late changes nothing; the photo itself is taken.
    let late_failure = apply(
        &applier,
        &[delivery(2, i2, failed_outcome(ErrorCode::Internal))],
    )
    .await;
    assert_eq!(late_failure, [Said::Ignored(i2)]);
    let late = apply(
        &applier,
        &[delivery(3, i2, processed_outcome(route.id, i2))],
    )
    .await;
    assert_eq!(late, [Said::Processed(i2, true)]);
    assert_eq!(image_status(&pool, i2).await, "PROCESSED");
    assert_eq!(waypoint_status(&pool, w2).await, "CONFIRMED");
    assert_eq!(waypoint_status(&pool, w1).await, "CONFIRMED");
    assert_eq!(route_status(&pool, route.id).await, "READY");
    let code: Option<String> =
        sqlx::query_scalar("SELECT error_code FROM image.images WHERE id = $1")
            .bind(i2)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(code, None, "the expiry's error is gone");

    // Once the waypoint has another image, a late photo for the expired one is history only.
    let route = insert_route(&pool, "alice", "r2", &[(0.5, 0.5)])
        .await
        .unwrap();
    let (waypoint, old) = route.waypoints[0];
    expire(&pool, old).await;
    let new = reissue(&pool, route.id, waypoint).await;
    let late = apply(
        &applier,
        &[delivery(4, old, processed_outcome(route.id, old))],
    )
    .await;
    assert_eq!(late, [Said::Ignored(old)]);
    assert_eq!(image_status(&pool, new).await, "PENDING");
    assert_eq!(waypoint_status(&pool, waypoint).await, "PENDING");
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
    apply(
        &applier,
        &[delivery(1, old, failed_outcome(ErrorCode::InvalidImage))],
    )
    .await;
    assert_eq!(image_status(&pool, old).await, "FAILED");
    assert_eq!(waypoint_status(&pool, waypoint).await, "PENDING");
    apply(
        &applier,
        &[delivery(2, new, processed_outcome(route.id, new))],
    )
    .await;
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
    let batch = [delivery(1, image, processed_outcome(route.id, image))];

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
    apply(
        &applier,
        &[delivery(1, new, processed_outcome(route.id, new))],
    )
    .await;
    sqlx::query("UPDATE route.routes SET status = 'PUBLISHED', published_at = now() WHERE id = $1")
        .bind(route.id)
        .execute(&pool)
        .await
        .unwrap();

    let late = apply(
        &applier,
        &[delivery(2, old, processed_outcome(route.id, old))],
    )
    .await;
    assert_eq!(late, [Said::Processed(old, false)]);
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
        delivery(1, a, processed_outcome(route.id, a)),
        delivery(2, a, failed_outcome(ErrorCode::Internal)),
        delivery(3, b, processed_outcome(route.id, b)),
        delivery(4, b, processed_outcome(route.id, b)),
    ];
    let applied = apply(&ResultApplier::new(pool.clone()), &batch).await;
    assert_eq!(
        applied,
        [
            Said::Processed(a, false),
            Said::Ignored(a),
            Said::Processed(b, true),
            Said::Ignored(b),
        ]
    );
    assert_eq!(image_status(&pool, a).await, "PROCESSED");
    assert_eq!(route_status(&pool, route.id).await, "READY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appliers_racing_on_the_same_routes_make_every_route_ready_exactly_once() {
    let (_pg, pool) = migrated().await;
    let mut routes = Vec::new();
    for n in 0..200 {
        let markers = vec![(0.5, 0.5); 2 + n % 2];
        routes.push(
            insert_route(&pool, "erin", &format!("r{n}"), &markers)
                .await
                .unwrap(),
        );
    }
    // Each route's images go to different appliers, in batches that mix routes: the last two
    // waypoints of a route are confirmed by two transactions at once.
    let mut lanes: [Vec<Delivery<ImageResult>>; 3] = Default::default();
    let mut n = 0;
    for route in &routes {
        for (i, (_, image)) in route.waypoints.iter().enumerate() {
            n += 1;
            lanes[i % 3].push(delivery(n, *image, processed_outcome(route.id, *image)));
        }
    }
    let appliers: Vec<_> = lanes
        .into_iter()
        .map(|lane| {
            let applier = ResultApplier::new(pool.clone());
            tokio::spawn(async move {
                let mut ready = 0;
                for batch in lane.chunks(16) {
                    ready += apply(&applier, batch)
                        .await
                        .iter()
                        .filter(|s| matches!(s, Said::Processed(_, true)))
                        .count();
                }
                ready
            })
        })
        .collect();
    let mut ready = 0;
    for applier in appliers {
        ready += applier.await.unwrap();
    }
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM route.routes WHERE status <> 'READY'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pending, 0, "every route READY, none stuck");
    assert_eq!(ready, routes.len(), "each reported ready exactly once");
}

#[tokio::test]
async fn a_result_the_database_fails_on_counts_as_a_failure_alone_and_the_rest_commits() {
    let (_pg, pool) = migrated().await;
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5), (0.6, 0.6)])
        .await
        .unwrap();
    let [(_, good), (_, stuck)] = route.waypoints[..] else {
        unreachable!()
    };
    // Something in the database (an operator's trigger, say) makes one image's update fail.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION image.refuse() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'under maintenance'; END $$;
         CREATE TRIGGER refuse BEFORE UPDATE ON image.images FOR EACH ROW
           WHEN (OLD.id = '{stuck}') EXECUTE FUNCTION image.refuse();"
    )))
    .execute(&pool)
    .await
    .unwrap();
    let mut applier = ResultApplier::new(pool.clone());
    let outcomes = applier
        .handle(&[
            delivery(1, stuck, processed_outcome(route.id, stuck)),
            delivery(2, good, processed_outcome(route.id, good)),
        ])
        .await;
    assert!(
        matches!(&outcomes[0], Outcome::Fail(reason) if reason.contains("under maintenance")),
        "{outcomes:?}"
    );
    assert_eq!(outcomes[1], Outcome::Ack);
    assert_eq!(image_status(&pool, good).await, "PROCESSED");
    assert_eq!(image_status(&pool, stuck).await, "PENDING");
}

/// A result delivered again for an image already final (its first applier may have died between
/// its commit and its announcement) announces the image as committed again, READY included.
#[tokio::test]
async fn a_result_for_a_final_image_announces_it_again() {
    use follow_bus::{Notice, ProgressTracker, Valkey, ValkeyConfig, keys};
    use futures_util::StreamExt as _;
    let (_pg, pool) = migrated().await;
    let valkey_server = follow_testkit::ValkeyServer::start().await.unwrap();
    let valkey = Valkey::new(ValkeyConfig::new(valkey_server.url())).unwrap();
    let route = insert_route(&pool, "alice", "r", &[(0.5, 0.5)])
        .await
        .unwrap();
    let image = route.waypoints[0].1;
    let mut notices = redis::Client::open(valkey_server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    notices
        .subscribe(keys::Partitions::DEFAULT.progress(image))
        .await
        .unwrap();
    let mut notices = notices.into_on_message();
    let applier =
        ResultApplier::new(pool.clone()).with_announcer(ProgressTracker::new(&valkey).unwrap());
    let ok = delivery(1, image, processed_outcome(route.id, image));
    for (round, expected) in [
        ("applied", Said::Processed(image, true)),
        ("delivered again", Said::Ignored(image)),
    ] {
        assert_eq!(apply(&applier, std::slice::from_ref(&ok)).await, [expected]);
        let message = tokio::time::timeout(std::time::Duration::from_secs(10), notices.next())
            .await
            .unwrap_or_else(|_| panic!("{round}: announced"))
            .unwrap();
        match Notice::decode(message.get_payload_bytes()).unwrap() {
            Notice::Committed(c) => {
                assert_eq!(c.image_id, image, "{round}");
                assert!(c.route_ready, "{round}: with its route READY");
            }
            other => panic!("{round}: {other:?}"),
        }
    }
}
