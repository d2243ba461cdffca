//! Durable uploads (issue 13), end to end with real processes: a `202` means the photo is safe.
//! Gateways are killed with SIGKILL at every step of an upload's life, two gateways share the
//! work while one keeps dying, Valkey is restarted empty, and S3 refuses or stops answering —
//! every accepted upload still ends PROCESSED exactly once, with its objects matching its row and
//! no original left behind.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use follow_e2e::{
    Platform, Service,
    client::{jpeg, upload, upload_accepted},
    every, keys, observe,
    user::{User, WAIT},
};
use follow_proto::api::v1 as api;
use follow_testkit::eventually_async;
use redis::AsyncCommands;

/// What the database says of an image, and what S3 must hold for it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
struct Row {
    status: String,
    storage_key: String,
    preview_key: Option<String>,
    byte_size: Option<i64>,
}

async fn row(platform: &Platform, image_id: &str) -> Row {
    sqlx::query_as(
        "SELECT status::text AS status, storage_key, preview_key, byte_size
         FROM image.images WHERE id = $1::uuid",
    )
    .bind(image_id)
    .fetch_one(&platform.database().await.unwrap())
    .await
    .unwrap()
}

/// Waits until the image is PROCESSED, then checks its objects against its row: the image and
/// the preview are there (the image of the recorded size), the original is gone.
async fn processed_once(platform: &Platform, image_id: &str) -> Row {
    let row = eventually_async(WAIT, "the image PROCESSED", || async {
        let row = row(platform, image_id).await;
        (row.status == "PROCESSED").then_some(row)
    })
    .await;
    let (s3, bucket) = platform.bucket().unwrap();
    let head = |key: String| {
        let (s3, bucket) = (s3.clone(), bucket.clone());
        async move { s3.head_object().bucket(bucket).key(key).send().await }
    };
    let image = head(row.storage_key.clone()).await.unwrap();
    assert_eq!(
        image.content_length(),
        row.byte_size,
        "{image_id}: the object of the row"
    );
    head(row.preview_key.clone().unwrap()).await.unwrap();
    assert!(
        head(format!("{}.original", row.storage_key)).await.is_err(),
        "{image_id}: no original left behind"
    );
    row
}

/// How many results the API instance at `url` applied as `outcome` since it started.
async fn applied(platform: &Platform, url: &str, outcome: &str) -> f64 {
    let name = format!("follow_api_results_applied_total{{outcome=\"{outcome}\"}}");
    platform.metric(url, &name).await.unwrap()
}

async fn pending_jobs(platform: &Platform) -> u64 {
    observe::pending(platform, keys::JOBS).await
}

