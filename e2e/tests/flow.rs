//! The main flow of a route, end to end through the public surfaces: creation to READY, a duplicate
//! upload, every stage in order, a failed image and its reissue, publishing.
#![allow(clippy::unwrap_used)]

use follow_e2e::{
    Platform,
    client::{bearer, jpeg, png_with_alpha, upload, upload_accepted},
    observe,
    observe::{ALL_STAGES, progress_channel, results_of, stages_until_final, status_field},
    user::{User, WAIT},
};
use follow_proto::{
    api::v1::{self as api},
    events::v1::{self as events, ErrorCode},
    tonic::Code,
};
use follow_testkit::eventually_async;
use redis::AsyncCommands;
use sha2::{Digest as _, Sha256};

/// A route of three waypoints, from creation to READY, checked in every store.
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

/// Photos as an iPhone saves them — HEIC, 12 MP in a grid of 48 tiles, 10-bit and stored on
/// its side (`irot` and an EXIF orientation saying the same), and 8-bit upright — from
/// `CreateRouteWithWaypoints` to PROCESSED: the original's SHA-256, its size upright, JPEG and
/// WebP files of the main image and the preview (each fetched: its type and size as listed),
/// a placeholder of its shape, the metadata stripped named.
#[tokio::test]
async fn phone_heic_photos_are_processed_upright() {
    let photos: [(&str, &[u8], (u32, u32)); 2] = [
        (
            "image/heic",
            include_bytes!("../../demo/phone.heic"),
            (3024, 4032),
        ),
        (
            "image/heif",
            include_bytes!("../../services/gateway/tests/fixtures/heic/12mp.heic"),
            (4032, 3024),
        ),
    ];
    let platform = Platform::start().await.unwrap();
    let mut user = User::new(&platform).await;
    let types: Vec<&str> = photos.iter().map(|(t, _, _)| *t).collect();
    let created = user
        .create_route_of_types(&platform, &types, 1_000_000)
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    for (target, (content_type, bytes, _)) in created.upload_targets.iter().zip(photos) {
        upload_accepted(&target.upload_url, content_type, bytes.to_vec()).await;
    }
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    for (target, (content_type, bytes, (width, height))) in
        created.upload_targets.iter().zip(photos)
    {
        let image = user.image(&platform, &target.image_id).await;
        assert_eq!(
            image.status(),
            api::ImageStatus::Processed,
            "{content_type}"
        );
        assert_eq!(image.sha256, hex::encode(Sha256::digest(bytes)));
        assert_eq!(
            (image.width, image.height),
            (width, height),
            "{content_type}"
        );
        let long = 2048;
        let (w, h) = (image.processed_width, image.processed_height);
        assert_eq!(w.max(h), long, "{content_type}");
        assert_eq!(w > h, width > height, "{content_type}: upright");
        // The placeholder, of the photo's shape.
        let aspect = thumbhash::thumb_hash_to_approximate_aspect_ratio(&image.thumbhash).unwrap();
        let want = width as f32 / height as f32;
        assert!((aspect - want).abs() / want < 0.25, "{aspect} for {want}");
        let preview = reqwest::get(&image.preview_url).await.unwrap();
        assert_eq!(preview.headers()["content-type"], "image/jpeg");
        // Both formats of both roles, each as listed.
        let mut listed: Vec<_> = image
            .files
            .iter()
            .map(|f| (f.role(), f.content_type.as_str()))
            .collect();
        listed.sort();
        assert_eq!(
            listed,
            [
                (events::OutputRole::Main, "image/jpeg"),
                (events::OutputRole::Main, "image/webp"),
                (events::OutputRole::Preview, "image/jpeg"),
                (events::OutputRole::Preview, "image/webp"),
            ]
        );
        for file in &image.files {
            let fetched = reqwest::get(&file.url).await.unwrap();
            assert_eq!(
                fetched.headers()["content-type"],
                file.content_type.as_str()
            );
            let bytes = fetched.bytes().await.unwrap();
            assert_eq!(bytes.len() as u64, file.byte_size, "{file:?}");
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!(
                (decoded.width(), decoded.height()),
                (file.width, file.height)
            );
        }
        // The phone's EXIF (its make, an orientation) is named; the plain file has none.
        let stripped: Vec<_> = image.stripped_metadata().collect();
        let expected: &[events::MetadataKind] = if content_type == "image/heic" {
            &[events::MetadataKind::Exif, events::MetadataKind::Camera]
        } else {
            &[]
        };
        assert_eq!(stripped, expected, "{content_type}");
    }
    user.clean_up(&platform).await;
}

/// The same upload URL twice: accepted, then refused; the guard stays.
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
        .exists(
            platform
                .partitions
                .upload_guard(observe::uuid(&target.image_id)),
        )
        .await
        .unwrap();
    assert!(guard);
    user.clean_up(&platform).await;
}

/// Every stage, in order, on the progress channel; the hash ends at `done`.
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

/// Bytes that are no image fail the image everywhere; a reissued upload then completes the
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

/// Publishing: refused while the route is PENDING, done once it is READY.
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
