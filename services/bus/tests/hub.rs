//! The progress hub against a real Valkey: reference-counted subscriptions, every message for a
//! watcher that keeps up, a bounded inbox coalescing superseded messages for a slow one, dropping
//! a lagged watcher, resync after Valkey restarts, and an end for every watcher when the hub
//! stops.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::{sync::atomic::Ordering, time::Duration};

use common::*;
use follow_bus::{Channels, HUB_QUEUE, Hub, HubEvent, Progress, Stage, Subscription, keys};
use follow_testkit::{ValkeyServer, eventually_async};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

struct Running {
    server: ValkeyServer,
    hub: Hub,
    cancel: CancellationToken,
    worker: tokio::task::JoinHandle<()>,
}

async fn hub(channels: Channels, max_lag: Duration) -> Running {
    let (server, valkey) = valkey().await;
    let cancel = CancellationToken::new();
    let (hub, worker) = Hub::with_channels(valkey, channels, max_lag, cancel.clone());
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

async fn patterns(server: &ValkeyServer) -> usize {
    let mut conn = server.connection().await;
    redis::cmd("PUBSUB")
        .arg("NUMPAT")
        .query_async(&mut conn)
        .await
        .unwrap()
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
async fn per_image_one_valkey_subscription_per_image_however_many_watchers() {
    let running = hub(Channels::PerImage, Duration::from_secs(60)).await;
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

/// Progress of `image_id` with this `seq` (stages are not checked by the hub, seqs are).
fn at_seq(image_id: Uuid, seq: u64) -> Progress {
    Progress {
        seq,
        ..Progress::stage(image_id, Stage::Processing)
    }
}

#[tokio::test]
async fn a_watcher_that_keeps_up_gets_every_message_in_order() {
    let running = hub(Channels::default(), Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    let mut seen = Vec::new();
    for seq in 1..=8 {
        publish(&running.server, &at_seq(a, seq)).await;
    }
    // However the messages are batched, none is left out while the watcher is under the queue.
    while seen.len() < 8 {
        let HubEvent::Progress(batch) = next(&mut watcher).await else {
            panic!("progress expected");
        };
        seen.extend(batch.iter().map(|p| p.seq));
    }
    assert_eq!(seen, (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_slow_watcher_gets_a_bounded_inbox_with_the_newest_message_per_image() {
    let running = hub(Channels::default(), Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let mut slow = running.hub.subscribe(&[a, b]).await.unwrap();
    let mut marker = running.hub.subscribe(&[a]).await.unwrap();

    publish(&running.server, &Progress::stage(b, Stage::Validating)).await;
    let last = 3 * HUB_QUEUE as u64;
    for seq in 1..=last {
        publish(&running.server, &at_seq(a, seq)).await;
    }
    // Queue full: b's committed announcement replaces b's message; a stale one for b afterwards
    // neither replaces it nor takes the announcement away; an older one for a changes nothing.
    publish(&running.server, &Progress::committed(b, None)).await;
    publish(&running.server, &Progress::stage(b, Stage::Validating)).await;
    publish(&running.server, &at_seq(a, 2)).await;
    // Once the marker watcher (subscribed to a, reading as it goes) saw the end, so did the hub.
    publish(&running.server, &at_seq(a, last + 1)).await;
    let mut marker_seen = 0;
    while marker_seen != last + 1 {
        let HubEvent::Progress(batch) = next(&mut marker).await else {
            panic!("progress expected");
        };
        marker_seen = batch.last().unwrap().seq;
    }

    let HubEvent::Progress(held) = next(&mut slow).await else {
        panic!("progress expected");
    };
    assert_eq!(held.len(), HUB_QUEUE, "bounded");
    assert_eq!(
        (held[0].image_id, held[0].stage, held[0].committed),
        (b, Stage::Done, true)
    );
    let seqs: Vec<u64> = held[1..].iter().map(|p| p.seq).collect();
    let mut expected: Vec<u64> = (1..HUB_QUEUE as u64 - 1).collect();
    expected.push(last + 1);
    assert_eq!(seqs, expected, "the first in order, then the newest");
}

#[tokio::test]
async fn a_watcher_that_falls_behind_is_told_and_dropped_while_others_go_on() {
    // With no lag allowed, a second message arriving before the first was taken is too late.
    let running = hub(Channels::PerImage, Duration::ZERO).await;
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
    let stats = running.hub.stats();
    assert_eq!(stats.lagged.load(Ordering::Relaxed), 1);
    assert_eq!(stats.channels.load(Ordering::Relaxed), 1);
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
async fn pattern_one_psubscribe_and_nothing_in_valkey_per_watch() {
    let running = hub(Channels::Pattern, Duration::from_secs(60)).await;
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let _first = running.hub.subscribe(&[a, b]).await.unwrap();
    let _second = running.hub.subscribe(&[a]).await.unwrap();
    assert_eq!(patterns(&running.server).await, 1);
    assert_eq!(subscribers(&running.server, a).await, 0);
    assert_eq!(running.hub.stats().channels.load(Ordering::Relaxed), 2);
}

#[tokio::test]
async fn watchers_resync_after_valkey_restarts_and_end_when_the_hub_stops() {
    for channels in [Channels::PerImage, Channels::Pattern] {
        resync_and_end(channels).await;
    }
}

async fn resync_and_end(channels: Channels) {
    let mut running = hub(channels, Duration::from_secs(60)).await;
    let a = Uuid::new_v4();
    let mut watcher = running.hub.subscribe(&[a]).await.unwrap();
    running.server.restart().await.unwrap();
    assert_eq!(next(&mut watcher).await, HubEvent::Resync);
    // Resubscribed: live messages flow again.
    match channels {
        Channels::PerImage => subscribed(&running.server, a, 1).await,
        Channels::Pattern => {
            eventually_async(WITHIN, "the pattern subscribed again", || async {
                (patterns(&running.server).await == 1).then_some(())
            })
            .await;
        }
    }
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
