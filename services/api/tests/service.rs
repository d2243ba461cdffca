//! The running service as an operator sees it: health (HTTP and gRPC), metrics, and the result
//! consumer under faults — poison entries, duplicates, a restart with unacknowledged entries,
//! PostgreSQL down while results arrive.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{
    failed_outcome, processed_for, result,
    stack::{Stack, route_request},
};
use follow_bus::{ErrorCode, keys};
use follow_testkit::eventually_async;
use redis::AsyncCommands;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use uuid::Uuid;

const WITHIN: Duration = Duration::from_secs(30);

async fn pending_images(stack: &Stack, n: usize) -> Vec<Uuid> {
    let request = route_request(n);
    let created = stack
        .routes()
        .await
        .create_route_with_waypoints(stack.as_user("ops", request))
        .await
        .unwrap()
        .into_inner();
    created
        .upload_targets
        .iter()
        .map(|t| t.image_id.parse().unwrap())
        .collect()
}

async fn image_status(stack: &Stack, id: Uuid) -> String {
    sqlx::query_scalar("SELECT status::text FROM image.images WHERE id = $1")
        .bind(id)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

async fn grpc_health(stack: &Stack) -> ServingStatus {
    HealthClient::new(stack.channel().await)
        .check(HealthCheckRequest {
            service: "follow.api.v1.RouteService".into(),
        })
        .await
        // Before the first health report the service is not registered yet.
        .map_or(ServingStatus::ServiceUnknown, |r| r.into_inner().status())
}

/// The services' partitions (the default).
const PARTITIONS: keys::Partitions = keys::Partitions::DEFAULT;

/// Entries in the results' dead streams.
async fn dead_entries(valkey: &mut redis::aio::MultiplexedConnection) -> u64 {
    let mut dead = 0;
    for partition in PARTITIONS.all() {
        dead += valkey
            .xlen::<_, u64>(keys::RESULTS.dead(partition))
            .await
            .unwrap();
    }
    dead
}

/// Waits until `api-workers` has nothing pending on any partition.
async fn drained(valkey: &redis::aio::MultiplexedConnection) {
    eventually_async(WITHIN, "the group drained", || {
        let mut valkey = valkey.clone();
        async move {
            for partition in PARTITIONS.all() {
                let pending: redis::streams::StreamPendingReply = valkey
                    .xpending(keys::RESULTS.stream(partition), keys::RESULTS.group)
                    .await
                    .unwrap();
                if pending.count() > 0 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
}

#[tokio::test]
async fn health_follows_valkey_over_http_and_grpc_and_metrics_are_exposed() {
    let mut stack = Stack::start().await;
    // Ready once the progress hub has its pub/sub connection, a moment after start.
    let body = eventually_async(WITHIN, "healthy", || async {
        let (code, body) = stack.get("/health").await;
        (code == 200).then_some(body)
    })
    .await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (
            health["valkey"].as_str(),
            health["progress_hub"].as_str(),
            health["postgres"].as_str()
        ),
        (Some("ok"), Some("ok"), Some("ok"))
    );
    eventually_async(WITHIN, "grpc serving", || async {
        (grpc_health(&stack).await == ServingStatus::Serving).then_some(())
    })
    .await;

    stack.valkey_server.stop().await;
    let (code, body) = stack.get("/health").await;
    assert_eq!(code, 503);
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (health["valkey"].as_str(), health["postgres"].as_str()),
        (Some("down"), Some("ok"))
    );
    eventually_async(WITHIN, "grpc not serving", || async {
        (grpc_health(&stack).await == ServingStatus::NotServing).then_some(())
    })
    .await;

    stack.valkey_server.restart().await.unwrap();
    eventually_async(WITHIN, "healthy again", || async {
        (stack.get("/health").await.0 == 200).then_some(())
    })
    .await;
    eventually_async(WITHIN, "grpc serving again", || async {
        (grpc_health(&stack).await == ServingStatus::Serving).then_some(())
    })
    .await;

    let (code, metrics) = stack.get("/metrics").await;
    assert_eq!(code, 200);
    for name in [
        "follow_api_results_waiting",
        "follow_api_results_in_progress",
        "follow_api_result_apply_seconds",
        "follow_api_results_dead_lettered",
        "follow_api_results_dead",
        "follow_api_results_oldest_dead_seconds",
        "follow_api_watchers_active",
        "follow_api_heap_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    // One connection for every command of the process, one for each partition's result
    // consumer's blocking reads, one for the progress hub's subscription.
    let connections = 2 + PARTITIONS.count();
    assert!(
        metrics.contains(&format!("\nfollow_api_valkey_connections {connections}\n")),
        "{metrics}"
    );
}

#[tokio::test]
async fn poison_goes_to_the_dead_stream_and_duplicates_apply_once() {
    let stack = Stack::start().await;
    let images = pending_images(&stack, 2).await;
    let mut valkey = stack.valkey_server.connection().await;
    // Poison: no status, and garbage bytes.
    let _: String = redis::cmd("XADD")
        .arg(keys::RESULTS.stream(PARTITIONS.of(images[0])))
        .arg("*")
        .arg("image_id")
        .arg(images[0].to_string())
        .arg("junk")
        .arg(b"\xff\xfe".as_slice())
        .query_async(&mut valkey)
        .await
        .unwrap();
    let mut producer = stack.producer();
    for _ in 0..3 {
        producer
            .publish(&processed_for(&stack.pool, images[1]).await)
            .await
            .unwrap();
    }
    producer
        .publish(&result(images[1], failed_outcome(ErrorCode::Internal)))
        .await
        .unwrap();
    eventually_async(WITHIN, "poison dead-lettered", || {
        let mut valkey = valkey.clone();
        async move { (dead_entries(&mut valkey).await == 1).then_some(()) }
    })
    .await;
    drained(&valkey).await;
    assert_eq!(
        image_status(&stack, images[0]).await,
        "PENDING",
        "poison changed nothing"
    );
    assert_eq!(
        image_status(&stack, images[1]).await,
        "PROCESSED",
        "the first result won, once"
    );
}

#[tokio::test]
async fn entries_read_but_not_acknowledged_before_a_restart_are_applied_after_it() {
    let mut stack = Stack::start().await;
    let images = pending_images(&stack, 1).await;
    stack.stop().await;
    stack
        .producer()
        .publish(&processed_for(&stack.pool, images[0]).await)
        .await
        .unwrap();
    // The stopped instance's consumer had read the entry and died before acknowledging it.
    let mut valkey = stack.valkey_server.connection().await;
    let read: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(keys::RESULTS.group)
        .arg("api-test")
        .arg("STREAMS")
        .arg(keys::RESULTS.stream(PARTITIONS.of(images[0])))
        .arg(">")
        .query_async(&mut valkey)
        .await
        .unwrap();
    assert!(
        matches!(read, redis::Value::Array(ref a) if !a.is_empty()),
        "{read:?}"
    );
    stack.restart().await;
    eventually_async(WITHIN, "applied after restart", || async {
        (image_status(&stack, images[0]).await == "PROCESSED").then_some(())
    })
    .await;
    drained(&valkey).await;
}

#[tokio::test]
async fn while_postgres_is_down_results_wait_and_are_applied_after_it_returns() {
    let mut stack = Stack::start().await;
    let images = pending_images(&stack, 3).await;
    let mut results = Vec::new();
    for id in &images {
        results.push(processed_for(&stack.pool, *id).await);
    }
    stack.pg.stop().await;
    let mut producer = stack.producer();
    for result in &results {
        producer.publish(result).await.unwrap();
    }
    // The consumer retries (visible in its metric) instead of dead-lettering.
    eventually_async(WITHIN, "a retry", || async {
        let (_, metrics) = stack.get("/metrics").await;
        metrics
            .lines()
            .find(|l| l.starts_with("follow_api_results_retried_total "))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .filter(|n| *n > 0)
    })
    .await;
    stack.pg.restart().await.unwrap();
    let pool = sqlx::PgPool::connect(&stack.pg.url()).await.unwrap();
    for id in &images {
        eventually_async(WITHIN, "applied", || {
            let pool = pool.clone();
            async move {
                let status: String =
                    sqlx::query_scalar("SELECT status::text FROM image.images WHERE id = $1")
                        .bind(id)
                        .fetch_one(&pool)
                        .await
                        .ok()?;
                (status == "PROCESSED").then_some(())
            }
        })
        .await;
    }
    let mut valkey = stack.valkey_server.connection().await;
    assert_eq!(
        dead_entries(&mut valkey).await,
        0,
        "an outage never dead-letters"
    );
}

#[tokio::test]
async fn browsers_may_call_from_other_origins_with_grpc_web_headers() {
    let stack = Stack::start().await;
    let response = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/follow.api.v1.RouteService/ListRoutes", stack.url()),
        )
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type,x-grpc-web,x-user-agent",
        )
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(header("access-control-allow-origin"), "*");
    assert!(header("access-control-allow-headers").contains("x-grpc-web"));
    assert!(header("access-control-allow-headers").contains("authorization"));
}
