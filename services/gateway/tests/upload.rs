//! Uploads through the gateway's public HTTP surface, against real Valkey and a real S3 server
//! (Garage): the happy paths, every refusal, the pipeline's output in the bucket and its result
//! on the stream.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    Gateway, HEIC, HEIC_ALPHA, Vars, WITHIN, jpeg, jpeg_with_exif_orientation_6, png_with_alpha,
    webp,
};
use follow_bus::{ErrorCode, Notice, ResultOutcome, Stage, StreamMessage as _, keys};
use follow_service::objects;
use follow_testkit::eventually_async;
use follow_token::{UploadClaims, UploadGrant};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn processed(result: &follow_bus::ImageResult) -> &follow_bus::Processed {
    match &result.outcome {
        ResultOutcome::Processed(p) => p,
        ResultOutcome::Failed(f) => panic!("failed: {f:?}"),
    }
}

fn failure_code(result: &follow_bus::ImageResult) -> ErrorCode {
    match &result.outcome {
        ResultOutcome::Failed(f) => f.code,
        ResultOutcome::Processed(p) => panic!("processed: {p:?}"),
    }
}

#[tokio::test]
async fn every_accepted_type_is_processed_stored_and_reported() {
    let gw = Gateway::start().await;
    for (content_type, body, stored_type) in [
        ("image/jpeg", jpeg(3000, 1500), "image/jpeg"),
        ("image/png", png_with_alpha(400, 300), "image/png"),
        ("image/webp", webp(500, 250), "image/jpeg"),
        ("image/heic", HEIC.to_vec(), "image/jpeg"),
        ("image/heif", HEIC_ALPHA.to_vec(), "image/png"),
    ] {
        let (image_id, token) = gw.token(content_type, 10_000_000);
        let sha = hex::encode(Sha256::digest(&body));
        let (status, answer) = gw.put(&token, content_type, body).await;
        assert_eq!(status, 202, "{content_type}: {answer}");
        let result = gw.result(image_id).await;
        let p = processed(&result);
        assert_eq!(p.sha256, sha, "of the uploaded bytes");
        assert_eq!(p.content_type, stored_type);
        let (kind, bytes) = gw.object(&p.storage_key).await;
        assert_eq!(kind, stored_type);
        assert_eq!(bytes.len() as u64, p.byte_size);
        let stored = image::load_from_memory(&bytes).unwrap();
        assert_eq!(
            (stored.width(), stored.height()),
            (p.processed_width, p.processed_height)
        );
        assert!(stored.width().max(stored.height()) <= 2048);
        let (preview_type, preview) = gw.object(&p.preview_key).await;
        assert_eq!(preview_type, stored_type);
        let preview = image::load_from_memory(&preview).unwrap();
        assert!(preview.width().max(preview.height()) <= 320);
        if stored_type == "image/png" {
            assert!(stored.color().has_alpha(), "alpha kept");
        }
    }
    // A HEIC cut short passes the checks on arrival (its boxes come first) and fails decoding.
    let (image_id, token) = gw.token("image/heic", 10_000_000);
    let (status, _) = gw
        .put(&token, "image/heic", HEIC[..HEIC.len() / 2].to_vec())
        .await;
    assert_eq!(status, 202);
    assert_eq!(
        failure_code(&gw.result(image_id).await),
        ErrorCode::InvalidImage
    );
    let (status, _) = gw
        .put(&gw.token("image/jpeg", 10).1, "image/jpeg", Vec::new())
        .await;
    assert_eq!(status, 415, "an empty body is not an image");
}

#[tokio::test]
async fn an_exif_orientation_6_photo_comes_out_upright_without_exif_or_gps() {
    let gw = Gateway::start().await;
    let body = jpeg_with_exif_orientation_6(300, 100);
    assert!(body.windows(4).any(|w| w == b"Exif"));
    let (image_id, token) = gw.token("image/jpeg", 1_000_000);
    assert_eq!(gw.put(&token, "image/jpeg", body).await.0, 202);
    let result = gw.result(image_id).await;
    let p = processed(&result);
    assert_eq!((p.width, p.height), (100, 300), "rotated upright");
    for key in [&p.storage_key, &p.preview_key] {
        let (_, bytes) = gw.object(key).await;
        assert!(!bytes.windows(4).any(|w| w == b"Exif"), "no EXIF in {key}");
        let stored = image::load_from_memory(&bytes).unwrap();
        assert!(stored.height() > stored.width());
    }
}

