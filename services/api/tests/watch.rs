//! `ImageService`: status, and the live watch over native gRPC and grpc-web (HTTP/1.1), against
//! a running API with real PostgreSQL, Valkey and S3 (Garage). The gateway's part is played
//! through `follow-bus` on the same Valkey: stage reports and results.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    failed_outcome, processed_for, result,
    stack::{Stack, Vars, bearer, route_request},
};
use follow_bus::{ErrorCode, OutputRole, Progress, ResultOutcome, Stage};
use follow_proto::{
    api::v1::{
        self as api, image_service_client::ImageServiceClient, watch_image_status_request::Target,
        watch_image_status_response::Event,
    },
    events::v1 as events,
    tonic::{Code, Streaming},
};
use follow_service::objects;
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(20);

async fn create(stack: &Stack, owner: &str, n: usize) -> api::CreateRouteWithWaypointsResponse {
    let request = route_request(n);
    stack
        .routes()
        .await
        .create_route_with_waypoints(stack.as_user(owner, request))
        .await
        .unwrap()
        .into_inner()
}

fn watch_route(route_id: &str, cursor: &str) -> api::WatchImageStatusRequest {
    api::WatchImageStatusRequest {
        target: Some(Target::RouteId(route_id.into())),
        resume_cursor: cursor.into(),
    }
}

fn watch_images(ids: &[&str]) -> api::WatchImageStatusRequest {
    api::WatchImageStatusRequest {
        target: Some(Target::Images(api::ImageIds {
            image_ids: ids.iter().map(|s| (*s).to_owned()).collect(),
        })),
        resume_cursor: String::new(),
    }
}

async fn next(
    stream: &mut Streaming<api::WatchImageStatusResponse>,
) -> Option<api::WatchImageStatusResponse> {
    tokio::time::timeout(WITHIN, stream.message())
        .await
        .expect("an event within the deadline")
        .unwrap()
}

/// The next event that is not a heartbeat.
async fn event(stream: &mut Streaming<api::WatchImageStatusResponse>) -> (String, Event) {
    loop {
        let message = next(stream).await.expect("the stream goes on");
        match message.event.unwrap() {
            Event::Heartbeat(_) => continue,
            event => return (message.cursor, event),
        }
    }
}

fn progress_of(event: &Event) -> (String, events::Stage) {
    match event {
        Event::ImageProgress(p) => (p.image_id.clone(), p.stage()),
        other => panic!("expected progress, got {other:?}"),
    }
}

/// Plays the gateway for one image: every stage, the preview in S3, the processed result.
async fn process(stack: &Stack, image_id: &str, preview: &[u8]) -> String {
    let id: Uuid = image_id.parse().unwrap();
    let mut tracker = stack.tracker();
    for stage in [
        Stage::WaitingUpload,
        Stage::Validating,
        Stage::Decoding,
        Stage::Processing,
        Stage::Encoding,
        Stage::UploadingToStorage,
        Stage::Done,
    ] {
        tracker.record(&Progress::reached(id, stage)).await.unwrap();
    }
    let processed = processed_for(&stack.pool, id).await;
    let ResultOutcome::Processed(p) = &processed.outcome else {
        unreachable!()
    };
    let preview_key = p.preview_key.clone();
    let garage = stack.garage.as_ref().unwrap();
    // The JPEG preview, and the main WebP (its bytes the preview's, reversed).
    let webp_key = objects::output_key(&p.storage_key, OutputRole::Main, "image/webp").unwrap();
    let webp: Vec<u8> = preview.iter().rev().copied().collect();
    for (key, body) in [(&preview_key, preview.to_vec()), (&webp_key, webp)] {
        garage
            .client()
            .put_object()
            .bucket(garage.bucket())
            .key(key)
            .body(body.into())
            .send()
            .await
            .unwrap();
    }
    stack.producer().publish(&processed).await.unwrap();
    preview_key
}

