//! The API and Valkey away: results applied once the API is back, a crash between commit and
//! acknowledgement, Valkey down reported, refused and recovered from.
#![allow(clippy::unwrap_used)]

use follow_e2e::{
    Platform, Service,
    client::{jpeg, upload, upload_accepted},
    observe::{pending_results, results_of},
    user::{User, WAIT},
};
use follow_proto::{
    api::v1::{self as api},
    tonic::Code,
};
use follow_testkit::eventually_async;

/// Results published while the API is down are all applied once it is back.
#[tokio::test]
async fn results_published_while_the_api_is_down_are_applied_after_it_starts() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("spawn or compose mode to stop the API") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user
        .create_route(&platform, &[(0.2, 0.2), (0.8, 0.8)])
        .await;
    let route_id = created.route.as_ref().unwrap().id.clone();
    platform.stop(Service::Api).await.unwrap();
    for target in &created.upload_targets {
        upload_accepted(&target.upload_url, "image/jpeg", jpeg(640, 480)).await;
    }
    for target in &created.upload_targets {
        eventually_async(WAIT, "the gateway's result", || async {
            (!results_of(&platform, &target.image_id).await.is_empty()).then_some(())
        })
        .await;
    }
    platform.start_service(Service::Api, &[]).await.unwrap();
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    eventually_async(WAIT, "an empty pending list", || async {
        (pending_results(&platform).await == 0).then_some(())
    })
    .await;
    user.clean_up(&platform).await;
}

/// The API killed between its commit and its acknowledgement: the entry is delivered again,
/// applied once (the second time it is ignored), and the pending list drains.
#[tokio::test]
async fn a_crash_between_commit_and_ack_redelivers_and_applies_once() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.is_spawned("a failpoint-enabled follow-api") {
        return;
    }
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.4, 0.6)]).await;
    let target = &created.upload_targets[0];
    // Restart the API with the failpoint paused right after the commit.
    platform.stop(Service::Api).await.unwrap();
    platform
        .start_service(
            Service::Api,
            &[("FAILPOINTS", Some("api-results-after-commit=pause"))],
        )
        .await
        .unwrap();
    upload_accepted(&target.upload_url, "image/jpeg", jpeg(640, 480)).await;
    let db = platform.database().await.unwrap();
    // What a redelivery must leave alone: status, the entry that won, and the last update.
    let row = || async {
        let row: (String, Option<String>, String) = sqlx::query_as(
            "SELECT status::text, result_entry_id, updated_at::text FROM image.images WHERE id = $1::uuid",
        )
        .bind(&target.image_id)
        .fetch_one(&db)
        .await
        .unwrap();
        row
    };
    let committed_at = eventually_async(WAIT, "the commit", || async {
        let row = row().await;
        (row.0 == "PROCESSED").then_some(row)
    })
    .await;
    assert_eq!(
        pending_results(&platform).await,
        1,
        "committed but not acknowledged: is follow-api built with the `failpoints` feature? \
         (./dev test builds it so)\n{}",
        platform.log(Service::Api)
    );
    platform.kill(Service::Api).await.unwrap();
    platform
        .start_service(Service::Api, &[("FAILPOINTS", None)])
        .await
        .unwrap();
    eventually_async(WAIT, "the pending list drained", || async {
        (pending_results(&platform).await == 0).then_some(())
    })
    .await;
    let after = row().await;
    assert_eq!(after, committed_at, "the redelivery changed nothing");
    let applied = async |outcome: &str| {
        let name = format!("follow_api_results_applied_total{{outcome=\"{outcome}\"}}");
        platform.metric(&platform.api_url, &name).await.unwrap()
    };
    assert_eq!(
        (applied("ignored").await, applied("processed").await),
        (1.0, 0.0)
    );
    user.clean_up(&platform).await;
}

/// Valkey down: both healths say so, route creation is UNAVAILABLE, uploads get 503; after it
/// returns everything works again.
#[tokio::test]
async fn valkey_down_is_reported_and_refused_and_recovered_from() {
    let mut platform = Platform::start().await.unwrap();
    for url in [&platform.api_url, &platform.gateway_url] {
        let (status, body) = platform.health(url).await.unwrap();
        assert_eq!(
            (status, body["valkey"].as_str()),
            (200, Some("ok")),
            "{url}"
        );
    }
    if !platform.can_control("spawn or compose mode to stop Valkey") {
        return;
    }
    let mut user = User::new(&platform).await;
    let before = user.create_route(&platform, &[(0.3, 0.3)]).await;
    platform.stop(Service::Valkey).await.unwrap();
    for url in [platform.api_url.clone(), platform.gateway_url.clone()] {
        eventually_async(WAIT, "health reporting Valkey down", || async {
            let (status, body) = platform.health(&url).await.ok()?;
            (status == 503 && body["valkey"] != "ok").then_some(())
        })
        .await;
    }
    let refused = user
        .try_create_route(&platform, &[(0.5, 0.5)])
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    let (status, answer) = upload(
        &before.upload_targets[0].upload_url,
        "image/jpeg",
        jpeg(64, 64),
    )
    .await
    .unwrap();
    assert_eq!(status, 503, "{answer}");

    platform.start_service(Service::Valkey, &[]).await.unwrap();
    for url in [platform.api_url.clone(), platform.gateway_url.clone()] {
        eventually_async(WAIT, "health reporting Valkey ok", || async {
            let (status, _) = platform.health(&url).await.ok()?;
            (status == 200).then_some(())
        })
        .await;
    }
    // As a client does: UNAVAILABLE and 503 are retried (the API's breaker lets a probe
    // through within seconds of Valkey's return).
    let after = eventually_async(WAIT, "a route created again", || async {
        match user.try_create_route(&platform, &[(0.6, 0.6)]).await {
            Ok(created) => Some(created),
            Err(status) if status.code() == Code::Unavailable => None,
            Err(status) => panic!("{status:?}"),
        }
    })
    .await;
    user.images
        .extend(after.upload_targets.iter().map(|t| t.image_id.clone()));
    let route_id = after.route.as_ref().unwrap().id.clone();
    let url = &after.upload_targets[0].upload_url;
    let status = eventually_async(WAIT, "an upload accepted again", || async {
        let (status, _) = upload(url, "image/jpeg", jpeg(320, 240)).await.unwrap();
        (status != 503).then_some(status)
    })
    .await;
    assert_eq!(status, 202);
    user.wait_route(&platform, &route_id, api::RouteStatus::Ready)
        .await;
    user.clean_up(&platform).await;
}
