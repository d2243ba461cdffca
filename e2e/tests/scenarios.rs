//! The platform end to end, through its public surfaces only. Each test is one scenario of the
//! e2e issue, against the stack `FOLLOW_E2E_MODE` chooses (a throwaway one by default).
#![allow(clippy::unwrap_used)]

use follow_e2e::{
    Platform, Service,
    client::{bearer, jpeg, png_with_alpha, upload, upload_accepted, watch_images},
    relay::Relay,
    user::{User, WAIT},
};
use follow_proto::{
    api::v1::{
        self as api, image_service_client::ImageServiceClient, watch_image_status_request::Target,
        watch_image_status_response::Event,
    },
    events::v1::{ErrorCode, ImageProgress, ProgressNotice, Stage, progress_notice},
    prost::Message,
    tonic::{Code, Streaming, transport::Endpoint},
};
use follow_testkit::eventually_async;
use futures_util::StreamExt;
use redis::AsyncCommands;

/// The stages of an image that goes through, in order.
const ALL_STAGES: [Stage; 7] = [
    Stage::WaitingUpload,
    Stage::Validating,
    Stage::Decoding,
    Stage::Processing,
    Stage::Encoding,
    Stage::UploadingToStorage,
    Stage::Done,
];

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs the repository's Node script `script` (built by `./dev sdk`) with `args`; expects
/// success and returns the JSON summary it prints last.
async fn node<const N: usize>(script: &str, args: [&std::ffi::OsStr; N]) -> serde_json::Value {
    let script = repo().join(script);
    assert!(
        script.is_file(),
        "{} is missing: run ./dev sdk (./dev test does)",
        script.display()
    );
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// Every stage (`ImageProgress`; not the API's commit announcements) published for
/// `image_id`, from the moment of the call.
async fn progress_channel(
    platform: &Platform,
    image_id: &str,
) -> impl futures_util::Stream<Item = ImageProgress> + Unpin {
    let mut pubsub = redis::Client::open(platform.valkey_url.as_str())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(format!("image:progress:{image_id}"))
        .await
        .unwrap();
    Box::pin(pubsub.into_on_message().filter_map(|m| async move {
        match ProgressNotice::decode(m.get_payload_bytes())
            .unwrap()
            .notice
        {
            Some(progress_notice::Notice::Progress(p)) => Some(p),
            _ => None,
        }
    }))
}

/// The gateway's stages (not the API's after-commit announcement) until `done` or `failed`.
async fn stages_until_final(
    channel: &mut (impl futures_util::Stream<Item = ImageProgress> + Unpin),
) -> Vec<Stage> {
    let mut stages = Vec::new();
    while let Some(progress) = tokio::time::timeout(WAIT, channel.next()).await.unwrap() {
        stages.push(progress.stage());
        if matches!(progress.stage(), Stage::Done | Stage::Failed) {
            break;
        }
    }
    stages
}

/// Field `name` of the `image:result` entries of `image_id`.
async fn results_of(platform: &Platform, image_id: &str) -> Vec<redis::streams::StreamId> {
    let mut valkey = platform.valkey().await.unwrap();
    let entries: redis::streams::StreamRangeReply =
        valkey.xrange_all("image:result").await.unwrap();
    entries
        .ids
        .into_iter()
        .filter(|e| e.get::<String>("image_id").as_deref() == Some(image_id))
        .collect()
}

async fn pending_results(platform: &Platform) -> u64 {
    let mut valkey = platform.valkey().await.unwrap();
    let reply: redis::streams::StreamPendingReply = valkey
        .xpending("image:result", "api-workers")
        .await
        .unwrap_or(redis::streams::StreamPendingReply::Empty);
    reply.count() as u64
}

async fn status_field(platform: &Platform, image_id: &str, field: &str) -> Option<String> {
    let mut valkey = platform.valkey().await.unwrap();
    valkey
        .hget(format!("image:status:{image_id}"), field)
        .await
        .unwrap()
}

async fn next_event(stream: &mut Streaming<api::WatchImageStatusResponse>) -> Option<Event> {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("an event within the deadline")
            .unwrap()?;
        match message.event.unwrap() {
            Event::Heartbeat(_) => continue,
            event => return Some(event),
        }
    }
}