#[tokio::test]
async fn a_token_is_good_for_one_upload_even_when_100_race() {
    let gw = Gateway::start().await;
    let (image_id, token) = gw.token("image/jpeg", 1_000_000);
    let body = jpeg(64, 64);
    assert_eq!(gw.put(&token, "image/jpeg", body.clone()).await.0, 202);
    let (status, answer) = gw.put(&token, "image/jpeg", body.clone()).await;
    assert_eq!(status, 409);
    assert_eq!(answer["error_code"], "DUPLICATE_UPLOAD");
    let mut conn = gw.valkey_server.connection().await;
    let exists: bool =
        redis::AsyncCommands::exists(&mut conn, keys::Partitions::DEFAULT.upload_guard(image_id))
            .await
            .unwrap();
    assert!(exists);

    let (_, token) = gw.token("image/jpeg", 1_000_000);
    let racers = (0..100).map(|_| gw.put(&token, "image/jpeg", body.clone()));
    let statuses: Vec<u16> = futures_util::future::join_all(racers)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 202).count(),
        1,
        "{statuses:?}"
    );
    // The rest: duplicate, or refused before the guard (the user's share, or the pool, is in
    // use; those spend nothing).
    assert!(
        statuses.iter().all(|s| matches!(s, 202 | 409 | 429 | 503)),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn bad_tokens_are_refused_with_401_and_nothing_is_published() {
    let gw = Gateway::start().await;
    let grant = |image_id| UploadGrant {
        sub: "alice".into(),
        image_id,
        storage_key: gw.storage_key(image_id),
        content_type: "image/jpeg".into(),
        max_file_size: 1000,
    };
    let id = uuid::Uuid::new_v4();
    let now = std::time::SystemTime::now();
    let expired = gw
        .key
        .sign(&UploadClaims::new(
            grant(id),
            now - Duration::from_secs(3600),
            Duration::from_secs(60),
        ))
        .unwrap();
    let (_, good) = gw.token("image/jpeg", 1000);
    let mut tampered = good.clone();
    tampered.insert(good.find('.').unwrap() + 3, 'x');
    let other_kid = follow_token::SigningKey::generate("upload-2".parse().unwrap())
        .sign(&UploadClaims::new(grant(id), now, Duration::from_secs(60)))
        .unwrap();
    let wrong_key = follow_token::SigningKey::generate("upload-1".parse().unwrap())
        .sign(&UploadClaims::new(grant(id), now, Duration::from_secs(60)))
        .unwrap();
    let user_token = gw
        .key
        .sign(&follow_token::UserClaims::new(
            "alice",
            now,
            Duration::from_secs(60),
        ))
        .unwrap();
    // A valid signature over another image's objects, or a key of any other shape.
    let elsewhere = |storage_key: String| {
        gw.key
            .sign(&UploadClaims::new(
                UploadGrant {
                    storage_key,
                    ..grant(id)
                },
                now,
                Duration::from_secs(60),
            ))
            .unwrap()
    };
    for (token, code) in [
        (
            elsewhere(gw.storage_key(uuid::Uuid::new_v4())),
            "INVALID_TOKEN",
        ),
        (
            elsewhere(format!("{}/../x", gw.storage_key(id))),
            "INVALID_TOKEN",
        ),
        (elsewhere("k".into()), "INVALID_TOKEN"),
        (expired, "TOKEN_EXPIRED"),
        (tampered, "INVALID_TOKEN"),
        (other_kid, "INVALID_TOKEN"),
        (wrong_key, "INVALID_TOKEN"),
        (user_token, "INVALID_TOKEN"),
        ("garbage".into(), "INVALID_TOKEN"),
    ] {
        let (status, answer) = gw.put(&token, "image/jpeg", jpeg(8, 8)).await;
        assert_eq!(
            (status, answer["error_code"].as_str()),
            (401, Some(code)),
            "{answer}"
        );
    }
    let response = reqwest::Client::new()
        .put(format!("{}/upload", gw.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    // Bearer works as well as ?token=.
    let (_, token) = gw.token("image/jpeg", 1_000_000);
    let response = reqwest::Client::new()
        .put(format!("{}/upload", gw.url()))
        .bearer_auth(token)
        .header("content-type", "image/jpeg")
        .body(jpeg(16, 16))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    assert!(
        gw.results_count().await <= 1,
        "refused tokens publish nothing"
    );
}

#[tokio::test]
async fn header_refusals_spend_nothing_and_bad_bodies_end_in_a_failed_result() {
    let gw = Gateway::start_with(Vars::from([(
        "FOLLOW_MAX_UPLOAD_BYTES",
        "200000".to_owned(),
    )]))
    .await;
    // Refusals from the headers alone spend nothing: the same token works once fixed.
    let (id, token) = gw.token("image/png", 1_000_000);
    let (status, answer) = gw.put(&token, "image/jpeg", jpeg(8, 8)).await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (415, Some("CONTENT_TYPE_MISMATCH"))
    );
    let (status, answer) = gw.put(&token, "image/png", png_with_alpha(8, 8)).await;
    assert_eq!(status, 202, "{answer}");
    assert!(matches!(
        gw.result(id).await.outcome,
        ResultOutcome::Processed(_)
    ));
    for limit in [1000, 10_000_000] {
        // Over the token's limit, and over the global cap: 413 before the body is read.
        let (_, token) = gw.token("image/jpeg", limit);
        let (status, answer) = gw.put(&token, "image/jpeg", vec![0xFF; 300_000]).await;
        assert_eq!(
            (status, answer["error_code"].as_str()),
            (413, Some("PAYLOAD_TOO_LARGE"))
        );
        let (status, _) = gw.put(&token, "image/jpeg", jpeg(8, 8)).await;
        assert_eq!(status, 202, "not spent");
    }
    // Bad bodies spend the token: a failed result, recorded in S3 too.
    let whole = jpeg(400, 300);
    let mut flood = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    flood.extend_from_slice(&60_000u32.to_be_bytes());
    flood.extend_from_slice(&60_000u32.to_be_bytes());
    flood.extend_from_slice(&[8, 6, 0, 0, 0, 0, 0, 0, 0]);
    for (content_type, body, status, code) in [
        (
            "image/jpeg",
            b"%PDF-1.7 definitely not a photo".to_vec(),
            415,
            ErrorCode::InvalidImage,
        ),
        (
            "image/jpeg",
            whole[..whole.len() / 3].to_vec(),
            415,
            ErrorCode::InvalidImage,
        ),
        ("image/png", flood, 413, ErrorCode::ImageTooLarge),
        // Another accepted type than the one declared.
        (
            "image/jpeg",
            png_with_alpha(8, 8),
            415,
            ErrorCode::ContentTypeMismatch,
        ),
        (
            "image/png",
            HEIC.to_vec(),
            415,
            ErrorCode::ContentTypeMismatch,
        ),
    ] {
        let (id, token) = gw.token(content_type, 1_000_000);
        let (got, answer) = gw.put(&token, content_type, body.clone()).await;
        assert_eq!(
            (got, answer["error_code"].as_str()),
            (status, Some(code.as_str()))
        );
        assert_eq!(failure_code(&gw.result(id).await), code);
        assert!(gw.exists(&objects::record_key(&gw.storage_key(id))).await);
        assert!(!gw.exists(&objects::original_key(&gw.storage_key(id))).await);
        let (again, answer) = gw.put(&token, content_type, body).await;
        assert_eq!(
            (again, answer["error_code"].as_str()),
            (409, Some("DUPLICATE_UPLOAD"))
        );
    }
}

#[tokio::test]
async fn a_202_means_the_original_is_stored_and_its_job_queued() {
    let gw = Gateway::start_with(Vars::from([
        ("FOLLOW_KEEP_ORIGINALS", "true".to_owned()),
        ("FOLLOW_PIPELINE_WORKERS", "1".to_owned()),
    ]))
    .await;
    let body = jpeg(640, 480);
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    let (status, receipt) = gw.put(&token, "image/jpeg", body.clone()).await;
    assert_eq!(status, 202, "{receipt}");
    let sha = hex::encode(Sha256::digest(&body));
    assert_eq!(receipt["image_id"], id.to_string());
    assert_eq!(receipt["sha256"], sha);
    assert_eq!(receipt["bytes"], body.len());
    assert_eq!(receipt["status"], "accepted");
    let key = gw.storage_key(id);
    let (_, original) = gw.object(&objects::original_key(&key)).await;
    assert_eq!(original, body, "stored before the 202, as received");
    let result = gw.result(id).await;
    assert_eq!(processed(&result).sha256, sha);
    // The record says the same as the stream.
    let (_, record) = gw.object(&objects::record_key(&key)).await;
    assert_eq!(follow_bus::ImageResult::from_json(&record).unwrap(), result);
}

/// A large body is stored whole and byte for byte, with its SHA-256, whether its length is
/// declared (sent on to S3 in one `PUT` as it arrives) or not (stored in parts as it arrives);
/// a bad one (a JPEG that never ends, refused only at its last byte) leaves nothing in S3.
#[tokio::test]
async fn a_large_body_goes_to_s3_as_it_arrives_and_a_bad_one_leaves_nothing() {
    let gw = Gateway::start_with(Vars::from([
        ("FOLLOW_KEEP_ORIGINALS", "true".to_owned()),
        ("FOLLOW_UPLOAD_PART_BYTES", (5 << 20).to_string()),
    ]))
    .await;
    let gw = &gw;
    for chunked in [false, true] {
        let put = |token: String, body: Vec<u8>| async move {
            if chunked {
                gw.put_chunked(&token, "image/jpeg", body).await
            } else {
                gw.put(&token, "image/jpeg", body).await
            }
        };
        let mut body = jpeg(640, 480);
        body.resize(12_000_000, 0x5A);
        let (id, token) = gw.token("image/jpeg", 20_000_000);
        let (status, receipt) = put(token, body.clone()).await;
        assert_eq!(status, 202, "chunked {chunked}: {receipt}");
        let sha = hex::encode(Sha256::digest(&body));
        assert_eq!(receipt["sha256"], sha);
        let key = gw.storage_key(id);
        let (_, original) = gw.object(&objects::original_key(&key)).await;
        assert!(original == body, "the original is the body, byte for byte");
        assert_eq!(processed(&gw.result(id).await).sha256, sha);

        let mut truncated = jpeg(640, 480);
        truncated.truncate(truncated.len() - 2);
        truncated.resize(12_000_000, 0x5A);
        let (bad, token) = gw.token("image/jpeg", 20_000_000);
        let (status, answer) = put(token, truncated).await;
        assert_eq!(status, 415, "chunked {chunked}: {answer}");
        assert_eq!(failure_code(&gw.result(bad).await), ErrorCode::InvalidImage);
        let uploads = gw
            .s3
            .list_multipart_uploads()
            .bucket(gw.garage.bucket())
            .send()
            .await
            .unwrap();
        assert_eq!(uploads.uploads().len(), 0, "no parts left: {uploads:?}");
        assert!(
            !gw.exists(&objects::original_key(&gw.storage_key(bad)))
                .await,
            "chunked {chunked}: no original of a bad body"
        );
    }
}

#[tokio::test]
async fn after_valkey_loses_its_data_a_used_token_is_refused_and_the_objects_stay() {
    let mut gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    assert_eq!(gw.put(&token, "image/jpeg", jpeg(300, 200)).await.0, 202);
    let result = gw.result(id).await;
    let (_, stored) = gw.object(&processed(&result).storage_key).await;
    gw.valkey_server.restart().await.unwrap();
    let replay = || gw.put(&token, "image/jpeg", jpeg(500, 100));
    let (status, answer) = eventually_async(WITHIN, "Valkey back", || async {
        let (status, answer) = replay().await;
        (status != 503).then_some((status, answer))
    })
    .await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (409, Some("DUPLICATE_UPLOAD"))
    );
    let (_, after) = gw.object(&processed(&result).storage_key).await;
    assert_eq!(after, stored, "never overwritten by another upload");
}

#[tokio::test]
async fn with_storage_refusing_an_upload_gets_503_and_the_same_token_works_after() {
    let mut gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    gw.garage.stop().await;
    let (status, answer) = gw.put(&token, "image/jpeg", jpeg(64, 64)).await;
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (503, Some("UNAVAILABLE"))
    );
    gw.garage.restart().await.unwrap();
    let (status, answer) = eventually_async(WITHIN, "storage back", || async {
        let (status, answer) = gw.put(&token, "image/jpeg", jpeg(64, 64)).await;
        (status != 503).then_some((status, answer))
    })
    .await;
    assert_eq!(status, 202, "{answer}");
    assert!(matches!(
        gw.result(id).await.outcome,
        ResultOutcome::Processed(_)
    ));
}

