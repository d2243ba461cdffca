//! The plain-HTTP endpoints beside gRPC on the same port (operators only, no CORS):
//! `GET /health` and `GET /metrics`, and the probe both health reports share.

use std::{sync::Arc, time::Duration};

use axum::{Router, extract::State, response::Response, routing::get};
use follow_bus::{ConsumerStats, HealthChecker, HubStats, keys};
use follow_service::{
    health::{self, Checks, Probe},
    workers::Workers,
};
use sqlx::PgPool;

use crate::metrics::Metrics;

/// What `/health`, `grpc.health.v1` and `/metrics` ask.
#[derive(Debug, Clone)]
pub struct ApiProbe {
    pub pool: PgPool,
    pub valkey: HealthChecker,
    pub workers: Workers,
    pub metrics: Arc<Metrics>,
    pub consumer: Arc<ConsumerStats>,
    pub hub: Arc<HubStats>,
}

impl Probe for ApiProbe {
    async fn check(&self) -> Checks {
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
        vec![
            ("valkey", valkey.valkey),
            ("postgres", postgres),
            ("workers", self.workers.down().is_empty()),
        ]
    }
}

/// `GET /health`, `GET /metrics`.
pub fn ops(probe: ApiProbe) -> Router {
    health::router(probe.clone()).merge(
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(probe),
    )
}

async fn metrics(State(probe): State<ApiProbe>) -> Response {
    let queue = match probe.valkey.clone().queue_info(keys::RESULTS).await {
        Ok(queue) => queue,
        Err(e) => {
            tracing::debug!(error = %e, "metrics: the result queue is unavailable");
            None
        }
    };
    probe.metrics.sample(&probe.consumer, &probe.hub, queue);
    follow_service::metrics::response(probe.metrics.registry())
}
