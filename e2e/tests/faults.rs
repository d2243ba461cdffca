//! The API under faults (issue 14), with real processes: READY across three instances, results
//! never discarded for being late, a consumer killed every second, dead letters operators act on
//! with `follow-api dead`, a circuit breaker whose probe is cancelled, and forged results.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use follow_e2e::{
    Platform, Service, binary,
    client::{bearer, jpeg},
    every, keys, observe,
    user::{User, WAIT},
};
use follow_proto::{api::v1 as api, tonic::Code};
use follow_testkit::eventually_async;

/// The storage keys of `user`'s images, as the API assigned them.
async fn storage_keys(platform: &Platform, image_ids: &[String]) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT id::text, storage_key FROM image.images WHERE id::text = ANY($1) ORDER BY id",
    )
    .bind(image_ids)
    .fetch_all(&platform.database().await.unwrap())
    .await
    .unwrap()
}

/// A `processed` result as a gateway writes it (docs/architecture.md, "Stream messages"), naming the
/// objects under `storage_key` (or others', for a forgery).
fn processed_fields(image_id: &str, storage_key: &str) -> Vec<(&'static str, String)> {
    vec![
        ("image_id", image_id.to_owned()),
        ("status", "processed".into()),
        ("schema_version", "1".into()),
        ("storage_key", storage_key.to_owned()),
        ("preview_key", format!("{storage_key}.preview")),
        ("sha256", "ab".repeat(32)),
        ("content_type", "image/jpeg".into()),
        ("width", "4000".into()),
        ("height", "3000".into()),
        ("processed_width", "2048".into()),
        ("processed_height", "1536".into()),
        ("byte_size", "123456".into()),
        ("produced_at", "2026-12-01T10:00:00Z".into()),
        ("processing_ms", "300".into()),
    ]
}

/// Publishes results for `(image, storage key)` pairs, pipelined.
async fn publish(platform: &Platform, images: &[(String, String)]) {
    let mut valkey = platform.valkey().await.unwrap();
    // One pipeline per partition: on a cluster a pipeline stays in one slot.
    let mut by_partition: std::collections::BTreeMap<_, Vec<_>> = Default::default();
    for (id, key) in images {
        let partition = platform.partitions.of(observe::uuid(id));
        by_partition.entry(partition).or_default().push((id, key));
    }
    for (partition, images) in by_partition {
        let stream = keys::RESULTS.stream(partition);
        for chunk in images.chunks(500) {
            let mut pipe = redis::pipe();
            for (id, key) in chunk {
                pipe.xadd(&stream, "*", &processed_fields(id, key)).ignore();
            }
            let _: () = pipe.query_async(&mut valkey).await.unwrap();
        }
    }
}

async fn count(platform: &Platform, sql: &'static str, ids: &[String]) -> i64 {
    sqlx::query_scalar(sql)
        .bind(ids)
        .fetch_one(&platform.database().await.unwrap())
        .await
        .unwrap()
}

async fn dead_letters(platform: &Platform) -> u64 {
    observe::dead_results(platform).await.len() as u64
}

/// `n` routes of `waypoints(i)` waypoints for `user`, created `concurrency` at a time; their
/// images' ids in order.
async fn routes(
    platform: &Platform,
    user: &mut User,
    n: usize,
    waypoints: impl Fn(usize) -> usize,
) -> Vec<Vec<String>> {
    let mut all = Vec::with_capacity(n);
    let plan: Vec<usize> = (0..n).map(waypoints).collect();
    for chunk in plan.chunks(16) {
        let markers: Vec<Vec<(f64, f64)>> = chunk.iter().map(|w| vec![(0.5, 0.5); *w]).collect();
        // As a client should: while the API says UNAVAILABLE ("retry later": its database busy
        // with this burst on shared cores), ask again; any other refusal fails the test.
        let creator: &User = user;
        let created = futures_util::future::join_all(markers.iter().map(|m| {
            eventually_async(WAIT, "the API to take a route", move || async move {
                match creator.try_create_route(platform, m).await {
                    Ok(route) => Some(route),
                    Err(status) if status.code() == Code::Unavailable => None,
                    Err(status) => panic!("route refused: {status:?}"),
                }
            })
        }))
        .await;
        for route in created {
            let ids: Vec<String> = route
                .upload_targets
                .into_iter()
                .map(|t| t.image_id)
                .collect();
            user.images.extend(ids.iter().cloned());
            all.push(ids);
        }
    }
    all
}