#[tokio::test]
async fn a_route_watch_sends_state_then_every_stage_in_order_then_processed_and_ready() {
    let stack = Stack::start_with(Vars::new(), true).await;
    let created = create(&stack, "alice", 2).await;
    let route_id = created.route.unwrap().id;
    let (a, b) = (
        created.upload_targets[0].image_id.clone(),
        created.upload_targets[1].image_id.clone(),
    );
    let mut images = stack.images().await;
    let mut stream = images
        .watch_image_status(stack.as_user("alice", watch_route(&route_id, "")))
        .await
        .unwrap()
        .into_inner();
    // The state first: both queued.
    let mut cursors = Vec::new();
    for expected in [&a, &b] {
        let (cursor, e) = event(&mut stream).await;
        assert_eq!(progress_of(&e), (expected.clone(), events::Stage::Queued));
        cursors.push(cursor);
    }

    let preview = b"\xff\xd8\xff\xe0 a small preview".to_vec();
    process(&stack, &a, &preview).await;
    for stage in [
        events::Stage::WaitingUpload,
        events::Stage::Validating,
        events::Stage::Decoding,
        events::Stage::Processing,
        events::Stage::Encoding,
        events::Stage::UploadingToStorage,
        events::Stage::Done,
    ] {
        let (cursor, e) = event(&mut stream).await;
        assert_eq!(progress_of(&e), (a.clone(), stage));
        cursors.push(cursor);
    }
    let (_, e) = event(&mut stream).await;
    let Event::ImageProcessed(processed) = e else {
        panic!("expected processed, got {e:?}")
    };
    let image = processed.image.unwrap();
    assert_eq!(
        (image.id.as_str(), image.status()),
        (a.as_str(), api::ImageStatus::Processed)
    );
    assert_eq!(image.sha256, "cd".repeat(32));
    let fetched = reqwest::get(&processed.preview_url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{}", processed.preview_url);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), preview.as_slice());
    // Every file with its size and a URL of its own; the privacy manifest by name.
    let files: Vec<_> = image
        .files
        .iter()
        .map(|f| (f.role(), f.content_type.as_str(), f.width, f.byte_size))
        .collect();
    assert_eq!(
        files,
        [
            (events::OutputRole::Main, "image/jpeg", 2048, 300_000),
            (events::OutputRole::Preview, "image/jpeg", 320, 20_000),
            (events::OutputRole::Main, "image/webp", 2048, 240_000),
            (events::OutputRole::Preview, "image/webp", 320, 16_000),
        ]
    );
    let webp = &image.files[2];
    let fetched = reqwest::get(&webp.url).await.unwrap();
    assert_eq!(fetched.status(), 200, "{}", webp.url);
    let reversed: Vec<u8> = preview.iter().rev().copied().collect();
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), reversed.as_slice());
    assert_eq!(
        image.stripped_metadata().collect::<Vec<_>>(),
        [events::MetadataKind::Gps, events::MetadataKind::CaptureTime]
    );

    process(&stack, &b, &preview).await;
    let mut seen_b = Vec::new();
    loop {
        let (_, e) = event(&mut stream).await;
        match e {
            Event::ImageProgress(p) => seen_b.push(p.stage()),
            Event::ImageProcessed(p) => {
                assert_eq!(p.image.unwrap().id, b);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let mut sorted = seen_b.clone();
    sorted.sort_by_key(|s| *s as i32);
    sorted.dedup();
    assert_eq!(seen_b, sorted, "in order, never twice");
    let (_, e) = event(&mut stream).await;
    let Event::RouteReady(ready) = e else {
        panic!("expected route_ready, got {e:?}")
    };
    assert_eq!(ready.route.unwrap().status(), api::RouteStatus::Ready);
    assert!(
        next(&mut stream).await.is_none(),
        "the stream ends once the route is READY"
    );

    // Resuming from an early cursor sends what was missed, once: both outcomes, then READY.
    let mut resumed = images
        .watch_image_status(stack.as_user("alice", watch_route(&route_id, &cursors[3])))
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(message) = next(&mut resumed).await {
        kinds.push(match message.event.unwrap() {
            Event::ImageProcessed(p) => format!("processed {}", p.image.unwrap().id),
            Event::RouteReady(_) => "ready".into(),
            other => panic!("already sent before the cursor: {other:?}"),
        });
    }
    assert_eq!(
        kinds,
        [
            format!("processed {a}"),
            format!("processed {b}"),
            "ready".into()
        ]
    );
}

#[tokio::test]
async fn grpc_web_watch_over_http1_gets_progress_then_the_failure() {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let stack = Stack::start().await;
    let created = create(&stack, "alice", 1).await;
    let image = created.upload_targets[0].image_id.clone();
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let web = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http1);
    let mut images = ImageServiceClient::with_origin(web, stack.url().parse().unwrap());
    let mut stream = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&image])))
        .await
        .unwrap()
        .into_inner();
    let (_, e) = event(&mut stream).await;
    assert_eq!(progress_of(&e), (image.clone(), events::Stage::Queued));
    let id: Uuid = image.parse().unwrap();
    stack
        .tracker()
        .record(&Progress::reached(id, Stage::WaitingUpload))
        .await
        .unwrap();
    let (_, e) = event(&mut stream).await;
    assert_eq!(
        progress_of(&e),
        (image.clone(), events::Stage::WaitingUpload)
    );
    stack
        .producer()
        .publish(&result(id, failed_outcome(ErrorCode::InvalidImage)))
        .await
        .unwrap();
    let (_, e) = event(&mut stream).await;
    let Event::ImageFailed(failed) = e else {
        panic!("expected failed, got {e:?}")
    };
    assert_eq!(failed.error_code(), events::ErrorCode::InvalidImage);
    assert!(next(&mut stream).await.is_none());

    // GetImageStatus over grpc-web too.
    let status = images
        .get_image_status(stack.as_user("alice", api::GetImageStatusRequest { image_id: image }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.image.unwrap().status(), api::ImageStatus::Failed);
}