/// The gateway paused at a failpoint (`FAILPOINTS=point=pause`), killed there, restarted.
async fn restart_gateway_paused_at(platform: &mut Platform, point: Option<&str>) {
    let failpoints = point.map(|p| format!("{p}=pause"));
    platform.kill(Service::Gateway).await.unwrap();
    platform
        .start_service(Service::Gateway, &[("FAILPOINTS", failpoints.as_deref())])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_gateway_killed_at_any_step_loses_no_accepted_photo() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to kill the gateway") {
        return;
    }
    // A short body idle timeout: the guard of a body cut by the crash is let go of quickly.
    platform.stop(Service::Gateway).await.unwrap();
    platform
        .start_service(
            Service::Gateway,
            &[("FOLLOW_BODY_IDLE_TIMEOUT_SECS", Some("2"))],
        )
        .await
        .unwrap();
    let mut user = User::new(&platform).await;
    let db = platform.database().await.unwrap();
    let valkey = platform.valkey().await.unwrap();
    let mut processed = 0.0;
    for point in [
        "gateway-receiving",
        "gateway-before-enqueue",
        "gateway-job-start",
        "gateway-mid-pipeline",
        "gateway-before-handoff",
        "after-handoff",
    ] {
        let failpoint = (point != "after-handoff").then_some(point);
        restart_gateway_paused_at(&mut platform, failpoint).await;
        let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
        let target = created.upload_targets[0].clone();
        let body = jpeg(800, 600);
        let sending = tokio::spawn({
            let (url, body) = (target.upload_url.clone(), body.clone());
            async move { upload(&url, "image/jpeg", body).await }
        });
        // Until the gateway is stuck at the point (or done), then the crash.
        let image = target.image_id.clone();
        let reached = || async {
            match point {
                "gateway-receiving" => {
                    let guard: Option<String> = valkey
                        .clone()
                        .get(platform.partitions.upload_guard(observe::uuid(&image)))
                        .await
                        .unwrap();
                    guard.is_some()
                }
                "gateway-before-enqueue" => {
                    let (s3, bucket) = platform.bucket().unwrap();
                    let key = row(&platform, &image).await.storage_key + ".original";
                    s3.head_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .is_ok()
                }
                "gateway-job-start" => pending_jobs(&platform).await == 1,
                "gateway-mid-pipeline" => {
                    let stage: Option<String> = valkey
                        .clone()
                        .hget(platform.partitions.status(observe::uuid(&image)), "stage")
                        .await
                        .unwrap();
                    stage.as_deref() == Some("encoding")
                }
                "gateway-before-handoff" => {
                    let (s3, bucket) = platform.bucket().unwrap();
                    let key = row(&platform, &image).await.storage_key + ".result.json";
                    s3.head_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .is_ok()
                }
                _ => row(&platform, &image).await.status == "PROCESSED",
            }
        };
        eventually_async(WAIT, point, || async { reached().await.then_some(()) }).await;
        if failpoint.is_some() {
            assert_eq!(
                row(&platform, &image).await.status,
                "PENDING",
                "{point}: held there (is the gateway built with its `failpoints` feature? ./dev test builds it so)"
            );
        }
        platform.kill(Service::Gateway).await.unwrap();
        let answer = sending.await.unwrap();
        platform
            .start_service(Service::Gateway, &[("FAILPOINTS", None)])
            .await
            .unwrap();
        match point {
            // The body was cut: nothing was spent; the same token works once its lease is over.
            "gateway-receiving" => {
                assert!(
                    answer.is_err(),
                    "{point}: the connection died with the gateway"
                );
                eventually_async(WAIT, "the same token accepted", || async {
                    let (status, answer) = upload(&target.upload_url, "image/jpeg", body.clone())
                        .await
                        .unwrap();
                    assert!(matches!(status, 202 | 409), "{status} {answer}");
                    (status == 202).then_some(())
                })
                .await;
            }
            // Stored but never answered: the photo is safe all the same (the reconciler queues
            // its job), and the token is used.
            "gateway-before-enqueue" => {
                assert!(answer.is_err(), "{point}: no answer from a dead gateway");
                let (status, _) = upload(&target.upload_url, "image/jpeg", body.clone())
                    .await
                    .unwrap();
                assert_eq!(status, 409, "{point}: the token was used");
            }
            _ => assert_eq!(answer.unwrap().0, 202, "{point}"),
        }
        processed_once(&platform, &target.image_id).await;
        processed += 1.0;
        assert_eq!(
            applied(&platform, &platform.api_url, "processed").await,
            processed,
            "{point}: applied once"
        );
        let ready = user.route(&platform, &created.route.unwrap().id).await;
        assert_eq!(ready.status(), api::RouteStatus::Ready, "{point}");
    }
    eventually_async(WAIT, "no job left pending", || async {
        (pending_jobs(&platform).await == 0).then_some(())
    })
    .await;
    drop(db);
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn two_gateways_one_killed_every_few_seconds_process_200_uploads_once() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to kill a gateway") {
        return;
    }
    let steady = platform.add_gateway(&[]).await.unwrap();
    let mut user = User::new(&platform).await;
    let mut targets = Vec::new();
    for _ in 0..2 {
        let created = user.create_route(&platform, &[(0.5, 0.5); 100]).await;
        targets.extend(created.upload_targets);
    }
    // Uploads go to the steady gateway; both process jobs, and the first keeps dying.
    let uploads = tokio::spawn({
        let (urls, first): (Vec<String>, String) = (
            targets
                .iter()
                .map(|t| t.upload_url.replace(&platform.gateway_url, &steady))
                .collect(),
            platform.gateway_url.clone(),
        );
        assert!(urls.iter().all(|u| !u.starts_with(&first)));
        async move {
            let body = jpeg(640, 480);
            futures_util::future::join_all(urls.chunks(8).map(|chunk| {
                let (chunk, body) = (chunk.to_vec(), body.clone());
                async move {
                    for url in chunk {
                        upload_accepted(&url, "image/jpeg", body.clone()).await;
                    }
                }
            }))
            .await;
        }
    });
    let (mut uploads, mut kills) = (uploads, every(Duration::from_secs(2)));
    loop {
        tokio::select! {
            done = &mut uploads => break done.unwrap(),
            _ = kills.tick() => {
                platform.kill(Service::Gateway).await.unwrap();
                platform.start_service(Service::Gateway, &[]).await.unwrap();
            }
        }
    }
    for target in &targets {
        processed_once(&platform, &target.image_id).await;
    }
    assert_eq!(
        applied(&platform, &platform.api_url, "processed").await,
        200.0,
        "each applied once"
    );
    eventually_async(WAIT, "no job left pending", || async {
        (pending_jobs(&platform).await == 0).then_some(())
    })
    .await;
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn valkey_restarted_empty_loses_no_accepted_photo_and_no_used_token_comes_back() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to restart Valkey") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5); 40]).await;
    let done = created.upload_targets[0].clone();
    upload_accepted(&done.upload_url, "image/jpeg", jpeg(640, 480)).await;
    let before = processed_once(&platform, &done.image_id).await;
    let stored = stored_bytes(&platform, &before.storage_key).await;
    // Uploads in flight while Valkey loses everything.
    let rest = created.upload_targets[1..].to_vec();
    let uploads = tokio::spawn(async move {
        let mut accepted = Vec::new();
        for target in rest {
            let (status, answer) = upload(&target.upload_url, "image/jpeg", jpeg(640, 480))
                .await
                .unwrap();
            match status {
                202 => accepted.push(target.image_id),
                503 => {}
                other => panic!("{other} {answer}"),
            }
        }
        accepted
    });
    platform.stop(Service::Valkey).await.unwrap();
    platform.start_service(Service::Valkey, &[]).await.unwrap();
    let accepted = uploads.await.unwrap();
    assert!(!accepted.is_empty(), "some uploads got through");
    for id in &accepted {
        processed_once(&platform, id).await;
    }
    // The token used before the flush is refused, and its objects are untouched.
    let (status, answer) = eventually_async(WAIT, "an answer", || async {
        let (status, answer) = upload(&done.upload_url, "image/jpeg", jpeg(300, 200))
            .await
            .unwrap();
        (status != 503).then_some((status, answer))
    })
    .await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (409, Some("DUPLICATE_UPLOAD"))
    );
    let after = stored_bytes(&platform, &before.storage_key).await;
    assert_eq!(after, stored, "never overwritten");
    assert_eq!(row(&platform, &done.image_id).await, before);
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn storage_refusing_or_silent_spends_no_token_and_strands_no_image() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to stop the S3 server") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5); 3]).await;
    let (early, during, silent) = (
        created.upload_targets[0].clone(),
        created.upload_targets[1].clone(),
        created.upload_targets[2].clone(),
    );
    // Accepted, then storage goes away before it is processed: it waits, then goes through.
    platform.stop(Service::Gateway).await.unwrap();
    platform
        .start_service(
            Service::Gateway,
            &[("FAILPOINTS", Some("gateway-job-start=sleep(3000)"))],
        )
        .await
        .unwrap();
    upload_accepted(&early.upload_url, "image/jpeg", jpeg(640, 480)).await;
    platform.stop(Service::Storage).await.unwrap();
    // Uploads while storage refuses: 503, the token kept.
    let (status, answer) = upload(&during.upload_url, "image/jpeg", jpeg(640, 480))
        .await
        .unwrap();
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (503, Some("UNAVAILABLE"))
    );
    assert_eq!(row(&platform, &early.image_id).await.status, "PENDING");
    platform.start_service(Service::Storage, &[]).await.unwrap();
    eventually_async(WAIT, "the same token accepted", || async {
        let (status, _) = upload(&during.upload_url, "image/jpeg", jpeg(640, 480))
            .await
            .unwrap();
        (status == 202).then_some(())
    })
    .await;
    processed_once(&platform, &early.image_id).await;
    processed_once(&platform, &during.image_id).await;

    // Storage that accepts connections and never answers: the upload ends (503) within the
    // S3 timeouts, the token is kept, and the image goes through once storage answers again.
    platform.pause(Service::Storage).unwrap();
    let (status, _) = tokio::time::timeout(
        WAIT,
        upload(&silent.upload_url, "image/jpeg", jpeg(640, 480)),
    )
    .await
    .expect("bounded by the S3 timeouts")
    .unwrap();
    assert_eq!(status, 503);
    platform.resume(Service::Storage).unwrap();
    upload_accepted(&silent.upload_url, "image/jpeg", jpeg(640, 480)).await;
    processed_once(&platform, &silent.image_id).await;
    user.clean_up(&platform).await;
}

/// The object at `key`, as the stack's S3 holds it.
async fn stored_bytes(platform: &Platform, key: &str) -> Vec<u8> {
    let (s3, bucket) = platform.bucket().unwrap();
    let object = s3
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    object.body.collect().await.unwrap().to_vec()
}
