//! Attacks on the running processes (issue 15): unauthenticated callers sending large bodies
//! cost the services no memory, because nothing is read before the token is checked.
#![allow(clippy::unwrap_used)]

use follow_e2e::{Platform, rss_bytes};

/// Bodies sent, and how many at once.
const BODIES: usize = 80;
const AT_ONCE: usize = 4;
const BODY: usize = 4 << 20;

/// Sends `BODIES` bodies of 4 MiB, `AT_ONCE` at a time; each is refused (the answer arrives
/// before the body is read, or the connection is closed on it) with `expected`.
async fn flood(
    make: impl Fn() -> reqwest::RequestBuilder,
    expected: impl Fn(&reqwest::Response) -> bool,
) {
    let body: &'static [u8] = Box::leak(vec![b'a'; BODY].into_boxed_slice());
    let mut answered = 0;
    for _ in 0..BODIES / AT_ONCE {
        let sends = (0..AT_ONCE).map(|_| make().body(body).send());
        // A server that answers without reading may close the connection while the body is
        // still going: the client sees the answer or a reset, never a success.
        let sent = futures_util::future::join_all(sends).await;
        for response in sent.into_iter().flatten() {
            assert!(expected(&response), "{response:?}");
            answered += 1;
        }
    }
    assert!(answered > 0, "no answer at all");
}

#[tokio::test]
async fn unauthenticated_large_bodies_cost_neither_service_memory() {
    let platform = Platform::start().await.unwrap();
    let (Some(&api), Some(gateway)) = (platform.api_pids().first(), platform.gateway_pid()) else {
        eprintln!("skipped: needs the services' processes (spawn mode)");
        return;
    };
    let client = reqwest::Client::new();
    let create = format!(
        "{}/follow.api.v1.RouteService/CreateRouteWithWaypoints",
        platform.api_url
    );
    let upload = format!("{}/upload?token=not-a-token", platform.gateway_url);
    let to_api = || {
        client
            .post(&create)
            .header("content-type", "application/grpc-web+proto")
            .header("x-grpc-web", "1")
    };
    let to_gateway = || client.put(&upload).header("content-type", "image/jpeg");
    let unauthenticated =
        |r: &reqwest::Response| r.headers().get("grpc-status").is_some_and(|s| s == "16");
    let unauthorized = |r: &reqwest::Response| r.status() == 401;
    // Warm up (first connections, lazily made buffers), then measure.
    flood(to_api, unauthenticated).await;
    flood(to_gateway, unauthorized).await;
    let before = (rss_bytes(api), rss_bytes(gateway));
    for _ in 0..2 {
        flood(to_api, unauthenticated).await;
        flood(to_gateway, unauthorized).await;
    }
    let after = (rss_bytes(api), rss_bytes(gateway));
    let sent_mib = (2 * BODIES * BODY) >> 20;
    let growth_mib = |a: u64, b: u64| b.saturating_sub(a) as f64 / f64::from(1 << 20);
    for (name, growth) in [
        ("follow-api", growth_mib(before.0, after.0)),
        ("follow-image-gateway", growth_mib(before.1, after.1)),
    ] {
        eprintln!(
            "{name}: RSS grew {growth:.1} MiB while {sent_mib} MiB of unauthenticated bodies were offered"
        );
        assert!(growth < 16.0, "{name} grew {growth:.1} MiB");
    }
}