#[tokio::test]
async fn watches_are_refused_to_strangers_and_for_bad_requests() {
    let stack = Stack::start().await;
    let created = create(&stack, "alice", 1).await;
    let route_id = created.route.unwrap().id;
    let image = created.upload_targets[0].image_id.clone();
    let mut images = stack.images().await;
    let refused = |request| {
        let mut images = images.clone();
        async move { images.watch_image_status(request).await.unwrap_err().code() }
    };
    assert_eq!(
        refused(stack.as_user("mallory", watch_route(&route_id, ""))).await,
        Code::NotFound
    );
    assert_eq!(
        refused(stack.as_user("mallory", watch_images(&[&image]))).await,
        Code::NotFound
    );
    let unknown = Uuid::new_v4().to_string();
    assert_eq!(
        refused(stack.as_user("alice", watch_images(&[&image, &unknown]))).await,
        Code::NotFound
    );
    assert_eq!(
        refused(bearer(watch_route(&route_id, ""), "not-a-token")).await,
        Code::Unauthenticated
    );
    for bad in [
        api::WatchImageStatusRequest::default(),
        watch_images(&[]),
        watch_images(&["nope"]),
        watch_images(&vec![image.as_str(); 101]),
        watch_route(&route_id, "garbage-cursor"),
        watch_route(&route_id, &"A".repeat(5_000)),
    ] {
        assert_eq!(
            refused(stack.as_user("alice", bad)).await,
            Code::InvalidArgument
        );
    }
    // A message larger than any the method takes is not even read.
    assert_eq!(
        refused(stack.as_user("alice", watch_route(&route_id, &"A".repeat(50_000)))).await,
        Code::OutOfRange
    );
    // A watch of a pending image stays open with heartbeats; GetImageStatus shows the stage.
    let mut stream = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&image])))
        .await
        .unwrap()
        .into_inner();
    let (_, e) = event(&mut stream).await;
    assert_eq!(progress_of(&e), (image.clone(), events::Stage::Queued));
    let status = images
        .get_image_status(stack.as_user(
            "alice",
            api::GetImageStatusRequest {
                image_id: image.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.image.unwrap().stage(), events::Stage::Queued);
}

#[tokio::test]
async fn idle_watches_get_heartbeats_and_unused_tokens_expire_the_image() {
    let stack = Stack::start_with(
        Vars::from([
            ("FOLLOW_WATCH_HEARTBEAT_SECS", "1".into()),
            // Long enough beside the heartbeat's second for a watch of a fresh image to get
            // a heartbeat before its image expires, even on a loaded machine.
            ("FOLLOW_UPLOAD_TOKEN_TTL_SECS", "3".into()),
            ("FOLLOW_EXPIRY_GRACE_SECS", "0".into()),
            ("FOLLOW_RECONCILE_INTERVAL_SECS", "1".into()),
        ]),
        // The reconciler expires only what it has seen is not in S3.
        true,
    )
    .await;
    let created = create(&stack, "alice", 1).await;
    let image = created.upload_targets[0].image_id.clone();
    let mut images = stack.images().await;
    let mut stream = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&image])))
        .await
        .unwrap()
        .into_inner();
    let failed = loop {
        match next(&mut stream).await.unwrap().event.unwrap() {
            Event::Heartbeat(_) | Event::ImageProgress(_) => {}
            Event::ImageFailed(f) => break f,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(failed.error_code(), events::ErrorCode::TokenExpired);
    let (image_status, waypoint_status): (String, String) = sqlx::query_as(
        "SELECT i.status::text, w.status::text FROM image.images i
         JOIN route.waypoints w ON w.id = i.waypoint_id WHERE i.id = $1::uuid",
    )
    .bind(&image)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        (image_status.as_str(), waypoint_status.as_str()),
        ("EXPIRED", "FAILED")
    );

    // A reissued image's watch, idle: heartbeats keep it open.
    let reissued = stack
        .routes()
        .await
        .reissue_upload(stack.as_user(
            "alice",
            api::ReissueUploadRequest {
                waypoint_id: created.upload_targets[0].waypoint_id.clone(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let fresh = reissued.upload_target.unwrap().image_id;
    let mut stream = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&fresh])))
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut stream).await.unwrap();
    assert!(matches!(first.event, Some(Event::ImageProgress(_))));
    let second = next(&mut stream).await.unwrap();
    assert!(
        matches!(second.event, Some(Event::Heartbeat(_))),
        "{second:?}"
    );
    assert_eq!(second.cursor, first.cursor, "a heartbeat changes nothing");
}

