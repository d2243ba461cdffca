//! RouteService through a real tonic client against a running API (real PostgreSQL, Valkey).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    failed_outcome, processed_for, result,
    stack::{Stack, bearer},
};
use follow_bus::{ErrorCode, Stage};
use follow_proto::{
    api::v1::{self as api, WaypointInput},
    tonic::{Code, Request},
};
use follow_testkit::eventually_async;
use follow_token::{UploadClaims, Verifier, VerifyingKeys};
use redis::AsyncCommands;
use tonic_types::StatusExt;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(20);

fn waypoint(x: f64, y: f64) -> WaypointInput {
    WaypointInput {
        marker_x: x,
        marker_y: y,
        content_type: "image/jpeg".into(),
        file_size: 1_000_000,
    }
}

fn create(request_id: &str, markers: &[(f64, f64)]) -> api::CreateRouteWithWaypointsRequest {
    api::CreateRouteWithWaypointsRequest {
        request_id: request_id.into(),
        name: "coast walk".into(),
        waypoints: markers.iter().map(|&(x, y)| waypoint(x, y)).collect(),
    }
}

#[tokio::test]
async fn create_stores_everything_queues_each_image_and_signs_upload_targets() {
    let stack = Stack::start().await;
    let mut routes = stack.routes().await;
    // Markers that decimal rounding would change: stored and returned bit for bit.
    let markers = [
        (0.1 + 0.2, 1.0 / 3.0),
        (0.0, 1.0),
        (f64::MIN_POSITIVE, 0.999_999_999_999_999_9),
    ];
    let response = routes
        .create_route_with_waypoints(stack.as_user("alice", create("r-1", &markers)))
        .await
        .unwrap()
        .into_inner();
    let route = response.route.unwrap();
    assert_eq!(route.status(), api::RouteStatus::Pending);
    assert_eq!(route.owner, "alice");
    assert_eq!(route.waypoints.len(), 3);
    assert_eq!(response.upload_targets.len(), 3);

    let verifier = Verifier::<UploadClaims>::new(VerifyingKeys::new([stack.upload_key.clone()]));
    let mut valkey = stack.valkey_server.connection().await;
    for ((w, target), (x, y)) in route
        .waypoints
        .iter()
        .zip(&response.upload_targets)
        .zip(markers)
    {
        assert_eq!(
            (w.marker_x.to_bits(), w.marker_y.to_bits()),
            (x.to_bits(), y.to_bits())
        );
        let image = w.image.as_ref().unwrap();
        assert_eq!(image.status(), api::ImageStatus::Pending);
        assert_eq!(image.stage(), follow_proto::events::v1::Stage::Queued);
        assert_eq!(target.image_id, image.id);
        assert_eq!(
            target.upload_url,
            format!("http://gateway.test:8081/upload?token={}", target.token)
        );
        let claims = verifier.verify(&target.token).unwrap();
        assert_eq!(claims.image_id.to_string(), image.id);
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.content_type, "image/jpeg");
        assert_eq!(claims.max_file_size, 1_000_000);
        assert!(claims.storage_key.contains(&image.id));
        // The status hash says queued, with its seq and a TTL.
        let key = follow_bus::keys::Partitions::DEFAULT.status(image.id.parse().unwrap());
        let stage: String = valkey.hget(&key, "stage").await.unwrap();
        let seq: u64 = valkey.hget(&key, "seq").await.unwrap();
        let ttl: i64 = valkey.ttl(&key).await.unwrap();
        assert_eq!((stage.as_str(), seq), ("queued", Stage::Queued.seq()));
        assert!(ttl > 0 && ttl <= 3600, "ttl {ttl}");
    }
    let stored: Vec<(f64, f64)> = sqlx::query_as(
        "SELECT marker_x, marker_y FROM route.waypoints WHERE route_id = $1::uuid ORDER BY position",
    )
    .bind(&route.id)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    for ((sx, sy), (x, y)) in stored.into_iter().zip(markers) {
        assert_eq!((sx.to_bits(), sy.to_bits()), (x.to_bits(), y.to_bits()));
    }
}

