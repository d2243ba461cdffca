//! Both services behave the same at their edges (issue 12): bad settings stop them naming the
//! variable, a client whose network vanished is cut by keepalive, a client that does not read
//! cannot hold up shutdown, `/health` and `/metrics` answer alike and are not readable
//! cross-origin, while gRPC from browsers is.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use follow_e2e::{
    Platform, Service, binary,
    client::{bearer, watch_images},
    relay::Relay,
    user::User,
};
use follow_proto::{
    api::v1::image_service_client::ImageServiceClient,
    gateway::v1::{WatchUploadRequest, gateway_service_client::GatewayServiceClient},
    tonic::transport::Endpoint,
};
use follow_testkit::eventually_async;

const WAIT: Duration = Duration::from_secs(60);

/// A setting of each service, a bad value of it, and what the refusal names.
const BAD_SETTINGS: &[(&str, &str, &str)] = &[
    ("FOLLOW_KEEPALIVE_SECS", "0", "FOLLOW_KEEPALIVE_SECS"),
    (
        "FOLLOW_KEEPALIVE_TIMEOUT_SECS",
        "soon",
        "FOLLOW_KEEPALIVE_TIMEOUT_SECS",
    ),
    (
        "FOLLOW_SHUTDOWN_GRACE_SECS",
        "-1",
        "FOLLOW_SHUTDOWN_GRACE_SECS",
    ),
    ("FOLLOW_S3_ENDPOINT", "ftp://storage", "FOLLOW_S3_ENDPOINT"),
    ("FOLLOW_S3_MAX_ATTEMPTS", "0", "FOLLOW_S3_MAX_ATTEMPTS"),
    (
        "FOLLOW_S3_OPERATION_TIMEOUT_SECS",
        "1",
        "FOLLOW_S3_OPERATION_TIMEOUT_SECS",
    ),
    (
        "FOLLOW_S3_SECRET_ACCESS_KEY",
        "",
        "FOLLOW_S3_SECRET_ACCESS_KEY",
    ),
    ("FOLLOW_CONSUMER_NAME", " ", "FOLLOW_CONSUMER_NAME"),
    ("FOLLOW_VALKEY_PARTITIONS", "0", "FOLLOW_VALKEY_PARTITIONS"),
];

/// Each service's own, beside the shared ones above.
const BAD_API_SETTINGS: &[(&str, &str)] = &[
    ("FOLLOW_API_LISTEN", "nowhere"),
    ("FOLLOW_DATABASE_URL", ""),
    ("FOLLOW_USER_PUBLIC_KEYS", "u1=garbage"),
    ("FOLLOW_UPLOAD_SIGNING_KEY", "no-kid"),
    ("FOLLOW_GATEWAY_URL", "ftp://gateway"),
    ("FOLLOW_PREVIEW_URL_TTL_SECS", "99999999"),
    ("FOLLOW_RESULT_BATCH", "100000"),
    ("FOLLOW_RECONCILE_INTERVAL_SECS", "0"),
];
const BAD_GATEWAY_SETTINGS: &[(&str, &str)] = &[
    ("FOLLOW_GATEWAY_LISTEN", "nowhere"),
    ("FOLLOW_UPLOAD_PUBLIC_KEYS", ""),
    ("FOLLOW_LONG_EDGE", "8"),
    ("FOLLOW_PREVIEW_EDGE", "4096"),
    ("FOLLOW_JPEG_QUALITY", "101"),
    ("FOLLOW_PIPELINE_WORKERS", "0"),
    ("FOLLOW_MAX_RECEIVING", "0"),
    ("FOLLOW_JOB_LEASE_SECS", "0"),
    ("FOLLOW_KEEP_ORIGINALS", "maybe"),
];

