//! What `GET /health`, `GET /metrics` (beside gRPC on the same port, operators only, no CORS) and
//! `grpc.health.v1` report of the API.

use std::sync::Arc;

use axum::response::Response;
use follow_bus::{ConsumerStats, HealthChecker, HubStats};
use follow_service::{
    health::{self, Checks, Probe},
    metrics::Registry,
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
    pub registry: Arc<Registry>,
    pub consumer: Arc<ConsumerStats>,
    pub hub: Arc<HubStats>,
}

impl Probe for ApiProbe {
    async fn check(&self) -> Checks {
        let postgres = async {
            sqlx::query_scalar::<_, i32>("SELECT 1")
                .fetch_one(&self.pool)
                .await
                .is_ok()
        };
        health::checks(
            &self.valkey,
            &self.hub,
            &self.workers.down(),
            "postgres",
            postgres,
        )
        .await
    }

    async fn metrics(&self) -> Response {
        self.metrics
            .sample(&self.hub, &self.valkey, &self.consumer)
            .await;
        follow_service::metrics::response(&self.registry)
    }
}
