//! Health, told the same way by both services: `GET /health` (200 with `"ok"` per dependency,
//! 503 with `"down"` entries) and `grpc.health.v1.Health`, kept in step by [`report`].

use std::{future::Future, sync::atomic::Ordering, time::Duration};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};
use follow_bus::{HealthChecker, HubStats};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// Each dependency (or duty) by name, and whether it is up.
pub type Checks = Vec<(&'static str, bool)>;

/// What a service checks for its health, and its metrics as of now.
pub trait Probe: Clone + Send + Sync + 'static {
    fn check(&self) -> impl Future<Output = Checks> + Send;

    /// The Prometheus text exposition.
    fn metrics(&self) -> impl Future<Output = Response> + Send;
}

/// How long a dependency may take to answer a health probe before it counts as down: health
/// answers within a second whatever is down (a silent server is down, not a hang).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// The checks every service makes — Valkey answers, the progress hub holds its pub/sub
/// connection (else watches are refused), no worker keeps failing (`workers_down`, from
/// [`crate::workers::Workers::down`]) — with the service's own dependency (`name`, checked by
/// `own`) between them, all at once, each within [`PROBE_TIMEOUT`].
pub async fn checks(
    valkey: &HealthChecker,
    hub: &HubStats,
    workers_down: &[&'static str],
    name: &'static str,
    own: impl Future<Output = bool>,
) -> Checks {
    let mut valkey = valkey.clone();
    let (valkey, own) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, valkey.check()),
        tokio::time::timeout(PROBE_TIMEOUT, own),
    );
    vec![
        ("valkey", valkey.is_ok_and(|h| h.valkey)),
        ("progress_hub", hub.connected.load(Ordering::Relaxed)),
        (name, own.unwrap_or(false)),
        ("workers", workers_down.is_empty()),
    ]
}

/// `GET /health` and `GET /metrics`: for operators (no CORS).
pub fn router<P: Probe>(probe: P) -> Router {
    Router::new()
        .route("/health", get(health::<P>))
        .route("/metrics", get(metrics::<P>))
        .with_state(probe)
}

async fn metrics<P: Probe>(State(probe): State<P>) -> Response {
    probe.metrics().await
}

async fn health<P: Probe>(State(probe): State<P>) -> impl IntoResponse {
    let checks = probe.check().await;
    let ok = checks.iter().all(|(_, up)| *up);
    let mut body = Map::new();
    body.insert("status".into(), (if ok { "ok" } else { "degraded" }).into());
    for (name, up) in checks {
        body.insert(name.into(), (if up { "ok" } else { "down" }).into());
    }
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(Value::Object(body)))
}

/// Keeps `grpc.health.v1` (the server as a whole, `""`, and each of `services`) in step with
/// the probe, checked every `every`.
pub async fn report<P: Probe>(
    probe: P,
    reporter: HealthReporter,
    services: &'static [&'static str],
    every: Duration,
    cancel: CancellationToken,
) {
    let mut last = None;
    loop {
        let ok = probe.check().await.iter().all(|(_, up)| *up);
        if last != Some(ok) {
            let status = if ok {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            for service in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(service, status).await;
            }
            if last.is_some() {
                tracing::info!(serving = ok, "health changed");
            }
            last = Some(ok);
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}
