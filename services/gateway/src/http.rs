//! The plain-HTTP surface: `PUT /upload` (public: browsers upload here), and what `GET /health`,
//! `GET /metrics` (operators) and `grpc.health.v1` report of the gateway.

use std::sync::Arc;

use axum::{
    Router,
    response::Response,
    routing::{patch, put},
};
use follow_bus::{ConsumerStats, HealthChecker, HubStats};
use follow_service::{
    health::{self, Checks, Probe},
    metrics::Registry,
    workers::Workers,
};

use crate::upload::{
    Gateway, delete_upload, head_upload, options_upload, patch_upload, post_upload, put_upload,
};

/// What `/health`, `grpc.health.v1` and `/metrics` ask.
#[derive(Debug, Clone)]
pub struct GatewayProbe {
    pub gateway: Arc<Gateway>,
    pub valkey: HealthChecker,
    pub hub: Arc<HubStats>,
    pub workers: Workers,
    pub consumers: Arc<ConsumerStats>,
    pub registry: Arc<Registry>,
}

impl Probe for GatewayProbe {
    async fn check(&self) -> Checks {
        let storage = self.gateway.bucket.healthy();
        health::checks(
            &self.valkey,
            &self.hub,
            &self.workers.down(),
            "storage",
            storage,
        )
        .await
    }

    async fn metrics(&self) -> Response {
        self.gateway
            .metrics
            .sample(&self.valkey, &self.consumers)
            .await;
        follow_service::metrics::response(&self.registry)
    }
}

/// `PUT /upload` (a whole image), and resumable uploads: `OPTIONS`/`POST /upload`,
/// `HEAD`/`PATCH`/`DELETE /upload/{id}`.
pub fn public(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route(
            "/upload",
            put(put_upload).post(post_upload).options(options_upload),
        )
        .route(
            "/upload/{id}",
            patch(patch_upload).head(head_upload).delete(delete_upload),
        )
        .with_state(gateway)
}
