//! A replayed token after the one-time guard was lost (what a Valkey that lost its data does),
//! at every moment of the first upload, against real Valkey and Garage: an image that has its
//! upload answers `409` and nothing of it changes — no failed result, no second job, no
//! overwritten object. The first upload's job is held at a failpoint to pin each moment.
//!
//! One test in its own binary: failpoints are process-wide.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, Vars, WITHIN, jpeg};
use follow_bus::{ResultOutcome, keys};
use follow_service::objects;
use follow_testkit::eventually_async;
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

fn hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn drop_guard(gw: &Gateway, image_id: Uuid) {
    let mut admin = gw.valkey_server.connection().await;
    let _: () =
        redis::AsyncCommands::del(&mut admin, keys::Partitions::DEFAULT.upload_guard(image_id))
            .await
            .unwrap();
}

async fn stage(gw: &Gateway, image_id: Uuid) -> Option<String> {
    let mut admin = gw.valkey_server.connection().await;
    redis::AsyncCommands::hget(
        &mut admin,
        keys::Partitions::DEFAULT.status(image_id),
        "stage",
    )
    .await
    .unwrap()
}

/// The image's record, outputs and original as they are.
async fn objects_of(gw: &Gateway, image_id: Uuid) -> Vec<(String, Option<Vec<u8>>)> {
    let key = gw.storage_key(image_id);
    let mut all = Vec::new();
    for key in [
        key.clone(),
        objects::preview_key(&key),
        objects::original_key(&key),
        objects::record_key(&key),
    ] {
        let bytes = if gw.exists(&key).await {
            Some(gw.object(&key).await.1)
        } else {
            None
        };
        all.push((key, bytes));
    }
    all
}

/// Replays with a good and a bad body, the guard lost before each: both `409
/// DUPLICATE_UPLOAD`.
async fn replays_are_refused(gw: &Gateway, image_id: Uuid, token: &str, moment: &str) {
    for (what, body) in [
        ("another photo", jpeg(500, 100)),
        ("a bad body", b"not an image at all".to_vec()),
    ] {
        drop_guard(gw, image_id).await;
        let (status, answer) = gw.put(token, "image/jpeg", body).await;
        assert_eq!(
            (status, answer["error_code"].as_str()),
            (409, Some("DUPLICATE_UPLOAD")),
            "{moment}, {what}: {answer}"
        );
    }
}

// A paused failpoint blocks its thread: the gateway needs others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_after_the_guard_was_lost_changes_nothing_at_any_moment() {
    if !cfg!(feature = "failpoints") {
        eprintln!("skipped: needs the gateway's `failpoints` feature (./dev test builds with it)");
        return;
    }
    let gw = Gateway::start_with(Vars::from([("FOLLOW_PIPELINE_WORKERS", "1".to_owned())])).await;
    let first = jpeg(300, 200);

    // Stored: the original is in S3, its job not started; then processing: the pipeline ran,
    // its outputs not written. The job is held at a failpoint while the replays come.
    for (moment, point) in [
        ("stored", "gateway-job-start"),
        ("processing", "gateway-mid-pipeline"),
    ] {
        fail::cfg(point, "pause").unwrap();
        let (id, token) = gw.token("image/jpeg", 1_000_000);
        assert_eq!(gw.put(&token, "image/jpeg", first.clone()).await.0, 202);
        if moment == "processing" {
            eventually_async(WITHIN, "the pipeline at work", || async {
                matches!(
                    stage(&gw, id).await.as_deref(),
                    Some("processing" | "encoding")
                )
                .then_some(())
            })
            .await;
        }
        let before = objects_of(&gw, id).await;
        replays_are_refused(&gw, id, &token, moment).await;
        assert_eq!(
            objects_of(&gw, id).await,
            before,
            "{moment}: objects untouched"
        );
        assert_eq!(gw.jobs_of(id).await, 1, "{moment}: no second job");
        assert!(
            gw.results_of(id).await.is_empty(),
            "{moment}: no result yet"
        );
        fail::remove(point);
        let result = gw.result(id).await;
        match &result.outcome {
            ResultOutcome::Processed(p) => {
                assert_eq!(p.sha256, hex(&first), "{moment}: the first upload's photo");
                assert_eq!((p.width, p.height), (300, 200));
            }
            ResultOutcome::Failed(f) => panic!("{moment}: the photo failed: {f:?}"),
        }
        // Its hand-off is the only result, now and after the worker is done.
        eventually_async(
            WITHIN,
            "the original removed after the hand-off",
            || async {
                (!gw.exists(&objects::original_key(&gw.storage_key(id))).await).then_some(())
            },
        )
        .await;
        assert_eq!(gw.results_of(id).await.len(), 1, "{moment}");
    }

    // Done: processed, handed off, original removed.
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    assert_eq!(gw.put(&token, "image/jpeg", first.clone()).await.0, 202);
    gw.result(id).await;
    eventually_async(
        WITHIN,
        "the original removed after the hand-off",
        || async { (!gw.exists(&objects::original_key(&gw.storage_key(id))).await).then_some(()) },
    )
    .await;
    let before = objects_of(&gw, id).await;
    replays_are_refused(&gw, id, &token, "done").await;
    assert_eq!(objects_of(&gw, id).await, before, "done: objects untouched");
    assert_eq!(gw.jobs_of(id).await, 1, "done: no second job");
    assert_eq!(gw.results_of(id).await.len(), 1, "done: no second result");

    // Receiving: the first body is still arriving when the guard goes and a replay comes. The
    // replay is the first whole upload (nothing is in S3 yet): it is accepted, and the first,
    // no longer holding the guard, is refused when its body ends, changing nothing.
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    let (send, chunks) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let half = first.len() / 2;
    send.send(Ok(first[..half].to_vec())).await.unwrap();
    let slow = tokio::spawn({
        let url = format!("{}/upload?token={token}", gw.url());
        async move {
            let body =
                reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(chunks));
            let response = reqwest::Client::new()
                .put(url)
                .header("content-type", "image/jpeg")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    });
    eventually_async(WITHIN, "the first body arriving", || async {
        (stage(&gw, id).await.as_deref() == Some("waiting_upload")).then_some(())
    })
    .await;
    drop_guard(&gw, id).await;
    let second = jpeg(500, 100);
    let (status, answer) = gw.put(&token, "image/jpeg", second.clone()).await;
    assert_eq!(status, 202, "the first whole upload: {answer}");
    send.send(Ok(first[half..].to_vec())).await.unwrap();
    drop(send);
    let (status, answer) = tokio::time::timeout(WITHIN, slow).await.unwrap().unwrap();
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (409, Some("DUPLICATE_UPLOAD")),
        "{answer}"
    );
    match &gw.result(id).await.outcome {
        ResultOutcome::Processed(p) => assert_eq!(p.sha256, hex(&second)),
        ResultOutcome::Failed(f) => panic!("receiving: the photo failed: {f:?}"),
    }
    // Nothing more came of the refused body.
    assert_eq!(gw.jobs_of(id).await, 1, "receiving: one job");
    assert_eq!(gw.results_of(id).await.len(), 1, "receiving: one result");
}