/// Runs `binary args` with `env` (and nothing else of ours): exit code, stderr.
fn run(binary_name: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = std::process::Command::new(binary(binary_name).unwrap());
    command.args(args).env_clear().envs(env.iter().copied());
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_settings_stop_both_services_naming_the_variable_and_never_a_secret() {
    let upload_key = keypair("upload-1");
    let user_key = keypair("user-1");
    let secret = "do-not-print-this-secret";
    let shared = [
        ("FOLLOW_S3_ACCESS_KEY_ID", "GK1"),
        ("FOLLOW_S3_SECRET_ACCESS_KEY", secret),
        ("FOLLOW_LOG_FORMAT", "text"),
    ];
    let api: Vec<(&str, &str)> = shared
        .iter()
        .copied()
        .chain([
            (
                "FOLLOW_DATABASE_URL",
                "postgres://follow:pw@127.0.0.1:1/follow",
            ),
            ("FOLLOW_USER_PUBLIC_KEYS", user_key.1.as_str()),
            ("FOLLOW_UPLOAD_SIGNING_KEY", upload_key.0.as_str()),
        ])
        .collect();
    let gateway: Vec<(&str, &str)> = shared
        .iter()
        .copied()
        .chain([("FOLLOW_UPLOAD_PUBLIC_KEYS", upload_key.1.as_str())])
        .collect();
    let own_api = BAD_API_SETTINGS.iter().map(|(k, v)| (*k, *v, *k));
    let own_gateway = BAD_GATEWAY_SETTINGS.iter().map(|(k, v)| (*k, *v, *k));
    for (service, args, base, own) in [
        (
            "follow-api",
            &["serve"][..],
            &api,
            own_api.collect::<Vec<_>>(),
        ),
        (
            "follow-image-gateway",
            &[][..],
            &gateway,
            own_gateway.collect(),
        ),
    ] {
        for (name, value, named) in BAD_SETTINGS.iter().copied().chain(own) {
            let mut env: Vec<(&str, &str)> =
                base.iter().copied().filter(|(k, _)| *k != name).collect();
            env.push((name, value));
            let (ok, stderr) = run(service, args, &env);
            assert!(!ok, "{service} started with {name}={value:?}");
            assert!(
                stderr.contains(named),
                "{service} with {name}={value:?} should name {named}: {stderr}"
            );
            assert!(
                !stderr.contains(secret),
                "{service} printed a secret: {stderr}"
            );
        }
    }
}

/// A `kid=private` / `kid=public` pair from `follow-api keygen`.
fn keypair(kid: &str) -> (String, String) {
    let out = std::process::Command::new(binary("follow-api").unwrap())
        .args(["keygen", "--kid", kid])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    (
        lines.next().unwrap().to_owned(),
        lines.next().unwrap().to_owned(),
    )
}

/// Restarts `service` with these settings (spawn mode).
async fn restart(platform: &mut Platform, service: Service, env: &[(&str, Option<&str>)]) {
    platform.stop(service).await.unwrap();
    platform.start_service(service, env).await.unwrap();
}

#[tokio::test]
async fn both_services_cut_a_client_whose_network_vanished() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to restart the services") {
        return;
    }
    let quick = [
        ("FOLLOW_KEEPALIVE_SECS", Some("1")),
        ("FOLLOW_KEEPALIVE_TIMEOUT_SECS", Some("1")),
    ];
    restart(&mut platform, Service::Api, &quick).await;
    restart(&mut platform, Service::Gateway, &quick).await;
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let target = &created.upload_targets[0];

    let api_relay = Relay::start(&platform.api_url).await.unwrap();
    let gateway_relay = Relay::start(&platform.gateway_url).await.unwrap();
    let mut watch = ImageServiceClient::new(
        Endpoint::from_shared(api_relay.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .watch_image_status(bearer(watch_images(&[&target.image_id]), &user.token))
    .await
    .unwrap()
    .into_inner();
    let mut upload_watch = GatewayServiceClient::new(
        Endpoint::from_shared(gateway_relay.url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .watch_upload(bearer(WatchUploadRequest {}, &target.token))
    .await
    .unwrap()
    .into_inner();
    // Both streams are live: their first message came through the relays.
    assert!(watch.message().await.unwrap().is_some());
    assert!(upload_watch.message().await.unwrap().is_some());
    assert_eq!(
        (api_relay.upstream_open(), gateway_relay.upstream_open()),
        (1, 1)
    );

    api_relay.freeze();
    gateway_relay.freeze();
    eventually_async(
        WAIT,
        "both services closing the vanished connection",
        || async {
            (api_relay.upstream_open() == 0 && gateway_relay.upstream_open() == 0).then_some(())
        },
    )
    .await;
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn a_client_that_does_not_read_holds_up_neither_service_past_the_grace() {
    let mut platform = Platform::start().await.unwrap();
    if !platform.can_control("to stop the services") {
        return;
    }
    let grace = [("FOLLOW_SHUTDOWN_GRACE_SECS", Some("1"))];
    restart(&mut platform, Service::Api, &grace).await;
    restart(&mut platform, Service::Gateway, &grace).await;
    let mut user = User::new(&platform).await;
    let created = user.create_route(&platform, &[(0.5, 0.5)]).await;
    let target = &created.upload_targets[0];
    // One-byte windows: each server's first message cannot be sent whole, nobody reads.
    let cramped = |url: &str| {
        Endpoint::from_shared(url.to_owned())
            .unwrap()
            .initial_stream_window_size(Some(1))
    };
    let _api_stream = ImageServiceClient::new(cramped(&platform.api_url).connect().await.unwrap())
        .watch_image_status(bearer(watch_images(&[&target.image_id]), &user.token))
        .await
        .unwrap();
    let _gateway_stream =
        GatewayServiceClient::new(cramped(&platform.gateway_url).connect().await.unwrap())
            .watch_upload(bearer(WatchUploadRequest {}, &target.token))
            .await
            .unwrap();
    // The harness gives each 30 s after SIGTERM before it calls it a failure.
    platform.stop(Service::Gateway).await.unwrap();
    platform.stop(Service::Api).await.unwrap();
    platform.start_service(Service::Api, &[]).await.unwrap();
    platform.start_service(Service::Gateway, &[]).await.unwrap();
    user.clean_up(&platform).await;
}

#[tokio::test]
async fn health_and_metrics_answer_alike_and_only_grpc_is_open_to_browsers() {
    let platform = Platform::start().await.unwrap();
    let client = reqwest::Client::new();
    for (url, own) in [
        (&platform.api_url, "postgres"),
        (&platform.gateway_url, "storage"),
    ] {
        let (status, health) = platform.health(url).await.unwrap();
        assert_eq!(status, 200, "{health}");
        for key in ["status", "valkey", "progress_hub", "workers", own] {
            assert_eq!(health[key], "ok", "{url}: {health}");
        }
        let metrics = client
            .get(format!("{url}/metrics"))
            .header("origin", "https://evil.example")
            .send()
            .await
            .unwrap();
        assert_eq!(metrics.status(), 200);
        assert!(
            metrics
                .headers()
                .get("access-control-allow-origin")
                .is_none(),
            "{url}: /metrics readable cross-origin"
        );
        // A browser's preflight for grpc-web is answered.
        let preflight = client
            .request(
                reqwest::Method::OPTIONS,
                format!("{url}/grpc.health.v1.Health/Check"),
            )
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type,x-grpc-web")
            .send()
            .await
            .unwrap();
        assert!(
            preflight.status().is_success(),
            "{url}: {}",
            preflight.status()
        );
        assert!(
            preflight
                .headers()
                .get("access-control-allow-origin")
                .is_some(),
            "{url}: grpc-web is for browsers"
        );
    }
}
