//! The progress hub against a real Valkey: reference-counted subscriptions, coalescing of
//! superseded messages for a slow watcher, dropping a lagged watcher, resync after Valkey
//! restarts, and an end for every watcher when the hub stops.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use follow_bus::{Hub, HubEvent, Progress, Stage, Subscription, keys};
use follow_testkit::{ValkeyServer, eventually_async};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Running {
    server: ValkeyServer,
    hub: Hub,
    cancel: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn hub(max_lag: Duration) -> Running {
    let (server, valkey) = valkey().await;
    let cancel = CancellationToken::new();
    let (hub, worker) = Hub::new(valkey, max_lag, cancel.clone());
    let worker = tokio::spawn(worker);
    Running {
        server,
        hub,
        cancel,
        worker,
    }
}

async fn publish(server: &ValkeyServer, progress: &Progress) -> usize {
    let mut conn = server.connection().await;
    redis::cmd("PUBLISH")
        .arg(keys::progress(progress.image_id))
        .arg(progress.encode())
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn subscribers(server: &ValkeyServer, image_id: Uuid) -> usize {
    let mut conn = server.connection().await;
    let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(keys::progress(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

/// What matters of a batch of progress messages: image, stage, committed.
fn summary(event: HubEvent) -> Vec<(Uuid, Stage, bool)> {
    let HubEvent::Progress(batch) = event else {
        panic!("progress expected, got {event:?}");
    };
    batch
        .iter()
        .map(|p| (p.image_id, p.stage, p.committed))
        .collect()
}

/// Waits until `image_id`'s channel has `n` subscribers (the hub (un)subscribes in the background).
async fn subscribed(server: &ValkeyServer, image_id: Uuid, n: usize) {
    eventually_async(WITHIN, "the subscriber count", || async {
        (subscribers(server, image_id).await == n).then_some(())
    })
    .await;
}

async fn next(subscription: &mut Subscription) -> HubEvent {
    tokio::time::timeout(WITHIN, subscription.recv())
        .await
        .expect("an event in time")
        .expect("the hub runs")
}

#[tokio::test]
async fn one_valkey_subscription_per_image_however_many_watchers() {
    let running = hub(Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let first = running.hub.subscribe(&[a, b, a]).await.unwrap();
    let second = running.hub.subscribe(&[a]).await.unwrap();
    assert_eq!(subscribers(&running.server, a).await, 1);
    assert_eq!(subscribers(&running.server, b).await, 1);

    drop(first);
    subscribed(&running.server, b, 0).await;
    assert_eq!(subscribers(&running.server, a).await, 1, "still watched");
    drop(second);
    subscribed(&running.server, a, 0).await;
}

#[tokio::test]
async fn a_slow_watcher_gets_the_latest_message_per_image_and_never_a_queue() {
    let running = hub(Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut slow = running.hub.subscribe(&[a, b]).await.unwrap();
    let mut fast = running.hub.subscribe(&[a]).await.unwrap();

    let stages = [
        Stage::WaitingUpload,
        Stage::Validating,
        Stage::Decoding,
        Stage::Processing,
    ];
    publish(&running.server, &Progress::stage(b, Stage::Validating)).await;
    for stage in stages {
        publish(&running.server, &Progress::stage(a, stage)).await;
        // The fast watcher takes each message as it comes; the slow one takes none.
        assert_eq!(summary(next(&mut fast).await), vec![(a, stage, false)]);
    }
    // An older message arriving late does not replace a newer one.
    publish(&running.server, &Progress::stage(a, Stage::Decoding)).await;
    publish(&running.server, &Progress::committed(b, None)).await;
    // A marker published last: once the fast watcher sees it, the slow one's inbox is complete.
    publish(&running.server, &Progress::stage(a, Stage::Encoding)).await;
    while summary(next(&mut fast).await).last() != Some(&(a, Stage::Encoding, false)) {}

    assert_eq!(
        summary(next(&mut slow).await),
        vec![(b, Stage::Done, true), (a, Stage::Encoding, false)],
        "one message per image, the newest, in order of first arrival"
    );
}

#[tokio::test]
async fn a_committed_announcement_survives_a_later_stage_message() {
    let running = hub(Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    let mut marker = running.hub.subscribe(&[a]).await.unwrap();
    publish(&running.server, &Progress::committed(a, None)).await;
    let mut failed = Progress::stage(a, Stage::Failed);
    failed.committed = false;
    publish(&running.server, &failed).await;
    // Once the marker watcher saw the second, the other's inbox holds both, coalesced.
    while summary(next(&mut marker).await).last().map(|p| p.1) != Some(Stage::Failed) {}
    let held = summary(next(&mut watcher).await);
    assert_eq!(
        held,
        vec![(a, Stage::Failed, true)],
        "the announcement is kept"
    );
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_and_dropped_while_others_go_on() {
    // With no lag allowed, a second message arriving before the first was taken is too late.
    let running = hub(Duration::ZERO).await;
    let a = Uuid::new_v4();
    let mut lagging = running.hub.subscribe(&[a]).await.unwrap();
    let mut other = running.hub.subscribe(&[a]).await.unwrap();
    publish(&running.server, &Progress::stage(a, Stage::WaitingUpload)).await;
    assert!(matches!(next(&mut other).await, HubEvent::Progress(_)));
    publish(&running.server, &Progress::stage(a, Stage::Validating)).await;
    assert!(matches!(next(&mut other).await, HubEvent::Progress(_)));

    assert_eq!(next(&mut lagging).await, HubEvent::Lagged);
    assert_eq!(
        next(&mut lagging).await,
        HubEvent::Lagged,
        "it stays lagged"
    );
    publish(&running.server, &Progress::stage(a, Stage::Decoding)).await;
    assert_eq!(
        summary(next(&mut other).await),
        vec![(a, Stage::Decoding, false)],
        "the other watcher goes on"
    );

    // The lagged watcher no longer counts: the last other one leaving unsubscribes.
    drop(other);
    subscribed(&running.server, a, 0).await;
    drop(lagging);
}

#[tokio::test]
async fn watchers_resync_after_valkey_restarts_and_end_when_the_hub_stops() {
    let mut running = hub(Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    running.server.restart().await.unwrap();
    assert_eq!(next(&mut watcher).await, HubEvent::Resync);
    // Resubscribed: live messages flow again.
    subscribed(&running.server, a, 1).await;
    publish(&running.server, &Progress::stage(a, Stage::Validating)).await;
    assert_eq!(
        summary(next(&mut watcher).await),
        vec![(a, Stage::Validating, false)]
    );

    running.cancel.cancel();
    running.worker.await.unwrap();
    let ended = tokio::time::timeout(WITHIN, watcher.recv()).await.unwrap();
    assert_eq!(ended, None);
    assert!(running.hub.subscribe(&[a]).await.is_err());
}
