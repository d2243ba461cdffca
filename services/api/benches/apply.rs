//! `./dev bench api`: how fast one API process applies results from a pre-filled
//! `image:result`, with batching on and off, beside the raw pipelined XADD rate on the same
//! Valkey and a plain one-row-commit rate on the same PostgreSQL, printed as ratios.
//!
//! PostgreSQL runs durable here (`fsync`, `synchronous_commit` on), as in production; the
//! figures are taken in one run on one machine, so the ratios are what to compare.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use follow_api::{MIGRATOR, results::ResultApplier};
use follow_bus::{
    Consumer, ConsumerConfig, HealthChecker, ImageResult, Processed, ResultOutcome,
    StreamMessage as _, Valkey, ValkeyConfig, keys,
};
use follow_testkit::{PostgresServer, ValkeyServer};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const RESULTS: usize = 20_000;
const TARGET_PER_SEC: f64 = 5_000.0;

#[tokio::main]
async fn main() {
    let results = std::env::var("FOLLOW_BENCH_RESULTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(RESULTS);
    let (pg, valkey_server) = tokio::join!(PostgresServer::start(), ValkeyServer::start());
    let (pg, valkey_server) = (pg.unwrap(), valkey_server.unwrap());
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    for setting in [
        "ALTER SYSTEM SET fsync = on",
        "ALTER SYSTEM SET synchronous_commit = on",
        "ALTER SYSTEM SET full_page_writes = on",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(setting).execute(&pool).await.unwrap();
    }
    pool.close().await;
    let pool = PgPool::connect(&pg.url()).await.unwrap();
    MIGRATOR.run(&pool).await.unwrap();
    let valkey = Valkey::new(ValkeyConfig::new(valkey_server.url())).unwrap();

    println!(
        "follow-api result applying: {results} results per run, 2 cores shared, durable PostgreSQL"
    );
    let commits = one_row_commits(&pool, 2_000).await;
    println!("  plain one-row commits (PostgreSQL)      {commits:>10.0} /s");
    let xadd = fill(&valkey_server, &pool, results).await;
    println!("  raw pipelined XADD (Valkey)             {xadd:>10.0} /s");
    let batched = apply(&valkey, &pool, 64).await;
    println!("  applied, batches of up to 64            {batched:>10.0} /s");
    fill(&valkey_server, &pool, results).await;
    let single = apply(&valkey, &pool, 1).await;
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

/// Inserts `n` pending images (in routes of 100 waypoints) and XADDs one processed result for
/// each, pipelined; returns the XADD rate.
async fn fill(server: &ValkeyServer, pool: &PgPool, n: usize) -> f64 {
    let mut ids = Vec::with_capacity(n);
    for chunk in 0..n.div_ceil(100) {
        let count = (n - chunk * 100).min(100);
        let route = Uuid::now_v7();
        let waypoints: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        let images: Vec<Uuid> = (0..count).map(|_| Uuid::now_v7()).collect();
        let mut tx = pool.begin().await.unwrap();
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
        tx.commit().await.unwrap();
        ids.extend(images);
    }
    let mut conn = server.connection().await;
    let started = Instant::now();
    for chunk in ids.chunks(256) {
        let mut pipe = redis::pipe();
        for id in chunk {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(keys::RESULT_STREAM).arg("*");
            for (name, value) in result(*id).to_fields() {
                cmd.arg(name).arg(value);
            }
            pipe.add_command(cmd).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.unwrap();
    }
    rate(n, started.elapsed())
}

fn result(image_id: Uuid) -> ImageResult {
    ImageResult {
        image_id,
        outcome: ResultOutcome::Processed(Processed {
            storage_key: image_id.to_string(),
            preview_key: format!("{image_id}.preview"),
            sha256: "ab".repeat(32),
            content_type: "image/jpeg".into(),
            width: 4000,
            height: 3000,
            processed_width: 2048,
            processed_height: 1536,
            byte_size: 500_000,
        }),
        produced_at: time::OffsetDateTime::now_utc(),
        processing_ms: 300,
    }
}

/// Runs one consumer with the applier (batch size `batch`) until the group has nothing left.
async fn apply(valkey: &Valkey, pool: &PgPool, batch: usize) -> f64 {
    let mut health = HealthChecker::new(valkey, Some(keys::RESULTS)).unwrap();
    let config = ConsumerConfig {
        batch_size: batch,
        block: Duration::from_millis(100),
        ..ConsumerConfig::new(keys::RESULTS, format!("bench-{batch}"))
    };
    let mut consumer = Consumer::new(valkey, config).unwrap();
    consumer.ensure_group().await.unwrap();
    let backlog = health
        .queue_info(keys::RESULTS)
        .await
        .unwrap()
        .and_then(|g| g.lag)
        .unwrap();
    let cancel = CancellationToken::new();
    let applier = ResultApplier::new(pool.clone());
    let started = Instant::now();
    let running = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let mut applier = applier;
            consumer.run(&mut applier, cancel).await;
        }
    });
    loop {
        let info = health.queue_info(keys::RESULTS).await.unwrap().unwrap();
        if info.pending == 0 && info.lag == Some(0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let elapsed = started.elapsed();
    cancel.cancel();
    running.await.unwrap();
    rate(usize::try_from(backlog).unwrap(), elapsed)
}

fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}