/// 1. A route of three waypoints, from creation to READY, checked in every store.
#[tokio::test]
async fn full_flow_from_route_to_ready() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    // Markers chosen to catch any float round trip (text, f32).
    let markers = [
        (0.1, 0.2),
        (0.333_333_333_333_333_3, 0.5),
        (1e-9, 0.987_654_321),
    ];
    let created = user.create_route(&platform, &markers).await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    for target in &created.upload_targets {
        assert_eq!(
            status_field(&platform, &target.image_id, "stage")
                .await
                .as_deref(),
            Some("queued")
        );
    }
    let mut channels = Vec::new();
    for target in &created.upload_targets {
        channels.push(progress_channel(&platform, &target.image_id).await);
    }
    for (i, target) in created.upload_targets.iter().enumerate() {
        upload_accepted(
            &target.upload_url,
            "image/jpeg",
            jpeg(1200 + 100 * i as u32, 800),
        )
        .await;
    }
    for channel in &mut channels {
        assert_eq!(stages_until_final(channel).await, ALL_STAGES);
    }
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    for target in &created.upload_targets {
        let results = results_of(&platform, &target.image_id).await;
        assert_eq!(results.len(), 1);
        assert_eq!(
            results[0].get::<String>("status").as_deref(),
            Some("processed")
        );
    }
    let route = user.route(&platform, &route_id).await;
    assert_eq!(route.waypoints.len(), 3);
    for (waypoint, (x, y)) in route.waypoints.iter().zip(markers) {
        assert_eq!(waypoint.status(), api::WaypointStatus::Confirmed);
        assert_eq!(waypoint.marker_x.to_bits(), x.to_bits());
        assert_eq!(waypoint.marker_y.to_bits(), y.to_bits());
        let image = waypoint.image.as_ref().unwrap();
        assert_eq!(image.status(), api::ImageStatus::Processed);
        assert!(
            image.sha256.len() == 64 && image.sha256.chars().all(|c| c.is_ascii_hexdigit()),
            "{}",
            image.sha256
        );
        assert!(image.processed_width > 0 && image.processed_height > 0);
    }
    let image = user
        .image(&platform, &created.upload_targets[0].image_id)
        .await;
    let preview = reqwest::get(&image.preview_url).await.unwrap();
    assert_eq!(preview.status(), 200);
    assert_eq!(preview.headers()["content-type"], "image/jpeg");
    assert!(
        preview
            .bytes()
            .await
            .unwrap()
            .starts_with(&[0xFF, 0xD8, 0xFF])
    );
    user.clean_up(&platform).await;
}

/// 2. The same upload URL twice: accepted, then refused; the guard stays.
#[tokio::test]
async fn a_second_upload_with_the_same_token_is_a_conflict() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let target = &created.upload_targets[0];
    let (first, _) = upload(&target.upload_url, "image/jpeg", jpeg(64, 64))
        .await
        .unwrap();
    assert_eq!(first, 202);
    let (second, answer) = upload(&target.upload_url, "image/jpeg", jpeg(64, 64))
        .await
        .unwrap();
    assert_eq!(second, 409);
    assert_eq!(answer["error_code"], "DUPLICATE_UPLOAD");
    let mut valkey = platform.valkey().await.unwrap();
    let guard: bool = valkey
        .exists(format!("image:upload:{}", target.image_id))
        .await
        .unwrap();
    assert!(guard);
    user.clean_up(&platform).await;
}

/// 3. Every stage, in order, on the progress channel; the hash ends at `done`.
#[tokio::test]
async fn progress_goes_through_every_stage_in_order() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.25, 0.75)]).await;
    let target = &created.upload_targets[0];
    let mut channel = progress_channel(&platform, &target.image_id).await;
    upload_accepted(&target.upload_url, "image/jpeg", jpeg(3000, 2000)).await;
    assert_eq!(stages_until_final(&mut channel).await, ALL_STAGES);
    assert_eq!(
        status_field(&platform, &target.image_id, "stage")
            .await
            .as_deref(),
        Some("done")
    );
    user.clean_up(&platform).await;
}

