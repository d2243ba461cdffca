//! The platform on a Valkey Cluster of three primaries and three replicas, while a route's
//! photos are uploaded and processed: a primary killed (`SIGKILL`), a primary frozen past the
//! cluster's node timeout then resumed as a stale replica, and the slots of the busiest
//! partition moved to another primary. Clients retry what is refused while a shard fails over;
//! every accepted photo ends PROCESSED once, and every watcher gets every outcome once
//! (asynchronous replication may lose the last writes; what matters is recovered as after a
//! Valkey that restarts empty). Real processes; runs on a cluster stack
//! (`FOLLOW_E2E_VALKEY=cluster`, as `./dev test` does for its second e2e run).
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Duration};

use follow_e2e::{
    Platform,
    client::{bearer, jpeg, upload, watch_images},
    keys,
    user::{User, WAIT},
};
use follow_proto::{
    api::v1::{
        self as api, watch_image_status_request::Target, watch_image_status_response::Event,
    },
    tonic::Streaming,
};
use follow_testkit::eventually_async;
use tokio::task::JoinHandle;

const PHOTOS: usize = 24;

/// What a scenario does to the cluster once uploads flow.
#[derive(Debug, Clone, Copy)]
enum Fault {
    KillPrimary,
    FreezePrimary,
    MoveSlots,
}

/// Outcomes a watch was sent, counted, once it ended.
type Seen = BTreeMap<String, usize>;

fn collect(mut stream: Streaming<api::WatchImageStatusResponse>) -> JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::new();
        while let Some(message) = tokio::time::timeout(WAIT * 2, stream.message())
            .await
            .expect("the watch ends within the deadline")
            .expect("the watch ends without an error")
        {
            let key = match message.event.unwrap() {
                Event::ImageProcessed(p) => format!("processed {}", p.image.unwrap().id),
                Event::ImageFailed(f) => format!("failed {}", f.image_id),
                Event::RouteReady(_) => "ready".to_owned(),
                Event::ImageProgress(_) | Event::Heartbeat(_) => continue,
            };
            *seen.entry(key).or_default() += 1;
        }
        seen
    })
}

/// Uploads each photo, trying again while the platform answers 503 (a shard failing over).
async fn upload_all(targets: Vec<api::UploadTarget>) {
    for target in targets {
        let tries = std::sync::Mutex::new(Vec::new());
        eventually_async(WAIT * 2, "the upload accepted", || async {
            let answer = upload(&target.upload_url, "image/jpeg", jpeg(320, 240)).await;
            let mut tries = tries.lock().unwrap();
            tries.push(match &answer {
                Ok((status, answer)) => format!("{status} {answer}"),
                Err(e) => format!("{e:#}"),
            });
            // An attempt whose answer was lost (a 503 while a shard failed over, say) may
            // still hold the token's lease for a few seconds: "in progress", try again.
            match answer {
                Ok((202, _)) => Some(()),
                Ok((503, _)) | Err(_) => None,
                Ok((409, answer))
                    if answer["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("in progress")) =>
                {
                    None
                }
                Ok(_) => panic!("{tries:?}"),
            }
        })
        .await;
    }
}

async fn scenario(fault: Fault) {
    let mut platform = Platform::start().await.unwrap();
    if platform.valkey_cluster().is_none() {
        eprintln!(
            "skipped: {fault:?} needs the stack on a Valkey Cluster (FOLLOW_E2E_VALKEY=cluster)"
        );
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5); PHOTOS]).await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let images: Vec<String> = created
        .upload_targets
        .iter()
        .map(|t| t.image_id.clone())
        .collect();

    // Watchers of the route and of each image, subscribed before anything happens.
    let mut client = platform.images().await.unwrap();
    let mut requests = vec![api::WatchImageStatusRequest {
        target: Some(Target::RouteId(route_id.clone())),
        resume_cursor: String::new(),
    }];
    requests.extend(images.iter().map(|id| watch_images(&[id.as_str()])));
    let mut watches = Vec::new();
    for request in requests {
        let mut stream = client
            .watch_image_status(bearer(request, &user.token))
            .await
            .unwrap()
            .into_inner();
        stream.message().await.unwrap().unwrap();
        watches.push(collect(stream));
    }

    let (first, rest) = created.upload_targets.split_at(PHOTOS / 4);
    upload_all(first.to_vec()).await;
    let uploads = tokio::spawn(upload_all(rest.to_vec()));
    // The partition of the first photo: the fault hits the shard that serves it.
    let partition = platform.partitions.of(images[0].parse().unwrap());
    let stream = keys::JOBS.stream(partition);
    let cluster = platform.valkey_cluster().unwrap();
    let primary = cluster.primary_for(&stream).await.unwrap();
    match fault {
        Fault::KillPrimary => {
            cluster.node_mut(primary).stop().await;
            cluster.settled().await.unwrap();
        }
        Fault::FreezePrimary => {
            cluster.node(primary).pause();
            eventually_async(WAIT, "a replica to take over", || async {
                let now = cluster.primary_for(&stream).await.ok()?;
                (now != primary).then_some(())
            })
            .await;
            cluster.node(primary).resume();
            cluster.settled().await.unwrap();
            assert_ne!(
                cluster.primary_for(&stream).await.unwrap(),
                primary,
                "back as a replica"
            );
        }
        Fault::MoveSlots => {
            let slot = cluster.slot_of(&stream).await.unwrap();
            let to = (0..6)
                .find(|&n| n != primary && n < 3)
                .unwrap_or((primary + 1) % 3);
            cluster.migrate_slots(slot, slot, to).await.unwrap();
            assert_eq!(cluster.primary_for(&stream).await.unwrap(), to);
        }
    }
    tokio::time::timeout(WAIT * 4, uploads)
        .await
        .unwrap()
        .unwrap();

    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    let route = user.route(&platform, &route_id).await;
    let processed = route
        .waypoints
        .iter()
        .filter(|w| {
            w.image
                .as_ref()
                .is_some_and(|i| i.status() == api::ImageStatus::Processed)
        })
        .count();
    assert_eq!(processed, PHOTOS, "{fault:?}: every photo PROCESSED");
    let mut expected: Vec<Seen> = vec![
        images
            .iter()
            .map(|id| (format!("processed {id}"), 1))
            .chain([("ready".to_owned(), 1)])
            .collect(),
    ];
    expected.extend(
        images
            .iter()
            .map(|id| Seen::from([(format!("processed {id}"), 1)])),
    );
    for (watch, expected) in watches.into_iter().zip(expected) {
        let seen = tokio::time::timeout(Duration::from_secs(60), watch)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, expected, "{fault:?}: every outcome once");
    }
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn a_primary_killed_under_load_loses_no_photo_and_no_outcome() {
    scenario(Fault::KillPrimary).await;
}

#[tokio::test]
async fn a_primary_frozen_past_the_node_timeout_comes_back_a_replica_and_nothing_is_lost() {
    scenario(Fault::FreezePrimary).await;
}

#[tokio::test]
async fn a_partitions_slot_moved_under_load_loses_nothing() {
    scenario(Fault::MoveSlots).await;
}
