//! A watcher of an image that became final always learns it, within seconds, whatever dies: the
//! API instance that committed an outcome killed before announcing it, or `PUBLISH` refused.
//! Watchers sit on a surviving instance; each must get every `image_processed` and
//! `route_ready` of what it watches, none twice. Real processes (spawn mode).
#![allow(clippy::unwrap_used)]

use std::{collections::BTreeMap, time::Instant};

use follow_e2e::{
    Platform, Service,
    client::{bearer, jpeg, upload_accepted, watch_images},
    observe::{results_of, uuid},
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

/// The outcomes a watch was sent, counted (`processed {id}`, `failed {id}`, `ready`), once it
/// ended; it must end within [`WAIT`].
type Seen = BTreeMap<String, usize>;

fn collect(mut stream: Streaming<api::WatchImageStatusResponse>) -> JoinHandle<Seen> {
    tokio::spawn(async move {
        let mut seen = Seen::new();
        loop {
            let message = tokio::time::timeout(WAIT, stream.message())
                .await
                .expect("the watch ends within the deadline")
                .expect("the watch ends without an error");
            let Some(message) = message else {
                return seen;
            };
            let key = match message.event.unwrap() {
                Event::ImageProcessed(p) => format!("processed {}", p.image.unwrap().id),
                Event::ImageFailed(f) => format!("failed {}", f.image_id),
                Event::RouteReady(_) => "ready".to_owned(),
                Event::ImageProgress(_) | Event::Heartbeat(_) => continue,
            };
            *seen.entry(key).or_default() += 1;
        }
    })
}

/// Watches on the API at `url`: the route, and each image alone; each has sent its first event
/// (so it is subscribed) when this returns.
async fn watch_all(
    platform: &Platform,
    url: &str,
    user: &User,
    route_id: &str,
    images: &[String],
) -> Vec<(Seen, JoinHandle<Seen>)> {
    let mut client = platform.images_at(url).await.unwrap();
    let mut watches = Vec::new();
    let route = api::WatchImageStatusRequest {
        target: Some(Target::RouteId(route_id.to_owned())),
        resume_cursor: String::new(),
    };
    let mut requests = vec![(route, every_outcome(images, true))];
    for id in images {
        requests.push((
            watch_images(&[id.as_str()]),
            every_outcome(std::slice::from_ref(id), false),
        ));
    }
    for (request, expected) in requests {
        let mut stream = client
            .watch_image_status(bearer(request, &user.token))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        assert!(
            matches!(first.event, Some(Event::ImageProgress(_))),
            "{first:?}"
        );
        watches.push((expected, collect(stream)));
    }
    watches
}

fn image_ids(created: &api::CreateRouteWithWaypointsResponse) -> Vec<String> {
    created
        .upload_targets
        .iter()
        .map(|t| t.image_id.clone())
        .collect()
}

fn every_outcome(images: &[String], ready: bool) -> Seen {
    let mut seen: Seen = images
        .iter()
        .map(|id| (format!("processed {id}"), 1))
        .collect();
    if ready {
        seen.insert("ready".to_owned(), 1);
    }
    seen
}

async fn all_told(watches: Vec<(Seen, JoinHandle<Seen>)>, what: &str) {
    for (expected, watch) in watches {
        assert_eq!(watch.await.unwrap(), expected, "{what}: every outcome once");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// No reconciler settles these images during the test: only the result stream does.
const NO_RECONCILING: (&str, &str) = ("FOLLOW_RECONCILE_INTERVAL_SECS", "3600");

/// The instance that committed a route's outcomes is killed before announcing them; watchers on
/// the other instance learn them anyway (they re-read images the gateway is done with), and when
/// the dead instance's results are delivered again they are announced again: nothing twice.
#[tokio::test]
async fn watchers_learn_outcomes_whose_committer_died_before_announcing() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("API instances killed, frozen and restarted") {
        return;
    }
    platform.stop(Service::Api).await.unwrap();
    platform
        .start_service(
            Service::Api,
            &[
                ("FAILPOINTS", Some("api-results-after-commit=pause")),
                (NO_RECONCILING.0, Some(NO_RECONCILING.1)),
            ],
        )
        .await
        .unwrap();
    let survivor = platform.add_api(&[NO_RECONCILING]).await.unwrap();
    let survivor_pid = platform.api_pids()[1];
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.1, 0.1), (0.5, 0.5), (0.9, 0.9)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let images = image_ids(&created);
    let watches = watch_all(&platform, &survivor, &user, &route_id, &images).await;

    // The survivor frozen, only the committer reads results: each of its consumers (one per
    // partition) commits what it read and is held at the failpoint, its announcements not made.
    // Two images may share a partition: the second then stays unread until the survivor reads it
    // after the kill (and announces it itself). So the committer dies once every result is on
    // its stream and each partition's consumer has committed: a result it had read and not
    // committed would wait out its lease before the survivor took it over, and the restarted
    // committer would then have nothing to re-read.
    signal(survivor_pid, "-STOP");
    for target in &created.upload_targets {
        upload_accepted(&target.upload_url, "image/jpeg", jpeg(320, 240)).await;
    }
    let db = platform.database().await.unwrap();
    let of = platform.partitions;
    let partition = |id: &String| of.of(uuid(id));
    eventually_async(
        WAIT,
        "every result on its stream, each partition's first committed and held",
        || async {
            for id in &images {
                if results_of(&platform, id).await.is_empty() {
                    return None;
                }
            }
            let processed: Vec<String> = sqlx::query_scalar(
                "SELECT id::text FROM image.images WHERE id::text = ANY($1) AND status = 'PROCESSED'",
            )
            .bind(&images)
            .fetch_all(&db)
            .await
            .unwrap();
            let held: Vec<_> = processed.iter().map(partition).collect();
            images
                .iter()
                .all(|id| held.contains(&partition(id)))
                .then_some(())
        },
    )
    .await;
    platform.kill(Service::Api).await.unwrap();
    let resumed = Instant::now();
    signal(survivor_pid, "-CONT");
    all_told(watches, "the committer killed").await;
    let partitions: std::collections::HashSet<_> = images.iter().map(partition).collect();
    eprintln!(
        "every watcher on the survivor told within {:?} of its resumption ({} images on {} partitions)",
        resumed.elapsed(),
        images.len(),
        partitions.len()
    );

    // The killed instance back under its name: it re-reads what it left pending, finds the
    // image final and announces it again (watchers never show it twice: see above).
    platform
        .start_service(Service::Api, &[(NO_RECONCILING.0, Some(NO_RECONCILING.1))])
        .await
        .unwrap();
    eventually_async(
        WAIT,
        "the result delivered again and announced again",
        || async {
            let again = platform
                .metric(
                    &platform.api_url,
                    "follow_api_results_applied_total{outcome=\"ignored\"}",
                )
                .await
                .unwrap_or(0.0);
            (again >= 1.0).then_some(())
        },
    )
    .await;
    user.clean_up(&platform).await;
}

/// With `PUBLISH` refused to the API (its announcements all fail), watchers on either instance
/// still get every outcome and READY, once each.
#[tokio::test]
async fn watchers_learn_outcomes_while_publish_is_refused() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("API instances killed, frozen and restarted") {
        return;
    }
    let second = platform.add_api(&[]).await.unwrap();
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.2, 0.3), (0.7, 0.6)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    let images = image_ids(&created);
    let mut watches = watch_all(&platform, &platform.api_url, &user, &route_id, &images).await;
    watches.extend(watch_all(&platform, &second, &user, &route_id, &images).await);
    let mut admin = platform.valkey().await.unwrap();
    let acl = |rule: &'static str| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("follow-api").arg(rule);
        cmd
    };
    let _: () = acl("-publish").query_async(&mut admin).await.unwrap();
    for target in &created.upload_targets {
        upload_accepted(&target.upload_url, "image/jpeg", jpeg(320, 240)).await;
    }
    let started = Instant::now();
    all_told(watches, "PUBLISH refused").await;
    eprintln!(
        "every watcher told within {:?} of the uploads",
        started.elapsed()
    );
    let _: () = acl("+publish").query_async(&mut admin).await.unwrap();
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    user.clean_up(&platform).await;
}