/// 4. Bytes that are no image fail the image everywhere; a reissued upload then completes the
/// route.
#[tokio::test]
async fn a_failure_reaches_postgres_and_a_reissued_upload_recovers_the_route() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let target = &created.upload_targets[0];
    let (status, answer) = upload(
        &target.upload_url,
        "image/jpeg",
        b"%PDF-1.7 this is not a photo at all".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(status, 415, "{answer}");
    let entry = eventually_async(WAIT, "a failed result", || async {
        results_of(&platform, &target.image_id)
            .await
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(entry.get::<String>("status").as_deref(), Some("failed"));
    let code: String = entry.get("error_code").unwrap();
    assert!(code.contains("INVALID"), "{code}");
    let db = platform.database().await.unwrap();
    let (status, error_code): (String, Option<String>) =
        eventually_async(WAIT, "the image failed in PostgreSQL", || async {
            let row: (String, Option<String>) = sqlx::query_as(
                "SELECT status::text, error_code FROM image.images WHERE id = $1::uuid",
            )
            .bind(&target.image_id)
            .fetch_one(&db)
            .await
            .unwrap();
            (row.0 == "FAILED").then_some(row)
        })
        .await;
    assert_eq!(
        (status.as_str(), error_code.as_deref()),
        ("FAILED", Some(code.as_str()))
    );
    let image = user.image(&platform, &target.image_id).await;
    assert_eq!(image.error_code(), ErrorCode::InvalidImage);

    let reissued = platform
        .routes()
        .await
        .unwrap()
        .reissue_upload(bearer(
            api::ReissueUploadRequest {
                waypoint_id: target.waypoint_id.clone(),
                content_type: "image/png".into(),
                file_size: 5_000_000,
            },
            &user.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let retry = reissued.upload_target.unwrap();
    user.images.push(retry.image_id.clone());
    upload_accepted(&retry.upload_url, "image/png", png_with_alpha(300, 200)).await;
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    let image = user.image(&platform, &retry.image_id).await;
    assert_eq!(image.status(), api::ImageStatus::Processed);
    user.clean_up(&platform).await;
}

/// 5. The live watch, native gRPC and grpc-web side by side: progress, then processed with a
/// preview URL.
#[tokio::test]
async fn live_watch_over_grpc_and_grpc_web() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.1, 0.1)]).await;
    let target = &created.upload_targets[0];
    let id = target.image_id.as_str();
    let mut native = platform
        .images()
        .await
        .unwrap()
        .watch_image_status(bearer(watch_images(&[id]), &user.token))
        .await
        .unwrap()
        .into_inner();
    let mut web = platform
        .images_web()
        .unwrap()
        .watch_image_status(bearer(watch_images(&[id]), &user.token))
        .await
        .unwrap()
        .into_inner();
    // Both streams are live once their snapshot (the `queued` stage) has arrived.
    for stream in [&mut native, &mut web] {
        let Some(Event::ImageProgress(first)) = next_event(stream).await else {
            panic!("expected the current stage first");
        };
        assert_eq!(first.stage(), Stage::Queued);
    }
    upload_accepted(&target.upload_url, "image/jpeg", jpeg(800, 600)).await;
    for stream in [&mut native, &mut web] {
        let mut stages = Vec::new();
        let processed = loop {
            match next_event(stream).await {
                Some(Event::ImageProgress(p)) => stages.push(p.stage()),
                Some(Event::ImageProcessed(p)) => break p,
                other => panic!("unexpected {other:?} after {stages:?}"),
            }
        };
        assert!(!stages.is_empty(), "progress before the result");
        assert!(stages.is_sorted(), "{stages:?}");
        assert_eq!(processed.image.unwrap().id, id);
        assert!(
            processed.preview_url.starts_with("http"),
            "{}",
            processed.preview_url
        );
        assert!(next_event(stream).await.is_none(), "the stream ends");
    }
    user.clean_up(&platform).await;
}

/// 6a. Results published while the API is down are all applied once it is back.
#[tokio::test]
async fn results_published_while_the_api_is_down_are_applied_after_it_starts() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("spawn or compose mode to stop the API") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.2, 0.2), (0.8, 0.8)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    platform.stop(Service::Api).await.unwrap();
    for target in &created.upload_targets {
        upload_accepted(&target.upload_url, "image/jpeg", jpeg(640, 480)).await;
    }
    for target in &created.upload_targets {
        eventually_async(WAIT, "the gateway's result", || async {
            (!results_of(&platform, &target.image_id).await.is_empty()).then_some(())
        })
        .await;
    }
    platform.start_service(Service::Api, &[]).await.unwrap();
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    eventually_async(WAIT, "an empty pending list", || async {
        (pending_results(&platform).await == 0).then_some(())
    })
    .await;
    user.clean_up(&platform).await;
}