#[tokio::test]
async fn a_retried_request_id_returns_the_same_route_even_when_concurrent() {
    let stack = Stack::start().await;
    let routes = stack.routes().await;
    let calls = (0..8).map(|_| {
        let mut routes = routes.clone();
        let request = stack.as_user("bob", create("same-request", &[(0.5, 0.5), (0.2, 0.8)]));
        async move {
            routes
                .create_route_with_waypoints(request)
                .await
                .unwrap()
                .into_inner()
        }
    });
    let responses = futures_util::future::join_all(calls).await;
    let id = responses[0].route.as_ref().unwrap().id.clone();
    for r in &responses {
        assert_eq!(r.route.as_ref().unwrap().id, id);
        assert_eq!(
            r.upload_targets.len(),
            2,
            "fresh tokens for the pending images"
        );
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM route.routes")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    // The same request_id of another user is another route.
    let mut routes = routes.clone();
    let other = routes
        .create_route_with_waypoints(stack.as_user("carol", create("same-request", &[(0.5, 0.5)])))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(other.route.unwrap().id, id);
}

#[tokio::test]
async fn invalid_input_is_refused_with_every_bad_field_named() {
    let stack = Stack::start().await;
    let mut routes = stack.routes().await;
    let mut bad = create("r", &[(0.5, 0.5)]);
    bad.waypoints[0].marker_x = f64::NAN;
    bad.waypoints[0].marker_y = -0.1;
    bad.waypoints[0].content_type = "image/gif".into();
    bad.waypoints[0].file_size = 10_000_001;
    let status = routes
        .create_route_with_waypoints(stack.as_user("alice", bad))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let fields: Vec<String> = status
        .get_details_bad_request()
        .unwrap()
        .field_violations
        .into_iter()
        .map(|v| v.field)
        .collect();
    assert_eq!(
        fields,
        [
            "waypoints[0].marker_x",
            "waypoints[0].marker_y",
            "waypoints[0].content_type",
            "waypoints[0].file_size"
        ]
    );
    let too_many: Vec<(f64, f64)> = vec![(0.5, 0.5); 101];
    for request in [
        create("r", &[]),
        create("r", &too_many),
        create("", &[(0.5, 0.5)]),
        create(&"x".repeat(129), &[(0.5, 0.5)]),
    ] {
        let status = routes
            .create_route_with_waypoints(stack.as_user("alice", request))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    for bad_id in ["", "not-a-uuid", "'; DROP TABLE route.routes; --"] {
        let status = routes
            .get_route(stack.as_user(
                "alice",
                api::GetRouteRequest {
                    route_id: bad_id.into(),
                },
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM route.routes")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(count, 0);
}

#[tokio::test]
async fn callers_without_a_valid_token_are_unauthenticated_and_others_routes_not_found() {
    let stack = Stack::start().await;
    let mut routes = stack.routes().await;
    let created = routes
        .create_route_with_waypoints(stack.as_user("alice", create("r", &[(0.5, 0.5)])))
        .await
        .unwrap()
        .into_inner();
    let route_id = created.route.unwrap().id;
    let get = || api::GetRouteRequest {
        route_id: route_id.clone(),
    };

    let status = routes.get_route(Request::new(get())).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let stranger = follow_token::SigningKey::generate("user-1".parse().unwrap());
    let expired = follow_token::UserClaims::new(
        "alice",
        std::time::SystemTime::now() - Duration::from_secs(7200),
        Duration::from_secs(60),
    );
    for token in [
        "garbage".to_owned(),
        "a.b.c".to_owned(),
        "x".repeat(9_000),
        stack.user_key.sign(&expired).unwrap(),
        // Right kid, wrong key: a forged signature.
        stranger
            .sign(&follow_token::UserClaims::new(
                "alice",
                std::time::SystemTime::now(),
                Duration::from_secs(60),
            ))
            .unwrap(),
        // An upload token is not a user token (audience).
        created.upload_targets[0].token.clone(),
    ] {
        let status = routes.get_route(bearer(get(), &token)).await.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{token:.30}");
    }
    let mut request = Request::new(get());
    request
        .metadata_mut()
        .insert("authorization", "Basic YWxpY2U6eA==".parse().unwrap());
    assert_eq!(
        routes.get_route(request).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    let status = routes
        .get_route(stack.as_user("mallory", get()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let status = routes
        .publish_route(stack.as_user(
            "mallory",
            api::PublishRouteRequest {
                route_id: route_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let waypoint_id = created.upload_targets[0].waypoint_id.clone();
    let status = routes
        .reissue_upload(stack.as_user(
            "mallory",
            api::ReissueUploadRequest {
                waypoint_id,
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    let mut images = stack.images().await;
    let status = images
        .get_image_status(stack.as_user(
            "mallory",
            api::GetImageStatusRequest {
                image_id: created.upload_targets[0].image_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(
        routes
            .get_route(stack.as_user("alice", get()))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn list_routes_pages_newest_first_without_gaps_or_repeats() {
    let stack = Stack::start().await;
    let mut routes = stack.routes().await;
    let mut created = Vec::new();
    for i in 0..5 {
        let r = routes
            .create_route_with_waypoints(
                stack.as_user("alice", create(&format!("r{i}"), &[(0.5, 0.5)])),
            )
            .await
            .unwrap()
            .into_inner();
        created.push(r.route.unwrap().id);
    }
    routes
        .create_route_with_waypoints(stack.as_user("bob", create("b", &[(0.5, 0.5)])))
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = routes
            .list_routes(stack.as_user(
                "alice",
                api::ListRoutesRequest {
                    page_size: 2,
                    page_token: token.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(page.routes.len() <= 2);
        seen.extend(page.routes.into_iter().map(|r| r.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    created.reverse();
    assert_eq!(seen, created);
    assert_eq!(pages, 3);
    let status = routes
        .list_routes(stack.as_user(
            "alice",
            api::ListRoutesRequest {
                page_size: 2,
                page_token: "garbage".into(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn results_make_the_route_ready_then_publishable_and_a_failure_can_be_reissued() {
    let stack = Stack::start().await;
    let mut routes = stack.routes().await;
    let created = routes
        .create_route_with_waypoints(stack.as_user("alice", create("r", &[(0.1, 0.1), (0.9, 0.9)])))
        .await
        .unwrap()
        .into_inner();
    let route_id = created.route.unwrap().id;
    let targets = created.upload_targets;
    let publish = || api::PublishRouteRequest {
        route_id: route_id.clone(),
    };

    // Pending: publishing is refused, naming the waypoints that are not ready.
    let status = routes
        .publish_route(stack.as_user("alice", publish()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(
        status
            .get_details_precondition_failure()
            .unwrap()
            .violations
            .len(),
        2
    );

    // One image fails: a reissue is refused for the pending one and granted for the failed one.
    let mut producer = stack.producer();
    let first: Uuid = targets[0].image_id.parse().unwrap();
    let second: Uuid = targets[1].image_id.parse().unwrap();
    producer
        .publish(&result(first, failed_outcome(ErrorCode::InvalidImage)))
        .await
        .unwrap();
    let waypoint_status = |i: usize| {
        let (routes, request) = (
            routes.clone(),
            stack.as_user(
                "alice",
                api::GetRouteRequest {
                    route_id: route_id.clone(),
                },
            ),
        );
        async move {
            let mut routes = routes;
            routes
                .get_route(request)
                .await
                .unwrap()
                .into_inner()
                .route
                .unwrap()
                .waypoints[i]
                .status()
        }
    };
    eventually_async(WITHIN, "first waypoint failed", || async {
        (waypoint_status(0).await == api::WaypointStatus::Failed).then_some(())
    })
    .await;
    let status = routes
        .reissue_upload(stack.as_user(
            "alice",
            api::ReissueUploadRequest {
                waypoint_id: targets[1].waypoint_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let reissued = routes
        .reissue_upload(stack.as_user(
            "alice",
            api::ReissueUploadRequest {
                waypoint_id: targets[0].waypoint_id.clone(),
                content_type: "image/png".into(),
                file_size: 5000,
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let target = reissued.upload_target.unwrap();
    assert_ne!(target.image_id, targets[0].image_id);
    assert_eq!(
        (target.content_type.as_str(), target.max_file_size),
        ("image/png", 5000)
    );
    assert_eq!(reissued.image.unwrap().status(), api::ImageStatus::Pending);
    let old_status: String =
        sqlx::query_scalar("SELECT status::text FROM image.images WHERE id = $1")
            .bind(first)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(old_status, "FAILED", "the old image stays for history");

    // Both current images processed: READY, then PUBLISHED (twice is fine).
    let third: Uuid = target.image_id.parse().unwrap();
    producer
        .publish(&processed_for(&stack.pool, second).await)
        .await
        .unwrap();
    producer
        .publish(&processed_for(&stack.pool, third).await)
        .await
        .unwrap();
    eventually_async(WITHIN, "route ready", || {
        let mut routes = routes.clone();
        let request = stack.as_user(
            "alice",
            api::GetRouteRequest {
                route_id: route_id.clone(),
            },
        );
        async move {
            let route = routes
                .get_route(request)
                .await
                .unwrap()
                .into_inner()
                .route
                .unwrap();
            (route.status() == api::RouteStatus::Ready).then_some(route)
        }
    })
    .await;
    let published = routes
        .publish_route(stack.as_user("alice", publish()))
        .await
        .unwrap()
        .into_inner();
    let published = published.route.unwrap();
    assert_eq!(published.status(), api::RouteStatus::Published);
    assert!(published.publish_time.is_some());
    let image = published.waypoints[1].image.as_ref().unwrap();
    assert_eq!(image.status(), api::ImageStatus::Processed);
    assert_eq!(image.sha256, "cd".repeat(32));
    assert!(image.processed_width > 0);
    let again = routes
        .publish_route(stack.as_user("alice", publish()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.route.unwrap().status(), api::RouteStatus::Published);
}

#[tokio::test]
async fn without_valkey_creation_is_unavailable_and_nothing_is_created_while_reads_go_on() {
    let mut stack = Stack::start().await;
    let mut routes = stack.routes().await;
    let kept = routes
        .create_route_with_waypoints(stack.as_user("alice", create("before", &[(0.5, 0.5)])))
        .await
        .unwrap()
        .into_inner()
        .route
        .unwrap();
    stack.valkey_server.stop().await;
    for i in 0..5 {
        let status = routes
            .create_route_with_waypoints(
                stack.as_user("alice", create(&format!("down-{i}"), &[(0.5, 0.5)])),
            )
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM route.routes")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(count, 1, "nothing half-created");
    let read = routes
        .get_route(stack.as_user(
            "alice",
            api::GetRouteRequest {
                route_id: kept.id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read.route.unwrap().id, kept.id);

    stack.valkey_server.restart().await.unwrap();
    // The breaker lets a probe through after its cool-down and closes when Valkey answers.
    eventually_async(WITHIN, "creation works again", || {
        let mut routes = routes.clone();
        let request = stack.as_user("alice", create("after", &[(0.5, 0.5)]));
        async move { routes.create_route_with_waypoints(request).await.ok() }
    })
    .await;
}
