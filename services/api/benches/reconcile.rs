//! `./dev bench reconcile`: what the reconciler asks of S3 while images wait for their uploads.
//!
//! `FOLLOW_BENCH_IMAGES` (100,000) PENDING images whose tokens outlive the run, nothing
//! uploaded, on real servers (PostgreSQL, Valkey, Garage). For `FOLLOW_BENCH_SECS` (600) the
//! production reconciler runs a round every `FOLLOW_BENCH_INTERVAL_SECS` (30, the default
//! `FOLLOW_RECONCILE_INTERVAL_SECS`); halfway, Valkey restarts empty (a loss of its data: one
//! sweep). Then, on the same images and servers for as long, the previous design's policy: every
//! PENDING image, every interval, its result record read and its original looked for (what it
//! did for an image nobody uploaded), as many at once as it did (16). Printed for both: S3
//! requests, per second and per image, and what the policy asks (the previous one falls behind
//! when S3 cannot answer that fast). Requests are counted, not timed: the figures do not depend
//! on the machine, except how far behind the previous policy falls.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use follow_api::{
    MIGRATOR,
    metrics::Metrics,
    reconciler::{Reconciler, Watch},
    results::ResultApplier,
};
use follow_bus::{
    Epochs, HealthChecker, HubStats, Producer, ProgressTracker, UploadGuard, Valkey, ValkeyConfig,
    acl::User,
};
use follow_service::{
    config::{Env, S3Config},
    objects::{self, original_key},
    s3::Bucket,
};
use follow_testkit::{GarageServer, PostgresServer, ValkeyServer, setting};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() {
    let images = setting("FOLLOW_BENCH_IMAGES", 100_000);
    let secs = setting("FOLLOW_BENCH_SECS", 600) as u64;
    let every = Duration::from_secs(setting("FOLLOW_BENCH_INTERVAL_SECS", 30) as u64);
    let (pg, valkey_server, garage) = tokio::join!(
        PostgresServer::start(),
        ValkeyServer::start(),
        GarageServer::start()
    );
    let (pg, mut valkey_server, garage) = (pg.unwrap(), valkey_server.unwrap(), garage.unwrap());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&pg.url())
        .await
        .unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    waiting_images(&pool, images).await;
    let bucket = bucket(&garage);
    println!("the reconciler's S3 requests while {images} images wait for their uploads");
    println!(
        "conditions: {secs} s each, a round every {} s, nothing uploaded, tokens outliving the \
         run; Valkey restarted empty halfway through the current design's run; PostgreSQL, \
         Valkey and Garage on {} cores shared with the bench",
        every.as_secs(),
        std::thread::available_parallelism().map_or(0, usize::from)
    );

    let current = current(&pool, &bucket, &mut valkey_server, every, secs).await;
    let previous = previous(&pool, &bucket, every, secs).await;
    let asked = images as f64 * 2.0 * (secs as f64 / every.as_secs_f64()).ceil();
    println!(
        "  {:<44} {:>12} {:>10} {:>10}",
        "", "requests", "per s", "per image"
    );
    for (name, made) in [
        ("current (at expiry, after an upload, a loss)", current),
        ("previous (every image, every interval)", previous),
    ] {
        println!(
            "  {name:<44} {made:>12} {:>10.1} {:>10.2}",
            made as f64 / secs as f64,
            made as f64 / images as f64
        );
    }
    println!(
        "  the previous policy asks for {asked:.0} ({:.1}/s); the current one's bound: 2 per image \
         per loss of Valkey data, 3 per image otherwise, over its whole life",
        asked / secs as f64
    );
    println!(
        "  ratio previous / current: {:.0}",
        previous as f64 / current.max(1) as f64
    );
}