/// 6b. The API killed between its commit and its acknowledgement: the entry is delivered again,
/// applied once (the second time it is ignored), and the pending list drains.
#[tokio::test]
async fn a_crash_between_commit_and_ack_redelivers_and_applies_once() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("a failpoint-enabled follow-api") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.4, 0.6)]).await;
    let target = &created.upload_targets[0];
    // Restart the API with the failpoint paused right after the commit.
    platform.stop(Service::Api).await.unwrap();
    platform
        .start_service(
            Service::Api,
            &[("FAILPOINTS", Some("api-results-after-commit=pause"))],
        )
        .await
        .unwrap();
    upload_accepted(&target.upload_url, "image/jpeg", jpeg(640, 480)).await;
    let db = platform.database().await.unwrap();
    // What a redelivery must leave alone: status, the entry that won, and the last update.
    let row = || async {
        let row: (String, Option<String>, String) = sqlx::query_as(
            "SELECT status::text, result_entry_id, updated_at::text FROM image.images WHERE id = $1::uuid",
        )
        .bind(&target.image_id)
        .fetch_one(&db)
        .await
        .unwrap();
        row
    };
    let committed_at = eventually_async(WAIT, "the commit", || async {
        let row = row().await;
        (row.0 == "PROCESSED").then_some(row)
    })
    .await;
    assert_eq!(
        pending_results(&platform).await,
        1,
        "committed but not acknowledged: is follow-api built with the `failpoints` feature? \
         (./dev test builds it so)\n{}",
        platform.log(Service::Api)
    );
    platform.kill(Service::Api).await.unwrap();
    platform
        .start_service(Service::Api, &[("FAILPOINTS", None)])
        .await
        .unwrap();
    eventually_async(WAIT, "the pending list drained", || async {
        (pending_results(&platform).await == 0).then_some(())
    })
    .await;
    let after = row().await;
    assert_eq!(after, committed_at, "the redelivery changed nothing");
    let applied = async |outcome: &str| {
        let name = format!("follow_api_results_applied_total{{outcome=\"{outcome}\"}}");
        platform.metric(&platform.api_url, &name).await.unwrap()
    };
    assert_eq!(
        (applied("ignored").await, applied("processed").await),
        (1.0, 0.0)
    );
    user.clean_up(&platform).await;
}

/// 7. Valkey down: both healths say so, route creation is UNAVAILABLE, uploads get 503; after it
/// returns everything works again.
#[tokio::test]
async fn valkey_down_is_reported_and_refused_and_recovered_from() {
    let mut platform = Platform::start().await.unwrap();
    for url in [&platform.api_url, &platform.gateway_url] {
        let (status, body) = platform.health(url).await.unwrap();
        assert_eq!(
            (status, body["valkey"].as_str()),
            (200, Some("ok")),
            "{url}"
        );
    }
    if !platform.can_control("spawn or compose mode to stop Valkey") {
        return;
    }
    let mut user = User::new(&platform).await;
    let before = user.create_route(&platform, &[(0.3, 0.3)]).await;
    platform.stop(Service::Valkey).await.unwrap();
    for url in [platform.api_url.clone(), platform.gateway_url.clone()] {
        eventually_async(WAIT, "health reporting Valkey down", || async {
            let (status, body) = platform.health(&url).await.ok()?;
            (status == 503 && body["valkey"] != "ok").then_some(())
        })
        .await;
    }
    let refused = user
        .try_create_route(&platform, &[(0.5, 0.5)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    let (status, answer) = upload(
        &before.upload_targets[0].upload_url,
        "image/jpeg",
        jpeg(64, 64),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "{answer}");

    platform.start_service(Service::Valkey, &[]).await.unwrap();
    for url in [platform.api_url.clone(), platform.gateway_url.clone()] {
        eventually_async(WAIT, "health reporting Valkey ok", || async {
            let (status, _) = platform.health(&url).await.ok()?;
            (status == 200).then_some(())
        })
        .await;
    }
    // As a client does: UNAVAILABLE and 503 are retried (the API's breaker lets a probe
    // through within seconds of Valkey's return).
    let after = eventually_async(WAIT, "a route created again", || async {
        match user.try_create_route(&platform, &[(0.6, 0.6)]).await {
            Ok(created) => Some(created),
            Err(status) if status.code() == Code::Unavailable => None,
            Err(status) => panic!("{status:?}"),
        }
    })
    .await;
    user.images
        .extend(after.upload_targets.iter().map(|t| t.image_id.clone()));
    let route_id = after.route.as_ref().unwrap().id.clone();
    let url = &after.upload_targets[0].upload_url;
    let status = eventually_async(WAIT, "an upload accepted again", || async {
        let (status, _) = upload(url, "image/jpeg", jpeg(320, 240)).await.unwrap();
        (status != 503).then_some(status)
    })
    .await;
    assert_eq!(status, 202);
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    user.clean_up(&platform).await;
}

/// 8. Publishing: refused while the route is PENDING, done once it is READY.
#[tokio::test]
async fn publish_is_refused_while_pending_and_works_when_ready() {
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.9, 0.1)]).await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let publish = || async {
        platform
            .routes()
            .await
            .unwrap()
            .publish_route(bearer(
                api::PublishRouteRequest {
                    route_id: route_id.clone(),
                },
                &user.token,
            ))
            .await
    };
    assert_eq!(
        publish().await.unwrap_err().code(),
        Code::FailedPrecondition
    );
    upload_accepted(
        &created.upload_targets[0].upload_url,
        "image/jpeg",
        jpeg(500, 400),
    )
    .await;
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    let published = publish().await.unwrap().into_inner().route.unwrap();
    assert_eq!(published.status(), api::RouteStatus::Published);
    assert!(published.publish_time.is_some());
    user.clean_up(&platform).await;
}

