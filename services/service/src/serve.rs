//! Serving a service's one port: its gRPC services with `grpc.health.v1` and reflection,
//! grpc-web for browsers, CORS (from config) on the public surface only, plain HTTP beside
//! them, HTTP/2 and TCP keepalive with `TCP_NODELAY` on every connection, a cap on the calls one
//! connection may have open, JSON `{error_code, message}` for every request no route takes, and a
//! graceful shutdown that cuts what is still open after the grace.

use std::time::Duration;

use axum::{
    Json, Router,
    http::{HeaderMap, HeaderName, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_proto::FILE_DESCRIPTOR_SET;
use tokio::net::TcpListener;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Server};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::ServerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot build gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// What a service serves.
#[derive(Debug)]
pub struct Surface {
    /// The gRPC services, `grpc.health.v1.Health` among them (reflection is added here).
    pub grpc: Routes,
    /// Full names of the service's own gRPC services: the only ones reflection advertises.
    pub names: &'static [&'static str],
    /// Plain HTTP that browsers may call (CORS applies), e.g. uploads.
    pub public: Router,
    /// Plain HTTP for operators (`/health`, `/metrics`): no CORS, so no web page can read it.
    pub ops: Router,
}

/// The name `grpc.health.v1` reports the server as a whole under, and its service's name.
const HEALTH: &str = "grpc.health.v1.Health";

/// Serves `surface` on `listener` until `cancel`, then lets open connections finish for the
/// configured grace and cuts the rest.
pub async fn serve(
    listener: TcpListener,
    surface: Surface,
    config: &ServerConfig,
    cancel: CancellationToken,
) -> Result<(), ServeError> {
    let reflection = surface
        .names
        .iter()
        .chain(&[HEALTH])
        .fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
        .build_v1()?;
    // grpc-web translation only in front of gRPC: it refuses any other HTTP/1.1 request.
    let grpc = surface
        .grpc
        .add_service(reflection)
        .prepare()
        .into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new());
    // (A method fallback replaces a route's own, layers included: it is set before CORS.)
    let app = grpc
        .merge(surface.public)
        .method_not_allowed_fallback(wrong_method)
        .layer(cors(&config.cors_origins))
        .merge(surface.ops.method_not_allowed_fallback(wrong_method))
        .fallback(no_route);
    tracing::info!(addr = ?listener.local_addr().ok(), "serving");
    let served = Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .add_routes(Routes::from(app))
        .serve_with_incoming_shutdown(
            connections(
                listener,
                config.keepalive_interval,
                config.keepalive_timeout,
            ),
            cancel.cancelled(),
        );
    // Streams end at shutdown when their clients read; one whose client does not must not hold
    // the process: after the grace it is cut.
    let grace = config.shutdown_grace;
    tokio::select! {
        served = served => Ok(served?),
        () = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "connections still open after the shutdown grace; cut");
            Ok(())
        }
    }
}

/// The JSON body of every plain-HTTP error: `{"error_code": …, "message": …}`.
pub fn error_body(code: &str, message: &str) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "error_code": code, "message": message }))
}

/// An error response with a JSON [`error_body`].
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response {
    (status, error_body(code, message)).into_response()
}

/// A request no route takes: `UNIMPLEMENTED` for a gRPC call to a service this server does not
/// have, a JSON 404 for anything else.
async fn no_route(headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented("no such service").into_http::<axum::body::Body>();
    }
    error_response(StatusCode::NOT_FOUND, "NOT_FOUND", "no such path")
}

async fn wrong_method() -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
        "this path does not take that method",
    )
}

/// Accepted connections, each set up so that a peer that vanished is noticed: TCP keepalive
/// (for HTTP/1.1, which has no PING), `TCP_USER_TIMEOUT` (sent data never acknowledged, which
/// keepalive probes do not cover), and no Nagle delay for small stream messages.
/// (`serve_with_incoming` ignores the builder's socket options, so they are set here.)
fn connections(
    listener: TcpListener,
    idle: Duration,
    timeout: Duration,
) -> impl tokio_stream::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((timeout / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    TcpListenerStream::new(listener).map(move |accepted| {
        let stream = accepted?;
        let socket = socket2::SockRef::from(&stream);
        let set = stream
            .set_nodelay(true)
            .and_then(|()| socket.set_tcp_keepalive(&keepalive))
            .and_then(|()| socket.set_tcp_user_timeout(Some(idle + timeout)));
        if let Err(e) = set {
            // The connection still works; a vanished peer is only noticed later.
            tracing::warn!(error = %e, "cannot set socket options");
        }
        Ok(stream)
    })
}

/// CORS for browsers: the headers grpc-web (and connect) send, the trailers they must read.
fn cors(origins: &[String]) -> CorsLayer {
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers([
            header("authorization"),
            header("content-type"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
            header("connect-protocol-version"),
            header("connect-timeout-ms"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
            header("retry-after"),
        ])
        .max_age(Duration::from_secs(3600))
}
