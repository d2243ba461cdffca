//! Live progress as watchers see it: native gRPC and grpc-web side by side, across API instances
//! with resume, and watchers that are slow, vanish or stall.
#![allow(clippy::unwrap_used)]

use follow_e2e::{
    Platform, Service,
    client::{bearer, jpeg, upload_accepted, watch_images},
    observe,
    observe::next_event,
    relay::Relay,
    user::{User, WAIT},
};
use follow_proto::{
    api::v1::{
        self as api, image_service_client::ImageServiceClient, watch_image_status_request::Target,
        watch_image_status_response::Event,
    },
    events::v1::{ImageProgress, ProgressNotice, Stage, progress_notice},
    prost::Message,
    tonic::{Code, Streaming, transport::Endpoint},
};
use follow_testkit::eventually_async;

/// The live watch, native gRPC and grpc-web side by side: progress, then processed with a
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
        let _: () = redis::cmd(platform.publish_command())
            .arg(platform.partitions.progress(observe::uuid(image_id)))
            .arg(
                ProgressNotice {
                    notice: Some(progress_notice::Notice::Progress(stale.clone())),
                }
                .encode_to_vec(),
            )
            .query_async(&mut valkey.clone())
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