/// Two API instances and no sticky routing: a watcher on one sees every event of a route whose
/// results either instance applied, and a client that moves to the other instance with its last
/// cursor gets exactly what it missed — nothing twice.
#[tokio::test]
async fn watchers_follow_a_route_across_api_instances_and_resume_on_another() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("to start a second API instance") {
        return;
    }
    let second = platform.add_api(&[]).await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.2, 0.4), (0.6, 0.8)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let (first, other) = (&created.upload_targets[0], &created.upload_targets[1]);
    let watch_route = |cursor: &str| api::WatchImageStatusRequest {
        target: Some(Target::RouteId(route_id.clone())),
        resume_cursor: cursor.to_owned(),
    };
    let mut on_second = platform
        .images_at(&second)
        .await
        .unwrap()
        .watch_image_status(bearer(watch_route(""), &user.token))
        .await
        .unwrap()
        .into_inner();
    upload_accepted(&first.upload_url, "image/jpeg", jpeg(640, 480)).await;
    let cursor = loop {
        let message = tokio::time::timeout(WAIT, on_second.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match message.event.unwrap() {
            Event::ImageProcessed(p) => {
                assert_eq!(p.image.unwrap().id, first.image_id);
                break message.cursor;
            }
            Event::ImageProgress(_) | Event::Heartbeat(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    drop(on_second);

    // While no one watches, the second image goes through.
    upload_accepted(&other.upload_url, "image/jpeg", jpeg(640, 480)).await;
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;

    // Back on the first instance with the cursor: the missed outcome, READY, the end.
    let mut on_first = platform
        .images()
        .await
        .unwrap()
        .watch_image_status(bearer(watch_route(&cursor), &user.token))
        .await
        .unwrap()
        .into_inner();
    let mut missed = Vec::new();
    while let Some(event) = next_event(&mut on_first).await {
        missed.push(match event {
            Event::ImageProcessed(p) => format!("processed {}", p.image.unwrap().id),
            Event::RouteReady(_) => "ready".to_owned(),
            other => panic!("not missed, or sent twice: {other:?}"),
        });
    }
    assert_eq!(
        missed,
        [format!("processed {}", other.image_id), "ready".into()]
    );
    user.clean_up(&platform).await;
}

/// A watch on the API at `url` whose HTTP/2 stream window holds one byte, for a client that
/// does not read: after its first event the server can send it nothing, its end included.
async fn unread_watch(
    url: &str,
    request: follow_proto::tonic::Request<api::WatchImageStatusRequest>,
) -> Streaming<api::WatchImageStatusResponse> {
    let cramped = Endpoint::from_shared(url.to_owned())
        .unwrap()
        .initial_stream_window_size(Some(1))
        .connect()
        .await
        .unwrap();
    ImageServiceClient::new(cramped)
        .watch_image_status(request)
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the API at `url` has `n` watch streams open.
async fn until_watchers(platform: &Platform, url: &str, n: f64) {
    eventually_async(WAIT, "the API's open watch streams", || async {
        let active = platform
            .metric(url, "follow_api_watchers_active")
            .await
            .unwrap();
        (active == n).then_some(())
    })
    .await;
}

/// What a watch event says, in short: `progress {image} {stage}`, `processed {image}`,
/// `failed {image}`, `ready`, `heartbeat`.
fn said(event: &Event) -> String {
    match event {
        Event::ImageProgress(p) => format!("progress {} {:?}", p.image_id, p.stage()),
        Event::ImageProcessed(p) => format!("processed {}", p.image.as_ref().unwrap().id),
        Event::ImageFailed(f) => format!("failed {}", f.image_id),
        Event::RouteReady(_) => "ready".into(),
        Event::Heartbeat(_) => "heartbeat".into(),
    }
}

/// Every event of `stream` until it ends, in short ([`said`]), without heartbeats.
async fn all_events(stream: &mut Streaming<api::WatchImageStatusResponse>) -> Vec<String> {
    let mut events = Vec::new();
    while let Some(event) = next_event(stream).await {
        events.push(said(&event));
    }
    events
}

/// Issue 6, slow watcher, across two API processes: a client that stops reading holds up no
/// other watcher (on either instance); once it has left events untaken for longer than
/// `FOLLOW_WATCH_MAX_LAG_SECS` while more come, its instance ends its stream with
/// `RESOURCE_EXHAUSTED` and frees it; resuming with its last cursor on the other instance gives
/// it exactly what it missed, nothing twice.
#[tokio::test]
async fn a_slow_watcher_holds_up_no_one_is_ended_and_resumes_on_another_instance() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("to start a second API instance") {
        return;
    }
    let second = platform
        .add_api(&[("FOLLOW_WATCH_MAX_LAG_SECS", "1")])
        .await
        .unwrap();
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.1, 0.1), (0.5, 0.5), (0.9, 0.9)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let watch_route = |cursor: &str| {
        bearer(
            api::WatchImageStatusRequest {
                target: Some(Target::RouteId(route_id.clone())),
                resume_cursor: cursor.to_owned(),
            },
            &user.token,
        )
    };

    // The slow client on the second instance reads nothing until told.
    let mut slow = unread_watch(&second, watch_route("")).await;
    let mut fast_first = platform
        .images()
        .await
        .unwrap()
        .watch_image_status(watch_route(""))
        .await
        .unwrap()
        .into_inner();
    let mut fast_second = platform
        .images_web_at(&second)
        .unwrap()
        .watch_image_status(watch_route(""))
        .await
        .unwrap()
        .into_inner();

    for target in &created.upload_targets {
        upload_accepted(&target.upload_url, "image/jpeg", jpeg(640, 480)).await;
    }
    // Both fast watchers see everything, in order, once, and the end, while the slow one
    // reads nothing.
    let expected_end: Vec<String> = created
        .upload_targets
        .iter()
        .map(|t| format!("processed {}", t.image_id))
        .collect();
    let (first_saw, second_saw) =
        tokio::join!(all_events(&mut fast_first), all_events(&mut fast_second));
    for saw in [&first_saw, &second_saw] {
        let mut finals: Vec<_> = saw
            .iter()
            .filter(|e| e.starts_with("processed"))
            .cloned()
            .collect();
        finals.sort();
        let mut expected = expected_end.clone();
        expected.sort();
        assert_eq!(finals, expected, "{saw:?}");
        assert_eq!(saw.last().map(String::as_str), Some("ready"), "{saw:?}");
        let mut unique = saw.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), saw.len(), "nothing twice: {saw:?}");
    }

    // More reports keep coming for the route's images (late duplicates, as a retrying gateway
    // sends; they change nothing) until the second instance gives up on the slow watcher.
    let lagged = async || {
        platform
            .metric(&second, "follow_api_watchers_lagged_total")
            .await
            .unwrap()
    };
    let valkey = platform.valkey().await.unwrap();
    let image_id = &created.upload_targets[0].image_id;
    let stale = ImageProgress {
        image_id: image_id.clone(),
        stage: Stage::Validating as i32,
        seq: 3,
        time: Some(std::time::SystemTime::now().into()),
        ..Default::default()
    };
    eventually_async(WAIT, "the slow watcher ended for lagging", || async {
        let _: () = valkey
            .clone()
            .publish(
                format!("image:progress:{image_id}"),
                ProgressNotice {
                    notice: Some(progress_notice::Notice::Progress(stale.clone())),
                }
                .encode_to_vec(),
            )
            .await
            .unwrap();
        (lagged().await >= 1.0).then_some(())
    })
    .await;
    assert_eq!(lagged().await, 1.0, "only the slow watcher lagged");

    // The slow client now reads: what was in flight, then the end with its reason.
    let mut before = Vec::new();
    let mut cursor = String::new();
    let ended = loop {
        match tokio::time::timeout(WAIT, slow.message()).await.unwrap() {
            Ok(Some(message)) => {
                cursor = message.cursor.clone();
                before.push(said(message.event.as_ref().unwrap()));
            }
            Ok(None) => panic!("ended without a status: {before:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::ResourceExhausted, "{ended:?}");
    assert!(ended.message().contains("cursor"), "{ended:?}");
    until_watchers(&platform, &second, 0.0).await;

    // Resumed on the first instance with its last cursor: exactly what it missed.
    let mut resumed = platform
        .images()
        .await
        .unwrap()
        .watch_image_status(watch_route(&cursor))
        .await
        .unwrap()
        .into_inner();
    let after = all_events(&mut resumed).await;
    let mut all = [before.clone(), after.clone()].concat();
    assert_eq!(all.last().map(String::as_str), Some("ready"), "{all:?}");
    for end in &expected_end {
        assert_eq!(
            all.iter().filter(|e| *e == end).count(),
            1,
            "{before:?} then {after:?}"
        );
    }
    all.sort();
    let total = all.len();
    all.dedup();
    assert_eq!(all.len(), total, "nothing twice: {before:?} then {after:?}");
    user.clean_up(&platform).await;
}

/// Issue 6, vanished client, across two API processes: a client whose network vanishes
/// (connection open, nothing answered) is noticed by the instance's HTTP/2 keepalive and its
/// watch freed: its stream and its image's registration in the instance's progress hub go. A
/// quiet but present watcher on the same instance stays and still gets its events.
#[tokio::test]
async fn a_vanished_watcher_is_noticed_by_keepalive_and_freed() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("to start a second API instance") {
        return;
    }
    let second = platform
        .add_api(&[
            ("FOLLOW_KEEPALIVE_SECS", "1"),
            ("FOLLOW_KEEPALIVE_TIMEOUT_SECS", "1"),
        ])
        .await
        .unwrap();
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.2, 0.2), (0.8, 0.8)])
        .await;
    let (gone, stays) = (&created.upload_targets[0], &created.upload_targets[1]);

    let relay = Relay::start(&second).await.unwrap();
    let mut vanishing = platform
        .images_at(&relay.url)
        .await
        .unwrap()
        .watch_image_status(bearer(watch_images(&[&gone.image_id]), &user.token))
        .await
        .unwrap()
        .into_inner();
    let mut present = platform
        .images_at(&second)
        .await
        .unwrap()
        .watch_image_status(bearer(watch_images(&[&stays.image_id]), &user.token))
        .await
        .unwrap()
        .into_inner();
    for stream in [&mut vanishing, &mut present] {
        assert!(matches!(
            next_event(stream).await,
            Some(Event::ImageProgress(_))
        ));
    }
    // What the instance holds: streams, and images it routes progress for.
    let held = async || {
        let metric = async |name| platform.metric(&second, name).await.unwrap();
        (
            metric("follow_api_watchers_active").await,
            metric("follow_api_hub_channels").await,
        )
    };
    assert_eq!(held().await, (2.0, 2.0));

    relay.freeze();
    eventually_async(WAIT, "the vanished watcher freed", || async {
        (held().await == (1.0, 1.0)).then_some(())
    })
    .await;

    // The present watcher was kept (it answers PINGs) and goes on.
    upload_accepted(&stays.upload_url, "image/jpeg", jpeg(320, 240)).await;
    let saw = all_events(&mut present).await;
    assert_eq!(
        saw.last(),
        Some(&format!("processed {}", stays.image_id)),
        "{saw:?}"
    );
    drop(relay);
    user.clean_up(&platform).await;
}

