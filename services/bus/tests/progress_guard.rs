//! Progress reporting, the one-time upload guard, rate limits and the partition count's claim
//! against a real Valkey.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use common::*;
use follow_bus::{
    ErrorCode, Failure, GuardOutcome, GuardState, Notice, Progress, ProgressTracker, Recorded,
    Stage, UploadGuard, Valkey, ValkeyConfig, keys,
};
use follow_testkit::{ValkeyServer, ValkeyUser};
use futures_util::StreamExt as _;
use uuid::Uuid;

#[tokio::test]
async fn progress_writes_the_hash_with_ttl_and_publishes_every_stage_in_order() {
    let (server, valkey) = valkey().await;
    let image_id = Uuid::new_v4();
    let mut messages = subscribe(&server, image_id).await;

    let mut tracker = ProgressTracker::new(&valkey).unwrap();
    let stages = [
        Stage::Queued,
        Stage::WaitingUpload,
        Stage::Validating,
        Stage::Decoding,
        Stage::Processing,
        Stage::Encoding,
        Stage::UploadingToStorage,
        Stage::Done,
    ];
    for stage in stages {
        assert_eq!(
            tracker
                .record(&Progress::reached(image_id, stage))
                .await
                .unwrap(),
            Recorded::Applied
        );
    }
    let mut seen = Vec::new();
    for _ in stages {
        let msg = tokio::time::timeout(WITHIN, messages.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(msg.get_channel_name(), partitions().progress(image_id));
        let Notice::Progress(p) = Notice::decode(msg.get_payload_bytes()).unwrap() else {
            panic!("a stage, not a commit")
        };
        assert_eq!(p.image_id(), image_id);
        seen.push(p.stage());
    }
    assert_eq!(seen, stages);

    let mut conn = server.connection().await;
    let hash: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(partitions().status(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hash["stage"], "done");
    assert_eq!(hash["seq"], Stage::Done.seq().to_string());
    assert!(hash["updated_at"].ends_with('Z'));
    assert!(!hash.contains_key("error_code"));
    let ttl: i64 = redis::cmd("TTL")
        .arg(partitions().status(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");

    let snapshot = tracker.current(image_id).await.unwrap().unwrap();
    assert_eq!(snapshot.stage(), Stage::Done);
    assert_eq!(snapshot.failure(), None);
    assert_eq!(tracker.current(Uuid::new_v4()).await.unwrap(), None);
}

#[tokio::test]
async fn a_failure_carries_its_code_and_a_late_stage_never_moves_it_back() {
    let (server, valkey) = valkey().await;
    let image_id = Uuid::new_v4();
    let mut messages = subscribe(&server, image_id).await;
    let mut tracker = ProgressTracker::new(&valkey).unwrap();

    tracker
        .record(&Progress::reached(image_id, Stage::Decoding))
        .await
        .unwrap();
    let failure = Failure {
        code: ErrorCode::InvalidImage,
        message: "truncated JPEG".into(),
    };
    tracker
        .record(&Progress::failed(image_id, failure.clone()))
        .await
        .unwrap();
    // A slow or duplicate report of an earlier stage arrives afterwards.
    assert_eq!(
        tracker
            .record(&Progress::reached(image_id, Stage::Processing))
            .await
            .unwrap(),
        Recorded::Stale
    );
    assert_eq!(
        tracker
            .record(&Progress::failed(image_id, failure.clone()))
            .await
            .unwrap(),
        Recorded::Stale
    );

    let snapshot = tracker.current(image_id).await.unwrap().unwrap();
    assert_eq!(snapshot.stage(), Stage::Failed);
    assert_eq!(snapshot.failure(), Some(&failure));
    let mut conn = server.connection().await;
    let hash: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(partitions().status(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(hash["error_code"], "INVALID_IMAGE");
    assert_eq!(hash["error_message"], "truncated JPEG");

    // Exactly two messages were published: decoding, then failed; then nothing (checked by a
    // marker published after the stale writes).
    redis::cmd("PUBLISH")
        .arg(partitions().progress(image_id))
        .arg("marker")
        .query_async::<i64>(&mut conn)
        .await
        .unwrap();
    let mut payloads = Vec::new();
    for _ in 0..3 {
        let msg = tokio::time::timeout(WITHIN, messages.next())
            .await
            .unwrap()
            .unwrap();
        payloads.push(msg.get_payload_bytes().to_vec());
    }
    assert_eq!(progress(&payloads[0]).stage(), Stage::Decoding);
    let failed = progress(&payloads[1]);
    assert_eq!(failed.failure(), Some(&failure));
    assert_eq!(payloads[2], b"marker");
}

#[tokio::test]
async fn a_hostile_status_hash_is_a_typed_error() {
    let (server, valkey) = valkey().await;
    let image_id = Uuid::new_v4();
    let mut conn = server.connection().await;
    redis::cmd("HSET")
        .arg(partitions().status(image_id))
        .arg("stage")
        .arg("exploding")
        .arg("seq")
        .arg("x")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    let mut tracker = ProgressTracker::new(&valkey).unwrap();
    assert!(tracker.current(image_id).await.is_err());
    // The guard in the script treats a non-numeric seq as absent, so a real report repairs it.
    assert_eq!(
        tracker
            .record(&Progress::reached(image_id, Stage::Queued))
            .await
            .unwrap(),
        Recorded::Applied
    );
    assert_eq!(
        tracker.current(image_id).await.unwrap().unwrap().stage(),
        Stage::Queued
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_guard_is_acquired_exactly_once_under_100_concurrent_attempts() {
    let (server, valkey) = valkey().await;
    let image_id = Uuid::new_v4();
    let guard = UploadGuard::new(&valkey).unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let attempts: Vec<_> = (0..100)
        .map(|i| {
            let mut guard = guard.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                guard
                    .acquire(image_id, &format!("gw-{i}"), HOUR)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut acquired = 0;
    for a in attempts {
        if a.await.unwrap() == GuardOutcome::Acquired {
            acquired += 1;
        }
    }
    assert_eq!(acquired, 1);

    let mut conn = server.connection().await;
    let ttl: i64 = redis::cmd("TTL")
        .arg(partitions().upload_guard(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    let holder: String = redis::cmd("GET")
        .arg(partitions().upload_guard(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(holder.starts_with("gw-"));

    // Sequentially, too, and another image is unaffected.
    let mut guard = guard.clone();
    assert_eq!(
        guard.acquire(image_id, "late", HOUR).await.unwrap(),
        GuardOutcome::Taken
    );
    let other = Uuid::new_v4();
    assert_eq!(
        guard.acquire(other, "x", HOUR).await.unwrap(),
        GuardOutcome::Acquired
    );
    assert_eq!(guard.state(other).await.unwrap(), GuardState::Receiving);
    assert_eq!(guard.state(Uuid::new_v4()).await.unwrap(), GuardState::Free);

    // Only its holder releases it; then the same token may be used again.
    assert!(!guard.release(image_id, "late").await.unwrap());
    assert!(guard.release(image_id, &holder).await.unwrap());
    assert_eq!(
        guard.acquire(image_id, "again", HOUR).await.unwrap(),
        GuardOutcome::Acquired
    );
}

const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

/// A holder renews its lease; a guard Valkey lost is taken again by its holder's renewal, unless
/// someone else took it meanwhile, which the holder then learns.
#[tokio::test]
async fn a_renewal_keeps_retakes_a_lost_guard_and_never_takes_anothers() {
    let (server, valkey) = valkey().await;
    let (image_id, mut guard) = (Uuid::new_v4(), UploadGuard::new(&valkey).unwrap());
    let mut admin = server.connection().await;
    let lose = async |admin: &mut redis::aio::MultiplexedConnection| {
        let _: () = redis::cmd("DEL")
            .arg(partitions().upload_guard(image_id))
            .query_async(admin)
            .await
            .unwrap();
    };
    assert_eq!(
        guard.acquire(image_id, "first", HOUR).await.unwrap(),
        GuardOutcome::Acquired
    );
    assert!(guard.renew(image_id, "first", HOUR).await.unwrap());
    lose(&mut admin).await;
    assert!(
        guard.renew(image_id, "first", HOUR).await.unwrap(),
        "retaken"
    );
    assert_eq!(guard.state(image_id).await.unwrap(), GuardState::Receiving);
    lose(&mut admin).await;
    assert_eq!(
        guard.acquire(image_id, "replay", HOUR).await.unwrap(),
        GuardOutcome::Acquired
    );
    assert!(
        !guard.renew(image_id, "first", HOUR).await.unwrap(),
        "the replay's"
    );
    assert!(guard.renew(image_id, "replay", HOUR).await.unwrap());
}

#[tokio::test]
async fn with_valkey_down_every_call_fails_fast_as_unavailable() {
    let (mut server, valkey) = valkey().await;
    let mut guard = UploadGuard::new(&valkey).unwrap();
    let mut tracker = ProgressTracker::new(&valkey).unwrap();
    server.stop().await;
    let started = std::time::Instant::now();
    let err = guard.acquire(Uuid::new_v4(), "gw", HOUR).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    let err = tracker
        .record(&Progress::reached(Uuid::new_v4(), Stage::Validating))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    // Not a timing assertion on speed, a bound against hanging forever.
    assert!(started.elapsed() < WITHIN);
}

fn progress(payload: &[u8]) -> Progress {
    match Notice::decode(payload).unwrap() {
        Notice::Progress(p) => p,
        Notice::Committed(_) => panic!("a stage, not a commit"),
    }
}

#[tokio::test]
async fn the_rate_limit_is_shared_by_every_instance_allows_its_burst_and_says_how_long_to_wait() {
    let (server, valkey) = valkey().await;
    // Two instances of one limit (as two API instances would hold): 60 per minute, bursts of 10.
    let a = follow_bus::RateLimiter::new(&valkey, "test", 60, 10).unwrap();
    let b = follow_bus::RateLimiter::new(&valkey, "test", 60, 10).unwrap();
    assert_eq!(a.check("alice", 6).await.unwrap(), None);
    assert_eq!(
        b.check("alice", 4).await.unwrap(),
        None,
        "the burst is 10 in all"
    );
    let wait = a.check("alice", 1).await.unwrap().expect("over the burst");
    assert!(
        wait > std::time::Duration::ZERO && wait <= std::time::Duration::from_secs(1),
        "one unit comes back within a second at 60/min: {wait:?}"
    );
    let wait = b
        .check("alice", 10)
        .await
        .unwrap()
        .expect("a refused call is not counted");
    assert!(wait <= std::time::Duration::from_secs(10), "{wait:?}");
    assert_eq!(
        a.check("bob", 10).await.unwrap(),
        None,
        "subjects are apart"
    );
    assert!(
        a.check("carol", 11).await.unwrap().is_some(),
        "more than a burst never passes"
    );
    // The state expires once the subject is idle.
    let mut conn = server.connection().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(keys::rate_limit("test", "alice"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= 10_001, "{ttl}");
}

#[tokio::test]
async fn services_with_another_partition_count_are_refused() {
    let server = ValkeyServer::start().await.unwrap();
    let with = |user, count| {
        Valkey::new(ValkeyConfig {
            partitions: keys::Partitions::new(count).unwrap(),
            ..ValkeyConfig::new(server.url_as(user))
        })
        .unwrap()
    };
    with(ValkeyUser::Api, 16).claim_partitions().await.unwrap();
    with(ValkeyUser::Gateway, 16)
        .claim_partitions()
        .await
        .unwrap();
    let refused = with(ValkeyUser::Gateway, 8)
        .claim_partitions()
        .await
        .unwrap_err();
    assert!(!refused.is_unavailable(), "{refused}");
    assert!(
        refused
            .to_string()
            .contains("FOLLOW_VALKEY_PARTITIONS is 8"),
        "{refused}"
    );
}