/// `count` PENDING images in routes of 100, tokens valid for a day.
async fn waiting_images(pool: &PgPool, count: usize) {
    let routes = count.div_ceil(100) as i64;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "INSERT INTO route.routes (id, owner, name, request_id)
         SELECT md5('r' || r)::uuid, 'bench', 'r', 'r' || r FROM generate_series(1, {routes}) r;
         INSERT INTO route.waypoints (id, route_id, position, marker_x, marker_y, current_image_id)
         SELECT md5('w' || i)::uuid, md5('r' || (i / 100 + 1))::uuid, i % 100, 0.5, 0.5,
                md5('i' || i)::uuid
         FROM generate_series(0, {count} - 1) i;
         INSERT INTO image.images (id, route_id, waypoint_id, content_type, declared_size,
                                   storage_key, expires_at, next_check_at)
         SELECT md5('i' || i)::uuid, md5('r' || (i / 100 + 1))::uuid, md5('w' || i)::uuid,
                'image/jpeg', 1000000, 'images/bench/' || md5('i' || i) || '.jpg',
                now() + interval '1 day', now() + interval '1 day 5 minutes'
         FROM generate_series(0, {count} - 1) i;"
    )))
    .execute(pool)
    .await
    .unwrap();
}

fn bucket(garage: &GarageServer) -> Bucket {
    let vars: HashMap<&str, String> = garage.service_env().into_iter().collect();
    let lookup = |name: &str| vars.get(name).cloned();
    Bucket::new(&S3Config::from_env(&Env::new(&lookup)).unwrap())
}

/// The reconciler as the API runs it; returns the S3 requests it made.
async fn current(
    pool: &PgPool,
    bucket: &Bucket,
    valkey_server: &mut ValkeyServer,
    every: Duration,
    secs: u64,
) -> u64 {
    let valkey = Valkey::new(ValkeyConfig::new(valkey_server.url_as(User::Api))).unwrap();
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(Metrics::register(&mut registry));
    let (_uploads, receiver) = tokio::sync::mpsc::unbounded_channel();
    let reconciler = Reconciler {
        pool: pool.clone(),
        bucket: bucket.clone(),
        producer: Producer::new(&valkey).unwrap(),
        guard: UploadGuard::new(&valkey).unwrap(),
        valkey: HealthChecker::new(&valkey, None).unwrap(),
        epochs: Epochs::new(&valkey).unwrap(),
        applier: ResultApplier::new(pool.clone()),
        announcer: ProgressTracker::new(&valkey).unwrap(),
        metrics: Arc::clone(&metrics),
        hub: Arc::new(HubStats::default()),
        uploads: Arc::new(tokio::sync::Mutex::new(receiver)),
        every,
        grace: Duration::from_secs(300),
    };
    // The markers a running platform has had since it started: no loss yet.
    reconciler.epochs.renew().await.unwrap();
    let mut watch = Watch::default();
    let started = Instant::now();
    let mut restarted = false;
    while started.elapsed() < Duration::from_secs(secs) {
        let round = Instant::now();
        reconciler.round(&mut watch).await.unwrap();
        if !restarted && started.elapsed() >= Duration::from_secs(secs / 2) {
            valkey_server.restart().await.unwrap();
            restarted = true;
        }
        tokio::time::sleep(every.saturating_sub(round.elapsed())).await;
    }
    metrics.reconciler_s3_requests.get()
}

/// The previous policy on the same images: every PENDING image, every interval, its record and
/// its original, 16 at a time; returns the S3 requests made.
async fn previous(pool: &PgPool, bucket: &Bucket, every: Duration, secs: u64) -> u64 {
    let made = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let started = Instant::now();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT storage_key FROM image.images WHERE status = 'PENDING'")
            .fetch_all(pool)
            .await
            .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let stopping = stop.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(deadline).await;
        stopping.cancel();
    });
    while !stop.is_cancelled() {
        let round = Instant::now();
        futures_util::stream::iter(&keys)
            .take_until(stop.cancelled())
            .map(|key| {
                let made = Arc::clone(&made);
                async move {
                    let _ = objects::read_record(bucket, key).await;
                    let _ = bucket.exists(&original_key(key)).await;
                    made.fetch_add(2, Ordering::Relaxed);
                }
            })
            .buffer_unordered(16)
            .collect::<Vec<()>>()
            .await;
        tokio::select! {
            () = stop.cancelled() => {}
            () = tokio::time::sleep(every.saturating_sub(round.elapsed())) => {}
        }
    }
    let _ = started;
    made.load(Ordering::Relaxed)
}