#[tokio::test]
async fn storage_that_never_answers_times_out_into_a_503_and_nothing_is_spent() {
    let gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    gw.garage.pause();
    let (status, answer) = tokio::time::timeout(WITHIN, gw.put(&token, "image/jpeg", jpeg(64, 64)))
        .await
        .expect("bounded by the S3 timeouts");
    assert_eq!(
        (status, answer["error_code"].as_str()),
        (503, Some("UNAVAILABLE"))
    );
    gw.garage.resume();
    let (status, answer) = gw.put(&token, "image/jpeg", jpeg(64, 64)).await;
    assert_eq!(status, 202, "{answer}");
    assert!(matches!(
        gw.result(id).await.outcome,
        ResultOutcome::Processed(_)
    ));
}

#[tokio::test]
async fn an_oversized_streamed_body_is_cut_early_without_reading_the_rest() {
    let gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 100_000);
    // No Content-Length: the gateway counts as bytes arrive. The client would send 1 GiB.
    // A real JPEG's start, then filler.
    let mut sent = 0usize;
    let chunks = futures_util::stream::iter(std::iter::from_fn(move || {
        sent += 64 * 1024;
        let chunk = if sent == 64 * 1024 {
            jpeg(64, 64)
        } else {
            vec![0xAB; 64 * 1024]
        };
        (sent <= 1 << 30).then_some(Ok::<_, std::io::Error>(chunk))
    }));
    let response = reqwest::Client::new()
        .put(format!("{}/upload?token={token}", gw.url()))
        .header("content-type", "image/jpeg")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await;
    // Either the 413 arrives or the connection is cut while sending: never 1 GiB read.
    if let Ok(response) = response {
        assert_eq!(response.status(), 413);
    }
    assert_eq!(
        failure_code(&gw.result(id).await),
        ErrorCode::PayloadTooLarge
    );
}