/// The database reads a route watch makes over its whole life, from opening to `route_ready`.
async fn reads_of_a_route_watch(images: usize) -> f64 {
    let stack = Stack::start_with(Vars::new(), true).await;
    let created = create(&stack, "alice", images).await;
    let route_id = created.route.unwrap().id;
    let mut stream = stack
        .images()
        .await
        .watch_image_status(stack.as_user("alice", watch_route(&route_id, "")))
        .await
        .unwrap()
        .into_inner();
    for target in &created.upload_targets {
        process(&stack, &target.image_id, b"preview").await;
    }
    while let Some(message) = next(&mut stream).await {
        if matches!(message.event, Some(Event::RouteReady(_))) {
            assert!(next(&mut stream).await.is_none(), "ends at route_ready");
            break;
        }
    }
    let (_, metrics) = stack.get("/metrics").await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("follow_api_watch_db_reads_total "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn a_route_watch_reads_the_database_a_fixed_number_of_times_however_many_images() {
    // Opening (authorize, then the state) and route_ready: each image's commit arrives whole.
    let (one, twelve) = tokio::join!(reads_of_a_route_watch(1), reads_of_a_route_watch(12));
    assert_eq!((one, twelve), (3.0, 3.0));
}

/// `GET /health` until its body says `part` is `want` (or the deadline).
async fn health_says(stack: &Stack, part: &str, want: &str) {
    follow_testkit::eventually_async(WITHIN, &format!("{part} {want} in /health"), || async {
        let (status, body) = stack.get("/health").await;
        let ok = body.contains(&format!("\"{part}\":\"{want}\""));
        (ok && (status == 200) == (want == "ok")).then_some(())
    })
    .await;
}

/// The progress hub losing Valkey's pub/sub while Valkey itself answers (here: the API's Valkey
/// user loses its channels, and Valkey drops the subscription): `/health` says so, new watches
/// are refused, and when the channels are back the hub reconnects by itself and an open watch
/// gets what is published next.
#[tokio::test]
async fn a_hub_that_loses_pub_sub_shows_in_health_and_recovers_by_itself() {
    let stack = Stack::start().await;
    let route = create(&stack, "alice", 1).await;
    let image_id = route.upload_targets[0].image_id.clone();
    let mut images = stack.images().await;
    let mut open = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&image_id])))
        .await
        .unwrap()
        .into_inner();
    event(&mut open).await; // the state: the watch is live
    health_says(&stack, "progress_hub", "ok").await;

    let mut admin = stack.valkey_server.connection().await;
    let api_user = follow_bus::acl::User::Api.name();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(api_user)
        .arg("resetchannels")
        .query_async(&mut admin)
        .await
        .unwrap();
    health_says(&stack, "progress_hub", "down").await;
    let refused = images
        .watch_image_status(stack.as_user("alice", watch_images(&[&image_id])))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(api_user)
        .arg(format!("&{}", follow_bus::keys::PROGRESS_PATTERN))
        .query_async(&mut admin)
        .await
        .unwrap();
    health_says(&stack, "progress_hub", "ok").await;
    let id: Uuid = image_id.parse().unwrap();
    stack
        .tracker()
        .record(&Progress::reached(id, Stage::Validating))
        .await
        .unwrap();
    loop {
        let (_, event) = event(&mut open).await;
        if let Event::ImageProgress(p) = &event
            && p.stage() == events::Stage::Validating
        {
            break;
        }
    }
}
