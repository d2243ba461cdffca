//! `./dev bench api`: how fast one API process applies results, on a PostgreSQL that really
//! syncs (checked with `SHOW`, printed), with the production applier (announcements on
//! `image:progress:{pN}` and metrics) connected as the API's Valkey user.
//!
//! The work looks like production: routes of 1–10 waypoints, one result in 10 a failure, one in
//! 20 delivered twice. Two measures:
//! - **drain**: a pre-filled `image:result` applied as fast as possible, batched (64) and one
//!   result per transaction, beside a plain one-row-commit rate and the raw pipelined `XADD` rate
//!   on the same servers (printed as ratios);
//! - **steady state**: a producer at a fixed rate (`FOLLOW_BENCH_RATE`, 2,000/s, for
//!   `FOLLOW_BENCH_STEADY_SECS`, 10 s); latency from a result's `XADD` to its commit
//!   announcement arriving at a subscriber, p50 / p99 / max.
//!
//! - **cluster**: the drain again on a Valkey Cluster (3 primaries + 3 replicas, 16 partitions)
//!   by 1, 2 and 3 API instances (in this process: each its own connections, consumers and
//!   applier), with how busy the machine was, PostgreSQL's WAL syncs per second and Valkey
//!   commands per batch of 64: what bounds the factor from 1 to 3.
//!
//! Figures are taken in one run on one machine; compare the ratios.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use follow_api::{MIGRATOR, metrics::Metrics, results::ResultApplier};
use follow_bus::{
    Consumer, ConsumerConfig, ErrorCode, Failure, HealthChecker, ImageResult, Notice, Processed,
    ProgressTracker, ResultOutcome, StreamMessage as _, Valkey, ValkeyConfig, acl::User, keys,
};
use follow_testkit::{PostgresServer, ValkeyCluster, ValkeyServer, setting};
use futures_util::StreamExt as _;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TARGET_PER_SEC: f64 = 5_000.0;
const PARTITIONS: keys::Partitions = keys::Partitions::new_const(1);

#[tokio::main]
async fn main() {
    let results = setting("FOLLOW_BENCH_RESULTS", 20_000);
    let rate_per_sec = setting("FOLLOW_BENCH_RATE", 2_000);
    let steady_secs = setting("FOLLOW_BENCH_STEADY_SECS", 10);
    let (pg, valkey_server) = tokio::join!(PostgresServer::start_durable(), ValkeyServer::start());
    let (pg, valkey_server) = (pg.unwrap(), valkey_server.unwrap());
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    let mut durability = Vec::new();
    for name in ["fsync", "synchronous_commit", "full_page_writes"] {
        let value: String = sqlx::query_scalar("SELECT current_setting($1)")
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(value, "on", "{name} must be on for a durable figure");
        durability.push(format!("{name}={value}"));
    }
    MIGRATOR.run(&pool).await.unwrap();
    // One partition: one consumer, as one API instance on one stream.
    let valkey = Valkey::new(ValkeyConfig {
        partitions: PARTITIONS,
        ..ValkeyConfig::new(valkey_server.url_as(User::Api))
    })
    .unwrap();

    println!("follow-api result applying, one API consumer");
    println!(
        "conditions: PostgreSQL {} (as the server says), {} cores shared by PostgreSQL, Valkey and the bench; \
         production applier (announcements + metrics); routes of 1-10 waypoints, 1 in 10 results \
         failed, 1 in 20 delivered twice",
        durability.join(" "),
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!("drain: {results} images' results pre-filled (with the duplicates), then applied");
    let commits = one_row_commits(&pool, 2_000).await;
    println!("  plain one-row commits (PostgreSQL)      {commits:>10.0} /s");
    let entries = prepare(&pool, results).await;
    let xadd = add_all(&valkey_server, &entries).await;
    println!("  raw pipelined XADD (Valkey)             {xadd:>10.0} /s");
    let batched = drain(&valkey, &pool, 64, entries.len()).await;
    println!("  applied, batches of up to 64            {batched:>10.0} /s");
    let entries = prepare(&pool, results).await;
    add_all(&valkey_server, &entries).await;
    let single = drain(&valkey, &pool, 1, entries.len()).await;
    println!("  applied, one result per transaction     {single:>10.0} /s");
    println!("ratios:");
    println!(
        "  batched / unbatched                     {:>10.2}x",
        batched / single
    );
    println!(
        "  batched / plain one-row commits         {:>10.2}x",
        batched / commits
    );
    println!(
        "  batched / raw XADD                      {:>10.3}x",
        batched / xadd
    );
    println!(
        "target: >= {TARGET_PER_SEC:.0} results/s applied with batching: {}",
        if batched >= TARGET_PER_SEC {
            "met"
        } else {
            "NOT met"
        }
    );
    let latencies = steady(&valkey_server, &valkey, &pool, rate_per_sec, steady_secs).await;
    println!(
        "steady state: {rate_per_sec} results/s for {steady_secs} s, batches of up to 64; \
         sent (XADD) -> commit announcement received ({} results):",
        latencies.len()
    );
    let ms = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "  p50 {:.1} ms   p99 {:.1} ms   max {:.1} ms",
        ms(0.5),
        ms(0.99),
        ms(1.0)
    );
    cluster_scaling(&pool, results).await;
}