#[tokio::test]
async fn three_api_instances_applying_at_once_make_every_one_of_2000_routes_ready() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to start more API instances") {
        return;
    }
    // Small batches: a route's images land in different instances' transactions.
    let small = [("FOLLOW_RESULT_BATCH", "8")];
    platform.add_api(&small).await.unwrap();
    platform.add_api(&small).await.unwrap();
    let mut user = User::new(&platform).await;
    let routes = routes(&platform, &mut user, 2000, |i| 2 + i % 2).await;
    // Interleaved: every route's first waypoint, then every second one, then the thirds.
    let mut order = Vec::new();
    for position in 0..3 {
        order.extend(routes.iter().filter_map(|r| r.get(position).cloned()));
    }
    let keys = storage_keys(&platform, &order).await;
    let by_id: std::collections::HashMap<_, _> = keys.into_iter().collect();
    let images: Vec<(String, String)> = order
        .iter()
        .map(|id| (id.clone(), by_id[id].clone()))
        .collect();
    publish(&platform, &images).await;
    let route_ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT route_id::text FROM image.images WHERE id::text = ANY($1)",
    )
    .bind(&order)
    .fetch_all(&platform.database().await.unwrap())
    .await
    .unwrap();
    assert_eq!(route_ids.len(), 2000);
    eventually_async(WAIT, "every result applied", || async {
        (count(
            &platform,
            "SELECT count(*) FROM image.images WHERE id::text = ANY($1) AND status = 'PROCESSED'",
            &order,
        )
        .await
            == order.len() as i64)
            .then_some(())
    })
    .await;
    let stuck = count(
        &platform,
        "SELECT count(*) FROM route.routes WHERE id::text = ANY($1) AND status <> 'READY'",
        &route_ids,
    )
    .await;
    assert_eq!(stuck, 0, "every route READY, none stuck");
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn results_waiting_while_the_api_was_away_past_expiry_are_all_applied() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to stop the API") {
        return;
    }
    let short = [
        ("FOLLOW_UPLOAD_TOKEN_TTL_SECS", Some("2")),
        ("FOLLOW_EXPIRY_GRACE_SECS", Some("1")),
        ("FOLLOW_RECONCILE_INTERVAL_SECS", Some("1")),
    ];
    platform.stop(Service::Api).await.unwrap();
    platform.start_service(Service::Api, &short).await.unwrap();
    let mut user = User::new(&platform).await;
    let routes = routes(&platform, &mut user, 10, |_| 100).await;
    let ids: Vec<String> = routes.concat();
    let images = storage_keys(&platform, &ids).await;
    platform.stop(Service::Api).await.unwrap();
    publish(&platform, &images).await;
    // Away well past every token's expiry and grace.
    let db = platform.database().await.unwrap();
    eventually_async(WAIT, "the tokens expired", || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT bool_and(expires_at + interval '1 second' < now()) FROM image.images
             WHERE id::text = ANY($1)",
        )
        .bind(&ids)
        .fetch_one(&db)
        .await
        .unwrap()
        .then_some(())
    })
    .await;
    platform.start_service(Service::Api, &short).await.unwrap();
    eventually_async(WAIT, "all 1000 applied", || async {
        (count(
            &platform,
            "SELECT count(*) FROM image.images WHERE id::text = ANY($1) AND status = 'PROCESSED'",
            &ids,
        )
        .await
            == 1000)
            .then_some(())
    })
    .await;

    // An image expired for real (nothing uploaded) still takes a result that comes later.
    let late = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let late_id = late.upload_targets[0].image_id.clone();
    eventually_async(WAIT, "the image expired", || async {
        (user.image(&platform, &late_id).await.status() == api::ImageStatus::Expired).then_some(())
    })
    .await;
    publish(
        &platform,
        &storage_keys(&platform, std::slice::from_ref(&late_id)).await,
    )
    .await;
    eventually_async(WAIT, "the late photo applied", || async {
        (user.image(&platform, &late_id).await.status() == api::ImageStatus::Processed)
            .then_some(())
    })
    .await;
    user.wait_route(&platform, &late.route.unwrap().id, api::RouteStatus::Ready)
        .await;

    // An upload whose body takes longer than the token's life and grace still goes through.
    let slow = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let target = slow.upload_targets[0].clone();
    platform.stop(Service::Gateway).await.unwrap();
    platform
        .start_service(Service::Gateway, &[("FOLLOW_MIN_UPLOAD_RATE", Some("1"))])
        .await
        .unwrap();
    let body = jpeg(640, 480);
    let chunks: Vec<Vec<u8>> = body
        .chunks(body.len() / 8 + 1)
        .map(<[u8]>::to_vec)
        .collect();
    let clock = every(Duration::from_millis(700));
    let paced = futures_util::stream::unfold((chunks.into_iter(), clock), |mut state| async move {
        let chunk = state.0.next()?;
        state.1.tick().await;
        Some((Ok::<_, std::io::Error>(chunk), state))
    });
    let response = reqwest::Client::new()
        .put(&target.upload_url)
        .header("content-type", "image/jpeg")
        .body(reqwest::Body::wrap_stream(paced))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    eventually_async(WAIT, "the slow upload processed", || async {
        (user.image(&platform, &target.image_id).await.status() == api::ImageStatus::Processed)
            .then_some(())
    })
    .await;
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn a_consumer_killed_every_second_dead_letters_nothing_but_true_poison() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to kill the API") {
        return;
    }
    let mut user = User::new(&platform).await;
    let routes = routes(&platform, &mut user, 50, |_| 100).await;
    let ids: Vec<String> = routes.concat();
    let mut images = storage_keys(&platform, &ids).await;
    // One forged result among them: another image's objects.
    let forged = (images[0].0.clone(), images[1].1.clone());
    images.push(forged);
    publish(&platform, &images).await;
    let processed =
        "SELECT count(*) FROM image.images WHERE id::text = ANY($1) AND status = 'PROCESSED'";
    let mut kills = every(Duration::from_secs(1));
    while count(&platform, processed, &ids).await < 5000 {
        kills.tick().await;
        platform.kill(Service::Api).await.unwrap();
        platform.start_service(Service::Api, &[]).await.unwrap();
    }
    eventually_async(WAIT, "the result stream drained", || async {
        (observe::pending_results(&platform).await == 0).then_some(())
    })
    .await;
    let dead = observe::dead_results(&platform).await;
    assert_eq!(dead.len(), 1, "only the forgery is dead");
    let reason: String = dead[0].get("dead_reason").unwrap();
    assert!(reason.starts_with("poison"), "{reason}");
    user.clean_up(&platform).await;
}

