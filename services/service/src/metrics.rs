//! Prometheus text for `GET /metrics`: each service owns its registry and typed label sets
//! (`#[derive(EncodeLabelSet)]`); this renders and serves it.

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use prometheus_client::registry::Registry;

pub use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};

/// The OpenMetrics text of `registry`, as a response.
pub fn response(registry: &Registry) -> Response {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