/// Commits of one single-row UPDATE each, sequentially: the floor a per-result transaction
/// can reach on this database.
async fn one_row_commits(pool: &PgPool, n: usize) -> f64 {
    sqlx::query("CREATE TABLE bench_commit (id int PRIMARY KEY, n bigint NOT NULL)")
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO bench_commit VALUES (1, 0)")
        .execute(pool)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..n {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE bench_commit SET n = n + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    rate(n, started.elapsed())
}

/// Inserts `n` pending images in routes of 1–10 waypoints; returns the results to send for them,
/// in order: one in 10 a failure, one in 20 twice.
async fn prepare(pool: &PgPool, n: usize) -> Vec<ImageResult> {
    let mut sent = Vec::with_capacity(n + n / 20);
    let mut made = 0;
    let mut tx = pool.begin().await.unwrap();
    for route_number in 0.. {
        if made == n {
            break;
        }
        let count = (route_number % 10 + 1).min(n - made);
        let route = Uuid::now_v7();
        let waypoints: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        let images: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        sqlx::query("INSERT INTO route.routes (id, owner, name, request_id) VALUES ($1, 'bench', '', $1::text)")
            .bind(route)
            .execute(&mut *tx)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO route.waypoints (id, route_id, position, marker_x, marker_y, current_image_id)
             SELECT w, $2, p - 1, 0.5, 0.5, i FROM unnest($1::uuid[], $3::uuid[]) WITH ORDINALITY AS t(w, i, p)",
        )
        .bind(&waypoints)
        .bind(route)
        .bind(&images)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO image.images (id, route_id, waypoint_id, content_type, declared_size, storage_key, expires_at)
             SELECT i, $2, w, 'image/jpeg', 1000, i::text, now() + interval '1 hour'
             FROM unnest($1::uuid[], $3::uuid[]) AS t(i, w)",
        )
        .bind(&images)
        .bind(route)
        .bind(&waypoints)
        .execute(&mut *tx)
        .await
        .unwrap();
        for id in images {
            let result = result(id, made);
            if made % 20 == 19 {
                sent.push(result.clone());
            }
            sent.push(result);
            made += 1;
        }
        if route_number % 500 == 499 {
            tx.commit().await.unwrap();
            tx = pool.begin().await.unwrap();
        }
    }
    tx.commit().await.unwrap();
    sent
}

