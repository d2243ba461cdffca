//! `cargo bench -p follow-bus --bench hub` (run by `./dev bench live`): what the progress hub
//! (one subscription per partition channel, messages of unwatched images dropped here) costs,
//! measured on one real Valkey, in one run, for two shapes of traffic:
//!
//! * every published image is watched in this process (one API instance, or all watchers on it);
//! * a tenth is (the rest is watched on other instances, or by nobody).
//!
//! Per shape: watches opened per second (a burst of `FOLLOW_BENCH_WATCHES`, default
//! 10,000, one image each), events published at `FOLLOW_BENCH_RATE` per second (default 5,000) for
//! 4 s, publish → watcher latency p50/p99, CPU of this process (hub and watchers) and of Valkey
//! per 1,000 events published (with a row for publishing alone, nobody subscribed, to compare
//! with), and how long closing every watch takes. CPU figures move by tens of percent between
//! runs on shared cores; opens/s and closing time differ by orders of magnitude.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use follow_bus::{Hub, HubEvent, Notice, Progress, Stage, Valkey, ValkeyConfig, keys};
use follow_testkit::{ValkeyServer, eventually_async, setting};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// CPU seconds of this process so far (user + system, from `/proc/self/stat`).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the line (11 and 12 after the name), in 1/100 s.
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU seconds Valkey has used so far (`INFO cpu`).
async fn valkey_cpu(server: &ValkeyServer) -> f64 {
    let mut conn = server.connection().await;
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

struct Figures {
    opened_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    received: usize,
    expected: usize,
    own_cpu_ms: f64,
    valkey_cpu_ms: f64,
    close_ms: f64,
}

/// Events published in this run (4 s at `rate`).
fn events(rate: usize) -> usize {
    rate * 4
}

/// Publishes `events(rate)` progress messages at `rate`, a `watched_share` of them for `watched`
/// images and the rest for `others`; returns how many went to watched images.
async fn publish(
    server: &ValkeyServer,
    watched: &[Uuid],
    others: &[Uuid],
    watched_share: f64,
    rate: usize,
) -> usize {
    let mut publisher = server.connection().await;
    // A fixed rate: a late tick is made up at once (`Burst`), as a schedule would.
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (mut to_watched, mut to_others, mut owed) = (0usize, 0usize, 0.0f64);
    for _ in 0..events(rate) {
        pace.tick().await;
        owed += watched_share;
        let id = if owed >= 1.0 {
            owed -= 1.0;
            to_watched += 1;
            watched[to_watched % watched.len()]
        } else {
            to_others += 1;
            others[to_others % others.len()]
        };
        let _: () = redis::cmd("PUBLISH")
            .arg(keys::Partitions::DEFAULT.progress(id))
            .arg(Notice::from(Progress::reached(id, Stage::Processing)).encode())
            .query_async(&mut publisher)
            .await
            .unwrap();
    }
    to_watched
}

/// CPU seconds of this process and of Valkey while only publishing (nobody subscribed).
async fn publishing_alone(server: &ValkeyServer, watched_share: f64, rate: usize) -> (f64, f64) {
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let (own, valkey) = (own_cpu(), valkey_cpu(server).await);
    publish(server, &ids, &ids, watched_share, rate).await;
    (own_cpu() - own, valkey_cpu(server).await - valkey)
}

/// The hub under one traffic shape.
async fn run(server: &ValkeyServer, watched_share: f64, watches: usize, rate: usize) -> Figures {
    let valkey = Valkey::new(ValkeyConfig::new(server.url())).unwrap();
    let cancel = CancellationToken::new();
    let hub = Hub::new(valkey, Hub::DEFAULT_MAX_LAG);
    let worker = tokio::spawn(hub.worker(cancel.clone()));
    let hub = Arc::new(hub);
    let watched: Vec<Uuid> = (0..watches).map(|_| Uuid::new_v4()).collect();
    let others: Vec<Uuid> = (0..watches).map(|_| Uuid::new_v4()).collect();

    let opening = Instant::now();
    let subscriptions = futures_util::future::join_all(watched.iter().map(|id| {
        let hub = Arc::clone(&hub);
        let id = *id;
        async move { hub.subscribe(&[id]).await.unwrap() }
    }))
    .await;
    let opened_per_s = watches as f64 / opening.elapsed().as_secs_f64();

    // Every watcher records the latency of what it receives until told to stop.
    let stop = CancellationToken::new();
    let (received, mut counted) = tokio::sync::watch::channel(0usize);
    let received = Arc::new(received);
    let mut receivers = Vec::with_capacity(watches);
    for mut subscription in subscriptions {
        let (stop, received) = (stop.clone(), Arc::clone(&received));
        receivers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    event = subscription.recv() => match event {
                        Some(HubEvent::Notices(batch)) => {
                            let now = OffsetDateTime::now_utc();
                            latencies.extend(batch.iter().filter_map(|n| match n {
                                Notice::Progress(p) => Some((now - p.at()).as_seconds_f64()),
                                Notice::Committed(_) => None,
                            }));
                            received.send_modify(|n| *n += batch.len());
                        }
                        _ => break,
                    },
                }
            }
            (latencies, subscription)
        }));
    }

    let (own_before, valkey_before) = (own_cpu(), valkey_cpu(server).await);
    let expected = publish(server, &watched, &others, watched_share, rate).await;
    // Done when every watcher got what was published for it (or after a deadline: then the
    // figure shows fewer received).
    let _ = tokio::time::timeout(
        Duration::from_secs(30),
        counted.wait_for(|n| *n >= expected),
    )
    .await;
    let (own_after, valkey_after) = (own_cpu(), valkey_cpu(server).await);
    stop.cancel();
    let mut latencies = Vec::with_capacity(expected);
    let mut subscriptions = Vec::with_capacity(watches);
    for receiver in receivers {
        let (seen, subscription) = receiver.await.unwrap();
        latencies.extend(seen);
        subscriptions.push(subscription);
    }

    let closing = Instant::now();
    drop(subscriptions);
    // Unsubscribing is the worker's: done when the hub watches no image (its channels, one per
    // partition, stay subscribed).
    let stats = hub.stats();
    eventually_async(Duration::from_secs(60), "every watch closed", || {
        let open = stats.channels.load(std::sync::atomic::Ordering::Relaxed);
        std::future::ready((open == 0).then_some(()))
    })
    .await;
    let close_ms = closing.elapsed().as_secs_f64() * 1000.0;
    cancel.cancel();
    worker.await.unwrap();

    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |s| s * 1000.0)
    };
    let per_thousand = 1000.0 / events(rate) as f64 * 1000.0;
    Figures {
        opened_per_s,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
        received: latencies.len(),
        expected,
        own_cpu_ms: (own_after - own_before) * per_thousand,
        valkey_cpu_ms: (valkey_after - valkey_before) * per_thousand,
        close_ms,
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo bench` probes harness=false targets with these.
    }
    let watches = setting("FOLLOW_BENCH_WATCHES", 10_000);
    let rate = setting("FOLLOW_BENCH_RATE", 5_000);
    let server = ValkeyServer::start().await.unwrap();
    println!(
        "progress hub: one subscription per partition channel ({watches} watches, one image each; {rate} events/s for 4 s; one Valkey, 2 shared cores)"
    );
    println!(
        "  {:<38} {:>10} {:>11} {:>8} {:>8} {:>13} {:>13} {:>9}",
        "strategy, traffic",
        "opens/s",
        "received",
        "p50 ms",
        "p99 ms",
        "CPU ms/1k ev",
        "Valkey ms/1k",
        "close ms"
    );
    for (share, shape) in [(1.0, "all watched here"), (0.1, "a tenth watched here")] {
        let (own, valkey) = publishing_alone(&server, share, rate).await;
        let per_thousand = 1000.0 / events(rate) as f64 * 1000.0;
        println!(
            "  {:<38} {:>10} {:>11} {:>8} {:>8} {:>13.1} {:>13.1} {:>9}",
            format!("publishing alone, {shape}"),
            "",
            "",
            "",
            "",
            own * per_thousand,
            valkey * per_thousand,
            ""
        );
        let f = run(&server, share, watches, rate).await;
        println!(
            "  {:<38} {:>10.0} {:>11} {:>8.2} {:>8.2} {:>13.1} {:>13.1} {:>9.0}",
            format!("hub, {shape}"),
            f.opened_per_s,
            format!("{}/{}", f.received, f.expected),
            f.p50_ms,
            f.p99_ms,
            f.own_cpu_ms,
            f.valkey_cpu_ms,
            f.close_ms
        );
    }
}
