//! The gateway as operators and watchers see it: Valkey going away mid-run (no new uploads,
//! in-flight results kept and published after it returns), health over HTTP and gRPC, and
//! `WatchUpload` over native gRPC and grpc-web.
#![allow(clippy::unwrap_used)]

mod common;

use common::{Gateway, OPS_TOKEN, WITHIN, bearer, jpeg};
use follow_bus::ResultOutcome;
use follow_proto::{
    events::v1::Stage,
    gateway::v1::{WatchUploadRequest, gateway_service_client::GatewayServiceClient},
    tonic::{Code, Request},
};
use follow_testkit::eventually_async;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn get(gw: &Gateway, path: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(format!("{}{path}", gw.url())).await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or_default())
}

async fn grpc_health(gw: &Gateway) -> ServingStatus {
    let channel = gw.channel().await;
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "follow.gateway.v1.GatewayService".into(),
        })
        .await
        // Before the first health report the service is not registered yet.
        .map_or(ServingStatus::ServiceUnknown, |r| r.into_inner().status())
}

#[tokio::test]
async fn with_valkey_down_new_uploads_get_503_and_in_flight_results_arrive_after_it_returns() {
    let mut gw = Gateway::start().await;
    // Ready once the progress hub has its pub/sub connection, a moment after start.
    let health = eventually_async(WITHIN, "healthy", || async {
        let (status, health) = get(&gw, "/health").await;
        (status == 200).then_some(health)
    })
    .await;
    assert_eq!(
        (
            health["valkey"].as_str(),
            health["progress_hub"].as_str(),
            health["storage"].as_str()
        ),
        (Some("ok"), Some("ok"), Some("ok"))
    );
    eventually_async(WITHIN, "grpc serving", || async {
        (grpc_health(&gw).await == ServingStatus::Serving).then_some(())
    })
    .await;

    // An upload in flight: the guard is taken and half the body is in when Valkey goes away.
    let (image_id, token) = gw.token("image/jpeg", 10_000_000);
    let body = jpeg(1200, 800);
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT /upload?token={token} HTTP/1.1\r\nhost: x\r\ncontent-type: image/jpeg\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..body.len() / 2]).await.unwrap();
    let conn = gw.valkey_server.connection().await;
    eventually_async(WITHIN, "the guard taken", || {
        let mut conn = conn.clone();
        async move {
            redis::AsyncCommands::exists::<_, bool>(
                &mut conn,
                follow_bus::keys::Partitions::DEFAULT.upload_guard(image_id),
            )
            .await
            .ok()
            .filter(|e| *e)
        }
    })
    .await;
    gw.valkey_server.stop().await;
    stream.write_all(&body[body.len() / 2..]).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WITHIN, stream.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 202"));

    // New uploads: 503 with Retry-After; health says so.
    let (_, other) = gw.token("image/jpeg", 10_000_000);
    let response = reqwest::Client::new()
        .put(format!("{}/upload?token={other}", gw.url()))
        .header("content-type", "image/jpeg")
        .body(jpeg(32, 32))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let (status, health) = get(&gw, "/health").await;
    assert_eq!((status, health["valkey"].as_str()), (503, Some("down")));
    eventually_async(WITHIN, "grpc not serving", || async {
        (grpc_health(&gw).await == ServingStatus::NotServing).then_some(())
    })
    .await;

    // The in-flight upload's original is in S3 although its job could not be queued. Valkey
    // comes back empty: the job is queued again (as the API's reconciler does) and processed.
    assert!(
        gw.exists(&follow_service::objects::original_key(
            &gw.storage_key(image_id)
        ))
        .await
    );
    gw.valkey_server.restart().await.unwrap();
    let job = follow_bus::Job {
        image_id,
        storage_key: gw.storage_key(image_id),
        content_type: "image/jpeg".into(),
        owner: "alice".into(),
        accepted_at: time::OffsetDateTime::now_utc(),
        sha256: None,
    };
    eventually_async(WITHIN, "the job queued again", || async {
        let mut producer = follow_bus::Producer::new(&gw.valkey).unwrap();
        producer
            .enqueue(&job, std::time::Duration::from_secs(60))
            .await
            .ok()
    })
    .await;
    let result = gw.result(image_id).await;
    assert!(
        matches!(result.outcome, ResultOutcome::Processed(_)),
        "{result:?}"
    );
    eventually_async(WITHIN, "healthy again", || async {
        (get(&gw, "/health").await.0 == 200).then_some(())
    })
    .await;
    // A 503 leaves the token usable: the client retries (a first command on a connection that
    // Valkey dropped may fail once more).
    let (_, again) = gw.token("image/jpeg", 10_000_000);
    eventually_async(WITHIN, "uploads accepted again", || async {
        (gw.put(&again, "image/jpeg", jpeg(32, 32)).await.0 == 202).then_some(())
    })
    .await;
    gw.stop().await;
}