/// XADDs `results`, pipelined; returns the rate.
async fn add_all(server: &ValkeyServer, results: &[ImageResult]) -> f64 {
    let mut conn = server.connection().await;
    let started = Instant::now();
    for chunk in results.chunks(256) {
        let mut pipe = redis::pipe();
        for result in chunk {
            pipe.add_command(xadd(result)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    rate(results.len(), started.elapsed())
}

fn xadd(result: &ImageResult) -> redis::Cmd {
    xadd_to(
        &keys::RESULTS.stream(PARTITIONS.of(result.image_id)),
        result,
    )
}

fn xadd_to(stream: &str, result: &ImageResult) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in result.to_fields() {
        cmd.arg(name).arg(value);
    }
    cmd
}

/// The `index`-th result: processed, or (one in 10) failed.
fn result(image_id: Uuid, index: usize) -> ImageResult {
    let outcome = if index % 10 == 9 {
        ResultOutcome::Failed(Failure {
            code: ErrorCode::InvalidImage,
            message: "not an image".into(),
        })
    } else {
        ResultOutcome::Processed(Processed {
            storage_key: image_id.to_string(),
            preview_key: format!("{image_id}.preview"),
            sha256: "ab".repeat(32),
            content_type: "image/jpeg".into(),
            width: 4000,
            height: 3000,
            processed_width: 2048,
            processed_height: 1536,
            byte_size: 500_000,
            thumbhash: vec![0x1f, 0x08, 0x0a],
            files: Vec::new(),
            stripped_metadata: Vec::new(),
        })
    };
    ImageResult {
        image_id,
        outcome,
        produced_at: time::OffsetDateTime::now_utc(),
        processing_ms: 300,
    }
}

/// The production applier: announcements through the API's Valkey user, metrics registered.
fn applier(valkey: &Valkey, pool: &PgPool) -> ResultApplier {
    let mut registry = prometheus_client::registry::Registry::default();
    ResultApplier::new(pool.clone())
        .with_announcer(ProgressTracker::new(valkey).unwrap())
        .with_metrics(Arc::new(Metrics::register(&mut registry)))
}

/// Runs one consumer with the applier (batch size `batch`) until `stop`; returns its task.
fn consume(
    valkey: &Valkey,
    pool: &PgPool,
    batch: usize,
    stop: &CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let config = ConsumerConfig {
        batch_size: batch,
        block: Duration::from_millis(100),
        ..ConsumerConfig::new(keys::RESULTS, format!("bench-{batch}"))
    };
    let mut consumer = Consumer::new(valkey, config).unwrap();
    let mut applier = applier(valkey, pool);
    let stop = stop.clone();
    tokio::spawn(async move {
        consumer.ensure_group().await.unwrap();
        consumer.run(&mut applier, stop).await;
    })
}

/// Waits until the group has taken and acknowledged everything on the stream.
async fn drained(health: &mut HealthChecker) {
    loop {
        let info = health.queue_info(keys::RESULTS).await.unwrap();
        if info.is_some_and(|i| i.pending == 0 && i.lag == Some(0)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Applies the `entries` the stream holds beyond what was applied before, with one consumer;
/// returns the rate.
async fn drain(valkey: &Valkey, pool: &PgPool, batch: usize, entries: usize) -> f64 {
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = consume(valkey, pool, batch, &stop);
    drained(&mut HealthChecker::new(valkey, Some(keys::RESULTS)).unwrap()).await;
    let elapsed = started.elapsed();
    stop.cancel();
    running.await.unwrap();
    rate(entries, elapsed)
}

/// Sends results at `per_sec` for `secs` while one consumer applies them; returns the sorted
/// latencies from `produced_at` to the commit announcement's arrival.
async fn steady(
    server: &ValkeyServer,
    valkey: &Valkey,
    pool: &PgPool,
    per_sec: usize,
    secs: usize,
) -> Vec<Duration> {
    let results = prepare(pool, per_sec * secs).await;
    let mut pubsub = redis::Client::open(server.url())
        .unwrap()
        .get_async_pubsub()
        .await
        .unwrap();
    pubsub.psubscribe(keys::PROGRESS_PATTERN).await.unwrap();
    let arrivals = tokio::spawn(async move {
        let mut first = HashMap::new();
        let mut messages = pubsub.on_message();
        while let Ok(Some(message)) =
            tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        {
            if let Ok(notice) = Notice::decode(message.get_payload_bytes()) {
                first
                    .entry(notice.image_id())
                    .or_insert_with(SystemTime::now);
            }
        }
        first
    });
    let stop = CancellationToken::new();
    let running = consume(valkey, pool, 64, &stop);
    let mut conn = server.connection().await;
    let mut produced = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = per_sec.div_ceil(100);
    for chunk in results.chunks(per_tick) {
        tick.tick().await;
        let mut pipe = redis::pipe();
        for result in chunk {
            let mut result = result.clone();
            result.produced_at = time::OffsetDateTime::now_utc();
            produced
                .entry(result.image_id)
                .or_insert_with(SystemTime::now);
            pipe.add_command(xadd(&result)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    drained(&mut HealthChecker::new(valkey, Some(keys::RESULTS)).unwrap()).await;
    stop.cancel();
    running.await.unwrap();
    let arrived = arrivals.await.unwrap();
    let mut latencies: Vec<Duration> = produced
        .iter()
        .filter_map(|(id, at)| arrived.get(id)?.duration_since(*at).ok())
        .collect();
    assert_eq!(
        latencies.len(),
        produced.len(),
        "every commit was announced"
    );
    latencies.sort();
    latencies
}

/// The same drain on a Valkey Cluster (3 primaries + 3 replicas, the default partitions) by 1,
/// 2 and 3 API instances, each as the API runs: its own connections, a consumer per partition,
/// its own applier. The instances run in this process (they share nothing but its cores).
async fn cluster_scaling(pool: &PgPool, results: usize) {
    let cluster = ValkeyCluster::start().await.unwrap();
    let partitions = keys::Partitions::DEFAULT;
    let mut admin = cluster.connection().await;
    println!(
        "cluster: {results} images' results pre-filled on a Valkey Cluster of 3 primaries + 3 \
         replicas ({partitions} partitions), then applied by N API instances (batches of up to \
         64, one consumer per partition each)"
    );
    println!(
        "  {:<12} {:>12} {:>14} {:>16} {:>18}",
        "instances", "applied /s", "machine busy", "fsyncs /s (WAL)", "Valkey cmds /batch"
    );
    let (mut first, mut last) = (0.0, 0.0);
    for instances in 1..=3 {
        let entries = prepare(pool, results).await;
        for (partition, chunk) in by_partition(partitions, &entries) {
            for part in chunk.chunks(256) {
                let mut pipe = redis::pipe();
                for result in part {
                    pipe.add_command(xadd_to(&keys::RESULTS.stream(partition), result))
                        .ignore();
                }
                pipe.query_async::<()>(&mut admin).await.unwrap();
            }
        }
        let (cpu, syncs, commands) = (
            machine_cpu(),
            wal_syncs(pool).await,
            cluster_commands(&cluster).await,
        );
        let stop = CancellationToken::new();
        let started = Instant::now();
        let mut running = Vec::new();
        let mut valkeys = Vec::new();
        for instance in 0..instances {
            let valkey = Valkey::new(ValkeyConfig {
                partitions,
                ..ValkeyConfig::new(cluster.urls_as(User::Api))
            })
            .unwrap();
            for partition in partitions.all() {
                let config = ConsumerConfig {
                    batch_size: 64,
                    block: Duration::from_millis(100),
                    ..ConsumerConfig::new(keys::RESULTS, format!("bench-{instance}"))
                }
                .on(partition);
                let mut consumer = Consumer::new(&valkey, config).unwrap();
                let mut applier = applier(&valkey, pool);
                let stop = stop.clone();
                running.push(tokio::spawn(async move {
                    consumer.ensure_group().await.unwrap();
                    consumer.run(&mut applier, stop).await;
                }));
            }
            valkeys.push(valkey);
        }
        drained(&mut HealthChecker::new(&valkeys[0], Some(keys::RESULTS)).unwrap()).await;
        let elapsed = started.elapsed();
        let applied = rate(entries.len(), elapsed);
        let busy = (machine_cpu() - cpu) / elapsed.as_secs_f64() / cores() as f64;
        let syncs = (wal_syncs(pool).await - syncs) as f64 / elapsed.as_secs_f64();
        let per_batch =
            (cluster_commands(&cluster).await - commands) as f64 / (entries.len() as f64 / 64.0);
        stop.cancel();
        for task in running {
            task.await.unwrap();
        }
        if instances == 1 {
            first = applied;
        }
        last = applied;
        println!(
            "  {instances:<12} {applied:>12.0} {:>13.0}% {syncs:>16.0} {per_batch:>18.1}",
            busy * 100.0
        );
    }
    println!(
        "  factor 3 / 1 instances: {:.2}x (the bound: the machine's {} cores when they are busy \
         near 100%, else PostgreSQL's fsyncs)",
        last / first,
        cores()
    );
}

/// The entries of each partition, in order.
fn by_partition(
    partitions: keys::Partitions,
    entries: &[ImageResult],
) -> BTreeMap<keys::Partition, Vec<&ImageResult>> {
    let mut by = BTreeMap::<_, Vec<_>>::new();
    for entry in entries {
        by.entry(partitions.of(entry.image_id))
            .or_default()
            .push(entry);
    }
    by
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// CPU seconds the whole machine has spent busy (`/proc/stat`, all but idle and iowait).
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    let busy: f64 =
        ticks.iter().sum::<f64>() - ticks.get(3).unwrap_or(&0.0) - ticks.get(4).unwrap_or(&0.0);
    busy / 100.0
}

/// WAL syncs PostgreSQL has made (`pg_stat_wal`).
async fn wal_syncs(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT wal_sync FROM pg_stat_wal")
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Commands the cluster's nodes have processed.
async fn cluster_commands(cluster: &ValkeyCluster) -> u64 {
    let mut total = 0;
    // The first three are the primaries (nothing fails over here); replicas only apply writes.
    for node in &cluster.nodes()[..3] {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut node.connection().await)
            .await
            .unwrap_or_default();
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("total_commands_processed:"))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}
