//! The plain-HTTP surface: `PUT /upload` (public: browsers upload here), `GET /health` and
//! `GET /metrics` (operators), and the probe both health reports share.

use std::sync::Arc;

use axum::{
    Router,
    extract::State,
    response::Response,
    routing::{get, put},
};
use follow_bus::{ConsumerStats, HealthChecker, keys};
use follow_service::{
    health::{self, Checks, Probe},
    workers::Workers,
};

use crate::upload::{Gateway, put_upload};

/// What `/health`, `grpc.health.v1` and `/metrics` ask.
#[derive(Debug, Clone)]
pub struct GatewayProbe {
    pub gateway: Arc<Gateway>,
    pub valkey: HealthChecker,
    pub workers: Workers,
    pub consumers: Arc<ConsumerStats>,
}

impl Probe for GatewayProbe {
    async fn check(&self) -> Checks {
        let mut valkey = self.valkey.clone();
        let (valkey, storage) = tokio::join!(valkey.check(), self.gateway.bucket.healthy());
        vec![
            ("valkey", valkey.valkey),
            ("storage", storage),
            ("workers", self.workers.down().is_empty()),
        ]
    }
}

/// `PUT /upload`.
pub fn public(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/upload", put(put_upload))
        .with_state(gateway)
}

/// `GET /health`, `GET /metrics`.
pub fn ops(probe: GatewayProbe) -> Router {
    health::router(probe.clone()).merge(
        Router::new()
            .route("/metrics", get(metrics))
            .with_state(probe),
    )
}

async fn metrics(State(probe): State<GatewayProbe>) -> Response {
    let queue = match probe.valkey.clone().queue_info(keys::JOBS).await {
        Ok(queue) => queue,
        Err(e) => {
            tracing::debug!(error = %e, "metrics: the job queue is unavailable");
            None
        }
    };
    let metrics = &probe.gateway.metrics;
    metrics.sample(queue, &probe.consumers);
    follow_service::metrics::response(metrics.registry())
}
