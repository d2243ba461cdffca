//! The plain-HTTP endpoints beside gRPC on the same port: `GET /health` and `GET /metrics`.

use std::{sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use follow_bus::{ConsumerStats, HealthChecker, HubStats};
use serde_json::json;
use sqlx::PgPool;

use crate::metrics::{GroupSample, Metrics};

/// What `/health` and the gRPC health service ask.
#[derive(Debug, Clone)]
pub struct Probe {
    pub pool: PgPool,
    pub valkey: HealthChecker,
    pub metrics: Arc<Metrics>,
    pub consumer: Arc<ConsumerStats>,
    pub hub: Arc<HubStats>,
}

/// One check of both dependencies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dependencies {
    pub valkey: bool,
    pub postgres: bool,
}

impl Dependencies {
    pub fn ok(self) -> bool {
        self.valkey && self.postgres
    }
}

impl Probe {
    pub async fn check(&self) -> Dependencies {
        let mut valkey = self.valkey.clone();
        let postgres = async {
            tokio::time::timeout(
                Duration::from_secs(2),
                sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool),
            )
            .await
            .is_ok_and(|r| r.is_ok())
        };
        let (valkey, postgres) = tokio::join!(valkey.check(), postgres);
        Dependencies {
            valkey: valkey.valkey,
            postgres,
        }
    }
}

pub fn router(probe: Probe) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(probe)
}

async fn health(State(probe): State<Probe>) -> impl IntoResponse {
    let deps = probe.check().await;
    let word = |ok: bool| if ok { "ok" } else { "down" };
    let body = json!({
        "status": if deps.ok() { "ok" } else { "degraded" },
        "valkey": word(deps.valkey),
        "postgres": word(deps.postgres),
    });
    let code = if deps.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body))
}

async fn metrics(State(probe): State<Probe>) -> impl IntoResponse {
    let mut valkey = probe.valkey.clone();
    let group = match valkey.group_info().await {
        Ok(Some(info)) => Some(GroupSample {
            pending: info.pending,
            lag: info.lag.unwrap_or(0),
        }),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(error = %e, "metrics: group info unavailable");
            None
        }
    };
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        probe
            .metrics
            .render(Some(&probe.consumer), Some(&probe.hub), group),
    )
}