#[tokio::test]
async fn watch_upload_streams_every_stage_over_grpc_and_grpc_web() {
    use hyper_util::{client::legacy::Client, rt::TokioExecutor};
    let gw = Gateway::start().await;
    let authorized = |token: &str| bearer(WatchUploadRequest {}, token);
    let (_, token) = gw.token("image/jpeg", 10_000_000);
    let channel = gw.channel().await;
    let mut native = GatewayServiceClient::new(channel);
    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let web = tower::ServiceBuilder::new()
        .layer(tonic_web::GrpcWebClientLayer::new())
        .service(http1);
    let mut web = GatewayServiceClient::with_origin(web, gw.url().parse().unwrap());

    let mut a = native
        .watch_upload(authorized(&token))
        .await
        .unwrap()
        .into_inner();
    let mut b = web
        .watch_upload(authorized(&token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(gw.put(&token, "image/jpeg", jpeg(900, 600)).await.0, 202);
    for stream in [&mut a, &mut b] {
        let mut stages = Vec::new();
        while let Some(message) = tokio::time::timeout(WITHIN, stream.message())
            .await
            .unwrap()
            .unwrap()
        {
            stages.push(message.status.unwrap().stage());
        }
        let mut sorted = stages.clone();
        sorted.sort_by_key(|s| *s as i32);
        sorted.dedup();
        assert_eq!(stages, sorted, "in order, never twice");
        assert_eq!(stages.last(), Some(&Stage::Done), "{stages:?}");
    }
    let status = native
        .watch_upload(authorized("garbage"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn upload_status_pipeline_stats_and_metrics_tell_what_happened() {
    let gw = Gateway::start().await;
    let channel = gw.channel().await;
    let mut client = GatewayServiceClient::new(channel);
    let (image_id, token) = gw.token("image/jpeg", 10_000_000);
    assert_eq!(gw.put(&token, "image/jpeg", jpeg(300, 200)).await.0, 202);
    gw.result(image_id).await;
    let (bad_id, bad) = gw.token("image/png", 10_000_000);
    assert_eq!(gw.put(&bad, "image/png", jpeg(30, 20)).await.0, 415);
    gw.result(bad_id).await;

    let request = bearer(
        follow_proto::gateway::v1::GetUploadStatusRequest {
            image_id: image_id.to_string(),
        },
        &token,
    );
    let status = client
        .get_upload_status(request)
        .await
        .unwrap()
        .into_inner()
        .status
        .unwrap();
    assert_eq!(
        (status.image_id.clone(), status.stage()),
        (image_id.to_string(), Stage::Done)
    );
    // Another upload's token does not show this one.
    let request = bearer(
        follow_proto::gateway::v1::GetUploadStatusRequest {
            image_id: image_id.to_string(),
        },
        &bad,
    );
    assert_eq!(
        client.get_upload_status(request).await.unwrap_err().code(),
        Code::NotFound
    );

    // Pipeline stats are for operators: the ops token, not an upload token, not nothing.
    let stats_as = |token: Option<&str>| {
        let stats = follow_proto::gateway::v1::GetPipelineStatsRequest {};
        let request = match token {
            Some(token) => bearer(stats, token),
            None => Request::new(stats),
        };
        let mut client = client.clone();
        async move { client.get_pipeline_stats(request).await }
    };
    for token in [None, Some(bad.as_str()), Some("ops-token-of-the-test")] {
        assert_eq!(
            stats_as(token).await.unwrap_err().code(),
            Code::Unauthenticated
        );
    }
    let stats = stats_as(Some(OPS_TOKEN)).await.unwrap().into_inner();
    assert_eq!((stats.processed, stats.failed, stats.in_flight), (1, 1, 0));
    assert_eq!(stats.failed_by_error_code.len(), 1);
    assert_eq!(
        (stats.queued, stats.jobs_in_progress, stats.jobs_dead),
        (0, 0, 0)
    );
    assert_eq!(stats.oldest_job_age.unwrap_or_default().seconds, 0);
    let metrics = reqwest::get(format!("{}/metrics", gw.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        "follow_gateway_uploads_total",
        "follow_gateway_stage_seconds",
        "follow_gateway_images_failed_total",
        "follow_gateway_images_processed_total",
        "follow_gateway_jobs_waiting",
        "follow_gateway_jobs_in_progress",
        "follow_gateway_jobs_dead",
        "follow_gateway_jobs_oldest_seconds",
        "follow_gateway_jobs_retried_total",
        "follow_gateway_jobs_reclaimed_total",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}