#[tokio::test]
async fn a_client_that_stalls_mid_body_is_timed_out() {
    let gw = Gateway::start_with(Vars::from([(
        "FOLLOW_BODY_IDLE_TIMEOUT_SECS",
        "1".to_owned(),
    )]))
    .await;
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /upload?token={token} HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: 100000\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&jpeg(64, 64)[..100]).await.unwrap();
    // Then nothing: the gateway answers on its own.
    let mut answer = Vec::new();
    tokio::time::timeout(WITHIN, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // Nothing was spent: no result, and the same token works.
    let (status, answer) = gw.put(&token, "image/jpeg", jpeg(64, 64)).await;
    assert_eq!(status, 202, "{answer}");
    assert!(matches!(
        gw.result(id).await.outcome,
        ResultOutcome::Processed(_)
    ));
}

#[tokio::test]
async fn a_client_gone_half_way_releases_the_token() {
    let gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 1_000_000);
    let body = jpeg(800, 600);
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /upload?token={token} HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    let conn = gw.valkey_server.connection().await;
    eventually_async(WITHIN, "the guard taken", || {
        let mut conn = conn.clone();
        async move {
            redis::AsyncCommands::exists::<_, bool>(
                &mut conn,
                keys::Partitions::DEFAULT.upload_guard(id),
            )
            .await
            .ok()
            .filter(|e| *e)
        }
    })
    .await;
    drop(stream);
    eventually_async(WITHIN, "the guard released", || {
        let mut conn = conn.clone();
        async move {
            (!redis::AsyncCommands::exists::<_, bool>(
                &mut conn,
                keys::Partitions::DEFAULT.upload_guard(id),
            )
            .await
            .ok()?)
            .then_some(())
        }
    })
    .await;
    let (status, answer) = gw.put(&token, "image/jpeg", body).await;
    assert_eq!(status, 202, "{answer}");
    assert!(matches!(
        gw.result(id).await.outcome,
        ResultOutcome::Processed(_)
    ));
    assert_eq!(
        gw.results_count().await,
        1,
        "the cut transfer published nothing"
    );
}