/// `follow-api dead …` against the stack's Valkey: stdout, or the failure.
async fn dead_cli(platform: &Platform, args: &[&str]) -> Result<String, String> {
    let out = tokio::process::Command::new(binary("follow-api").unwrap())
        .arg("dead")
        .args(args)
        .env("FOLLOW_VALKEY_URL", &platform.valkey_url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

#[tokio::test]
async fn operators_inspect_fix_and_replay_a_dead_letter_and_it_applies_once() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to restart the API") {
        return;
    }
    platform.stop(Service::Api).await.unwrap();
    platform
        .start_service(Service::Api, &[("FOLLOW_RESULT_MAX_FAILURES", Some("2"))])
        .await
        .unwrap();
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let image = created.upload_targets[0].image_id.clone();
    // The database refuses this image's update for now (an operator's mistake, say).
    let db = platform.database().await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE FUNCTION image.refuse_e2e() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN RAISE EXCEPTION 'under maintenance'; END $$;
         CREATE TRIGGER refuse_e2e BEFORE UPDATE ON image.images FOR EACH ROW
           WHEN (OLD.id = '{image}') EXECUTE FUNCTION image.refuse_e2e();"
    )))
    .execute(&db)
    .await
    .unwrap();
    publish(
        &platform,
        &storage_keys(&platform, std::slice::from_ref(&image)).await,
    )
    .await;
    eventually_async(WAIT, "dead-lettered after two failures", || async {
        (dead_letters(&platform).await == 1).then_some(())
    })
    .await;
    let listed = dead_cli(&platform, &["list", "--json"]).await.unwrap();
    let entry: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    assert_eq!(entry["image_id"], image);
    assert_eq!(entry["failures"], 2);
    let reason = entry["reason"].as_str().unwrap();
    assert!(reason.contains("under maintenance"), "{reason}");
    let id = entry["id"].as_str().unwrap().to_owned();
    let shown: serde_json::Value =
        serde_json::from_str(&dead_cli(&platform, &["show", &id, "--json"]).await.unwrap())
            .unwrap();
    assert_eq!(shown["fields"]["status"], "processed");
    assert_eq!(
        user.image(&platform, &image).await.status(),
        api::ImageStatus::Pending
    );

    // Fixed; replayed; applied once. A second replay finds nothing, and a duplicate of the
    // applied result changes nothing.
    sqlx::raw_sql("DROP TRIGGER refuse_e2e ON image.images; DROP FUNCTION image.refuse_e2e();")
        .execute(&db)
        .await
        .unwrap();
    dead_cli(&platform, &["replay", &id]).await.unwrap();
    eventually_async(WAIT, "the replayed result applied", || async {
        (user.image(&platform, &image).await.status() == api::ImageStatus::Processed).then_some(())
    })
    .await;
    assert!(dead_cli(&platform, &["replay", &id]).await.is_err(), "gone");
    assert_eq!(dead_letters(&platform).await, 0);
    let updated = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT updated_at::text FROM image.images WHERE id::text = $1",
        )
        .bind(&image)
        .fetch_one(&db)
        .await
        .unwrap()
    };
    let before = updated().await;
    publish(
        &platform,
        &storage_keys(&platform, std::slice::from_ref(&image)).await,
    )
    .await;
    let name = "follow_api_results_applied_total{outcome=\"ignored\"}";
    eventually_async(WAIT, "the duplicate ignored", || async {
        (platform.metric(&platform.api_url, name).await.unwrap() >= 1.0).then_some(())
    })
    .await;
    assert_eq!(updated().await, before);

    // `drop` removes what operators give up on.
    let forged = storage_keys(&platform, std::slice::from_ref(&image)).await;
    publish(
        &platform,
        &[(forged[0].0.clone(), "routes/x/images/y".into())],
    )
    .await;
    eventually_async(WAIT, "the forgery dead", || async {
        (dead_letters(&platform).await == 1).then_some(())
    })
    .await;
    let listed = dead_cli(&platform, &["list", "--json"]).await.unwrap();
    let entry: serde_json::Value = serde_json::from_str(listed.lines().next().unwrap()).unwrap();
    dead_cli(&platform, &["drop", entry["id"].as_str().unwrap()])
        .await
        .unwrap();
    assert_eq!(dead_letters(&platform).await, 0);
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn a_breaker_probe_cancelled_while_valkey_hangs_never_keeps_creation_shut() {
    let platform = Platform::start().await.unwrap();
    if !platform.can_control("to freeze Valkey") {
        return;
    }
    let user = User::new(&platform).await;
    platform.pause(Service::Valkey).unwrap();
    // Calls whose client gives up before Valkey's timeout, spaced so that the breaker's
    // cool-down ends between them: the probe among them is cancelled.
    let mut calls = every(Duration::from_millis(1100));
    for _ in 0..6 {
        let mut request = bearer(
            api::CreateRouteWithWaypointsRequest {
                request_id: uuid::Uuid::new_v4().to_string(),
                name: "while frozen".into(),
                waypoints: vec![api::WaypointInput {
                    marker_x: 0.5,
                    marker_y: 0.5,
                    content_type: "image/jpeg".into(),
                    file_size: 1000,
                }],
            },
            &user.token,
        );
        request.set_timeout(Duration::from_millis(300));
        let status = platform
            .routes()
            .await
            .unwrap()
            .create_route_with_waypoints(request)
            .await
            .unwrap_err();
        assert!(
            matches!(
                status.code(),
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled
            ),
            "{status:?}"
        );
        calls.tick().await;
    }
    platform.resume(Service::Valkey).unwrap();
    // Within the breaker's cool-down (2 s) and a probe, creation works again.
    eventually_async(Duration::from_secs(15), "creation works again", || async {
        user.try_create_route(&platform, &[(0.5, 0.5)]).await.ok()
    })
    .await;
    user.clean_up(&platform).await;
}
