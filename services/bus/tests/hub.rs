//! The progress hub against a real Valkey: reference-counted subscriptions, every message for a
//! watcher that keeps up, a bounded inbox coalescing superseded messages for a slow one, dropping
//! a lagged watcher, resync after Valkey restarts, and an end for every watcher when the hub
//! stops.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use follow_bus::{Committed, HUB_QUEUE, Hub, HubEvent, Notice, Progress, Stage, Subscription};
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
    let hub = Hub::new(valkey, max_lag);
    let worker = tokio::spawn(hub.worker(cancel.clone()));
    Running {
        server,
        hub,
        cancel,
        worker,
    }
}

async fn publish(server: &ValkeyServer, notice: impl Into<Notice>) -> usize {
    let notice = notice.into();
    let mut conn = server.connection().await;
    redis::cmd("PUBLISH")
        .arg(partitions().progress(notice.image_id()))
        .arg(notice.encode())
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn subscribers(server: &ValkeyServer, image_id: Uuid) -> usize {
    let mut conn = server.connection().await;
    let counts: Vec<(String, usize)> = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(partitions().progress(image_id))
        .query_async(&mut conn)
        .await
        .unwrap();
    counts[0].1
}

/// What matters of a batch of notices: image, stage (`Done` for a commit), committed.
fn summary(event: HubEvent) -> Vec<(Uuid, Stage, bool)> {
    let HubEvent::Notices(batch) = event else {
        panic!("notices expected, got {event:?}");
    };
    batch.iter().map(said).collect()
}

fn said(notice: &Notice) -> (Uuid, Stage, bool) {
    match notice {
        Notice::Progress(p) => (p.image_id(), p.stage(), false),
        Notice::Committed(c) => (c.image_id, Stage::Done, true),
    }
}

fn committed(image_id: Uuid) -> Notice {
    Notice::Committed(Box::new(Committed {
        image_id,
        image: follow_proto::api::v1::Image {
            id: image_id.to_string(),
            ..Default::default()
        },
        route_ready: false,
    }))
}

/// Waits until `image_id`'s partition's channel has `n` subscribers (the hub subscribes in the
/// background).
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
async fn one_subscription_per_partition_and_nothing_in_valkey_per_watch() {
    let running = hub(Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    subscribed(&running.server, a, 1).await;
    let first = running.hub.subscribe(&[a, b, a]).await.unwrap();
    let second = running.hub.subscribe(&[a]).await.unwrap();
    assert_eq!(subscribers(&running.server, a).await, 1);
    assert_eq!(running.hub.stats().channels.load(Ordering::Relaxed), 2);
    drop(first);
    eventually_async(WITHIN, "b no longer watched", || async {
        (running.hub.stats().channels.load(Ordering::Relaxed) == 1).then_some(())
    })
    .await;
    drop(second);
    eventually_async(WITHIN, "nothing watched", || async {
        (running.hub.stats().channels.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await;
    assert_eq!(subscribers(&running.server, a).await, 1, "still subscribed");
}

#[tokio::test]
async fn a_watcher_that_keeps_up_gets_every_message_in_order() {
    let running = hub(Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    let stages = &Stage::ALL[..8];
    for stage in stages {
        publish(&running.server, Progress::reached(a, *stage)).await;
    }
    // However the messages are batched, none is left out while the watcher is under the queue.
    let mut seen = Vec::new();
    while seen.len() < stages.len() {
        seen.extend(summary(next(&mut watcher).await).into_iter().map(|s| s.1));
    }
    assert_eq!(seen, stages);
}

#[tokio::test]
async fn a_slow_watcher_gets_a_bounded_inbox_with_the_newest_message_per_image() {
    let running = hub(Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let others: Vec<Uuid> = (0..HUB_QUEUE - 2).map(|_| Uuid::new_v4()).collect();
    let watched: Vec<Uuid> = [a, b].into_iter().chain(others.iter().copied()).collect();
    let mut slow = running.hub.subscribe(&watched).await.unwrap();
    let mut marker = running.hub.subscribe(&[a]).await.unwrap();

    publish(&running.server, Progress::reached(b, Stage::Validating)).await;
    for id in &others {
        publish(&running.server, Progress::reached(*id, Stage::Queued)).await;
    }
    publish(&running.server, Progress::reached(a, Stage::Queued)).await;
    // Queue full: each later stage of a replaces a's message; b's committed announcement
    // replaces b's; a stale stage for b afterwards neither replaces it nor takes the
    // announcement away; an older stage for a changes nothing.
    for stage in &Stage::ALL[1..7] {
        publish(&running.server, Progress::reached(a, *stage)).await;
    }
    publish(&running.server, committed(b)).await;
    publish(&running.server, Progress::reached(b, Stage::Validating)).await;
    publish(&running.server, Progress::reached(a, Stage::Decoding)).await;
    // Once the marker watcher (subscribed to a, reading as it goes) saw the end, so did the hub.
    publish(&running.server, Progress::reached(a, Stage::Done)).await;
    let mut marker_seen = Stage::Queued;
    while marker_seen != Stage::Done {
        marker_seen = summary(next(&mut marker).await).last().unwrap().1;
    }

    let held = summary(next(&mut slow).await);
    assert_eq!(held.len(), HUB_QUEUE, "bounded");
    assert_eq!(held[0], (b, Stage::Done, true));
    let queued: Vec<Uuid> = held[1..HUB_QUEUE - 1].iter().map(|h| h.0).collect();
    assert_eq!(queued, others, "the first in order");
    assert_eq!(
        held[HUB_QUEUE - 1],
        (a, Stage::Done, false),
        "then the newest"
    );
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_and_dropped_while_others_go_on() {
    // With no lag allowed, a second message arriving before the first was taken is too late.
    let running = hub(Duration::ZERO).await;
    let a = Uuid::new_v4();
    let mut lagging = running.hub.subscribe(&[a]).await.unwrap();
    let mut other = running.hub.subscribe(&[a]).await.unwrap();
    publish(&running.server, Progress::reached(a, Stage::WaitingUpload)).await;
    assert!(matches!(next(&mut other).await, HubEvent::Notices(_)));
    publish(&running.server, Progress::reached(a, Stage::Validating)).await;
    assert!(matches!(next(&mut other).await, HubEvent::Notices(_)));

    assert_eq!(next(&mut lagging).await, HubEvent::Lagged);
    assert_eq!(
        next(&mut lagging).await,
        HubEvent::Lagged,
        "it stays lagged"
    );
    let stats = running.hub.stats();
    assert_eq!(stats.lagged.load(Ordering::Relaxed), 1);
    assert_eq!(stats.channels.load(Ordering::Relaxed), 1);
    publish(&running.server, Progress::reached(a, Stage::Decoding)).await;
    assert_eq!(
        summary(next(&mut other).await),
        vec![(a, Stage::Decoding, false)],
        "the other watcher goes on"
    );

    // The lagged watcher no longer counts: once the other one leaves, nobody watches a.
    drop(other);
    eventually_async(WITHIN, "nobody watching", || async {
        (running.hub.stats().channels.load(Ordering::Relaxed) == 0).then_some(())
    })
    .await;
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
    publish(&running.server, Progress::reached(a, Stage::Validating)).await;
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

#[tokio::test]
async fn a_new_worker_takes_over_after_one_fails_and_every_watcher_resyncs() {
    let running = hub(Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    // The worker dies (as if it panicked): nothing is delivered until another one runs.
    running.worker.abort();
    let _ = running.worker.await;
    let second = tokio::spawn(running.hub.worker(running.cancel.clone()));
    assert_eq!(next(&mut watcher).await, HubEvent::Resync);
    subscribed(&running.server, a, 1).await;
    publish(&running.server, Progress::reached(a, Stage::Decoding)).await;
    assert_eq!(
        summary(next(&mut watcher).await),
        vec![(a, Stage::Decoding, false)]
    );
    let _late = running.hub.subscribe(&[Uuid::new_v4()]).await.unwrap();
    running.cancel.cancel();
    second.await.unwrap();
}