#[tokio::test]
async fn stages_arrive_in_order_on_the_progress_channel() {
    let gw = Gateway::start().await;
    let (id, token) = gw.token("image/jpeg", 10_000_000);
    let mut pubsub = redis::Client::open(gw.valkey_server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub
        .subscribe(keys::Partitions::DEFAULT.progress(id))
        .await
        .unwrap();
    let mut messages = pubsub.into_on_message();
    assert_eq!(gw.put(&token, "image/jpeg", jpeg(2500, 1200)).await.0, 202);
    let mut stages = Vec::new();
    while stages.last() != Some(&Stage::Done) {
        let message = tokio::time::timeout(WITHIN, messages.next())
            .await
            .unwrap()
            .unwrap();
        if let Notice::Progress(p) = Notice::decode(message.get_payload_bytes()).unwrap() {
            stages.push(p.stage());
        }
    }
    assert_eq!(
        stages,
        [
            Stage::WaitingUpload,
            Stage::Validating,
            Stage::Decoding,
            Stage::Processing,
            Stage::Encoding,
            Stage::UploadingToStorage,
            Stage::Done
        ]
    );
    let mut tracker = follow_bus::ProgressTracker::new(&gw.valkey).unwrap();
    assert_eq!(
        tracker.current(id).await.unwrap().unwrap().stage(),
        Stage::Done
    );
}