/// Issue 6, shutdown: SIGTERM ends every watch stream; one whose client does not read (so its
/// end cannot be sent) is cut after `FOLLOW_SHUTDOWN_GRACE_SECS` instead of holding the process.
#[tokio::test]
async fn a_stalled_watcher_does_not_hold_up_shutdown() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to stop the API") {
        return;
    }
    platform.stop(Service::Api).await.unwrap();
    platform
        .start_service(Service::Api, &[("FOLLOW_SHUTDOWN_GRACE_SECS", Some("1"))])
        .await
        .unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let image_id = created.upload_targets[0].image_id.clone();
    let _stalled = unread_watch(
        &platform.api_url,
        bearer(watch_images(&[&image_id]), &user.token),
    )
    .await;
    until_watchers(&platform, &platform.api_url, 1.0).await;
    // Within the harness's 30 s, or it fails.
    platform.stop(Service::Api).await.unwrap();
    platform.start_service(Service::Api, &[]).await.unwrap();
    user.clean_up(&platform).await;
}

/// The TypeScript SDK generated from the contracts (`sdk/typescript`, built by `./dev sdk`)
/// drives the platform as a browser would — grpc-web and fetch: a route, its live watch, the
/// upload, every stage, READY, and the preview.
#[tokio::test]
async fn the_typescript_sdk_drives_the_platform_over_grpc_web() {
    let platform = Platform::start().await.unwrap();
    let user = User::new(&platform).await;
    let photo = repo().join("demo/photo.jpg");
    let summary = node(
        "sdk/typescript/dist/smoke.js",
        [
            platform.api_url.as_ref(),
            user.token.as_ref(),
            photo.as_os_str(),
        ],
    )
    .await;
    let stages: Vec<&str> = summary["stages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s.as_str())
        .collect();
    assert_eq!(
        stages,
        [
            "QUEUED",
            "WAITING_UPLOAD",
            "VALIDATING",
            "DECODING",
            "PROCESSING",
            "ENCODING",
            "UPLOADING_TO_STORAGE",
            "DONE"
        ]
    );
    assert_eq!(summary["previewStatus"], 200);
    assert_eq!(summary["previewType"], "image/jpeg");
    user.clean_up(&platform).await;
}

/// The demo page (`web/`, on the generated SDK) in headless Chromium, driven by Playwright:
/// signed in with a dev token, two photos chosen, the route created — and the page ends showing
/// every image DONE with its preview loaded and the route READY.
#[tokio::test]
async fn the_web_page_in_chromium_shows_every_photo_processed() {
    let platform = Platform::start().await.unwrap();
    let page = repo().join("web/dist/app.js");
    assert!(
        page.is_file(),
        "{} is missing: run ./dev sdk (./dev test does)",
        page.display()
    );
    let user = User::new(&platform).await;
    let photo = repo().join("demo/photo.jpg");
    let summary = node(
        "web/test/browser.mjs",
        [
            platform.api_url.as_ref(),
            user.token.as_ref(),
            photo.as_os_str(),
            photo.as_os_str(),
        ],
    )
    .await;
    assert_eq!(summary["route"], "READY");
    let images = summary["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    for image in images {
        assert_eq!(image["stage"], "DONE");
        assert_eq!(image["uploaded"], 1);
        assert!(image["preview"].as_u64().unwrap() > 0);
    }
    user.clean_up(&platform).await;
}

/// The dev token the page is served with (config.json of `./dev up`) is only ever sent to its own
/// loopback API: not to an API named by `?api=`, nor to one typed into the page.
#[tokio::test]
async fn the_web_pages_dev_token_never_goes_to_another_origin() {
    let photo = repo().join("demo/photo.jpg");
    let summary = node("web/test/token-binding.mjs", [photo.as_os_str()]).await;
    assert_eq!(summary["queryApi"]["token"], "", "{summary}");
    assert!(
        summary["queryApi"]["note"]
            .as_str()
            .unwrap()
            .contains("sent only to"),
        "{summary}"
    );
    assert!(
        summary["queryApi"]["bRequests"].as_u64().unwrap() > 0,
        "the page called the other API, without the token: {summary}"
    );
    assert!(
        summary["editedApi"]["error"]
            .as_str()
            .unwrap()
            .contains("only sent to"),
        "{summary}"
    );
    assert_eq!(summary["bSawToken"], false, "{summary}");
    assert_eq!(summary["aSawToken"], true, "the control: {summary}");
}
