//! The plain-HTTP surface: `PUT /upload`, `GET /health`, `GET /metrics`.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::{get, put},
};
use follow_bus::HealthChecker;
use serde_json::json;

use crate::upload::{Gateway, put_upload};

/// What `/health` and the gRPC health reporter ask.
#[derive(Debug, Clone)]
pub struct Probe {
    pub gateway: Arc<Gateway>,
    pub valkey: HealthChecker,
}

impl Probe {
    /// `(valkey, storage)` reachable.
    pub async fn check(&self) -> (bool, bool) {
        let mut valkey = self.valkey.clone();
        let (v, s) = tokio::join!(valkey.check(), self.gateway.storage.healthy());
        (v.valkey, s)
    }
}

pub fn router(gateway: Arc<Gateway>, probe: Probe) -> Router {
    Router::new()
        .route("/upload", put(put_upload))
        .with_state(gateway)
        .merge(
            Router::new()
                .route("/health", get(health))
                .route("/metrics", get(metrics))
                .with_state(probe),
        )
}

async fn health(State(probe): State<Probe>) -> impl IntoResponse {
    let (valkey, storage) = probe.check().await;
    let word = |ok: bool| if ok { "ok" } else { "down" };
    let ok = valkey && storage;
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(json!({
            "status": if ok { "ok" } else { "degraded" },
            "valkey": word(valkey),
            "storage": word(storage),
        })),
    )
}

async fn metrics(State(probe): State<Probe>) -> impl IntoResponse {
    let metrics = &probe.gateway.metrics;
    metrics
        .outbox
        .set(i64::try_from(probe.gateway.outbox.len()).unwrap_or(i64::MAX));
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}
