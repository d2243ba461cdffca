//! Serving a service's one port: its gRPC services with `grpc.health.v1` and reflection,
//! grpc-web for browsers, CORS (from config) on the public surface only, plain HTTP beside
//! them, HTTP/2 and TCP keepalive with `TCP_NODELAY` on every connection, a cap on the calls one
//! connection may have open, JSON `{error_code, message}` for every request no route takes, and a
//! graceful shutdown that cuts what is still open after the grace.
//!
//! Each connection is told apart by its first bytes, peeked: HTTP/2 (native gRPC, grpc-web
//! through an HTTP/2 proxy) goes to tonic's server, HTTP/1.1 (grpc-web from a browser over plain
//! HTTP, uploads, `/health`) to hyper's HTTP/1 server directly. tonic's own detection reads
//! those bytes and hands them back to hyper as a separate first read, which makes hyper double
//! its 8 KiB read buffer on every HTTP/1.1 connection: ~6 KiB more per idle grpc-web stream
//! (`./dev bench live`).

use std::{pin::pin, time::Duration};

use axum::{
    Json, Router,
    http::{HeaderMap, HeaderName, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_proto::FILE_DESCRIPTOR_SET;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_stream::{StreamExt as _, wrappers::ReceiverStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
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
    let public = grpc
        .merge(surface.public)
        .method_not_allowed_fallback(wrong_method)
        .fallback(no_route);
    // CORS answers every `OPTIONS` itself; one that is no preflight (a tus client asking what
    // the server speaks) goes to the routes.
    let with_cors = public.clone().layer(cors(&config.cors_origins));
    let steer = tower::service_fn(move |request: axum::extract::Request| {
        let preflight = request.method() == Method::OPTIONS
            && request
                .headers()
                .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
        let to = if preflight || request.method() != Method::OPTIONS {
            with_cors.clone()
        } else {
            public.clone()
        };
        tower::ServiceExt::oneshot(to, request)
    });
    let app = surface
        .ops
        .method_not_allowed_fallback(wrong_method)
        .fallback_service(steer);
    tracing::info!(addr = ?listener.local_addr().ok(), "serving");
    let (http2, accepted) = mpsc::channel(64);
    let grpc = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .add_routes(Routes::from(app.clone()))
        .serve_with_incoming_shutdown(
            ReceiverStream::new(accepted).map(Ok::<_, std::io::Error>),
            cancel.cancelled(),
        );
    let served = async {
        let ((), grpc) = tokio::join!(accept(listener, config, app, http2, &cancel), grpc);
        grpc
    };
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

/// How long a new connection has to send its first bytes (hyper's own limit for a request's
/// head).
const FIRST_BYTES: Duration = Duration::from_secs(30);

/// Accepts connections until `cancel`, each set up and handed over by its protocol: HTTP/2 to
/// tonic's server through `http2`, HTTP/1.1 served here. Returns once every HTTP/1.1
/// connection has finished (after `cancel` each finishes the request it is in).
async fn accept(
    listener: TcpListener,
    config: &ServerConfig,
    app: Router,
    http2: mpsc::Sender<TcpStream>,
    cancel: &CancellationToken,
) {
    let connections = TaskTracker::new();
    let mut pause = follow_bus::Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        let stream = tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    pause.reset();
                    stream
                }
                Err(e) => {
                    // Out of file descriptors, typically: try again once some have closed.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(pause.delay()).await;
                    continue;
                }
            },
        };
        set_up(&stream, config.keepalive_interval, config.keepalive_timeout);
        let (app, http2, cancel) = (app.clone(), http2.clone(), cancel.clone());
        connections.spawn(async move {
            let protocol = tokio::select! {
                () = cancel.cancelled() => return,
                protocol = tokio::time::timeout(FIRST_BYTES, protocol(&stream)) => protocol,
            };
            match protocol {
                Ok(Some(Protocol::Http2)) => {
                    // Refused only once the server has stopped taking connections.
                    let _ = http2.send(stream).await;
                }
                Ok(Some(Protocol::Http1)) => serve_http1(stream, app, &cancel).await,
                // Closed, or silent for too long.
                Ok(None) | Err(_) => {}
            }
        });
    }
    drop(listener);
    connections.close();
    connections.wait().await;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    Http2,
}

/// The protocol of a connection, from its first bytes, peeked (left for the server to read):
/// HTTP/2 with prior knowledge begins with its preface, `PRI * HTTP/2.0…`, and no HTTP/1
/// request begins with `PRI`. `None` when the peer closes first.
async fn protocol(stream: &TcpStream) -> Option<Protocol> {
    const PREFACE: &[u8; 3] = b"PRI";
    let mut first = [0; PREFACE.len()];
    loop {
        let n = stream.peek(&mut first).await.ok()?;
        if n == 0 {
            return None;
        }
        if first[..n] != PREFACE[..n] {
            return Some(Protocol::Http1);
        }
        if n == PREFACE.len() {
            return Some(Protocol::Http2);
        }
        // The preface's first byte or two arrived alone (peeking again would return at once).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The most an HTTP/1.1 connection buffers of what its client sent (a request's head must fit).
const HTTP1_MAX_BUF: usize = 32 * 1024;

/// Serves one HTTP/1.1 connection until it closes; after `cancel`, until the request it is in
/// has been answered.
async fn serve_http1(stream: TcpStream, app: Router, cancel: &CancellationToken) {
    let connection = hyper::server::conn::http1::Builder::new()
        // A timer makes hyper enforce its limit on the time a request's head may take.
        .timer(TokioTimer::new())
        // hyper's read buffer grows with what a body sends at once (to ~400 KiB by default) and
        // stays that large for the connection's life: a slow upload would hold it for minutes.
        // 32 KiB still takes any request head follow expects.
        .max_buf_size(HTTP1_MAX_BUF)
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app));
    let mut connection = pin!(connection);
    let served = tokio::select! {
        served = connection.as_mut() => served,
        () = cancel.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP/1.1 connection ended with an error");
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

/// Sets up an accepted connection so that a peer that vanished is noticed: TCP keepalive (for
/// HTTP/1.1, which has no PING), `TCP_USER_TIMEOUT` (sent data never acknowledged, which
/// keepalive probes do not cover), and no Nagle delay for small stream messages.
fn set_up(stream: &TcpStream, idle: Duration, timeout: Duration) {
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((timeout / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    let socket = socket2::SockRef::from(stream);
    let set = stream
        .set_nodelay(true)
        .and_then(|()| socket.set_tcp_keepalive(&keepalive))
        .and_then(|()| socket.set_tcp_user_timeout(Some(idle + timeout)));
    if let Err(e) = set {
        // The connection still works; a vanished peer is only noticed later.
        tracing::warn!(error = %e, "cannot set socket options");
    }
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
        .allow_methods([
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header("authorization"),
            header("content-type"),
            // Resumable uploads (tus).
            header("tus-resumable"),
            header("upload-length"),
            header("upload-offset"),
            header("upload-metadata"),
            header("x-requested-with"),
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
            header("location"),
            header("tus-resumable"),
            header("tus-version"),
            header("tus-extension"),
            header("tus-max-size"),
            header("upload-offset"),
            header("upload-length"),
            header("upload-expires"),
        ])
        .max_age(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    /// What [`protocol`] makes of a connection whose peer sends `parts` one after another
    /// (each a separate write), then closes.
    async fn told(parts: &[&'static [u8]]) -> Option<Protocol> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.set_nodelay(true).unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let parts = parts.to_vec();
        let writer = tokio::spawn(async move {
            for part in parts {
                client.write_all(part).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let told = tokio::time::timeout(Duration::from_secs(10), protocol(&server))
            .await
            .expect("told within 10 s");
        writer.await.unwrap();
        // Peeked, not read: the server still gets every byte.
        let mut first = [0; 1];
        if told.is_some() {
            assert_eq!(server.peek(&mut first).await.unwrap(), 1);
        }
        told
    }

    #[tokio::test]
    async fn connections_are_told_apart_by_their_first_bytes() {
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(told(&[preface]).await, Some(Protocol::Http2));
        assert_eq!(
            told(&[b"P", b"R", b"I * HTTP/2.0"]).await,
            Some(Protocol::Http2)
        );
        for http1 in [
            &b"POST /follow.api.v1.ImageService/WatchImageStatus HTTP/1.1\r\n"[..],
            b"PUT /upload/x HTTP/1.1\r\n",
            b"GET /health HTTP/1.1\r\n",
            b"OPTIONS * HTTP/1.1\r\n",
        ] {
            assert_eq!(told(&[http1]).await, Some(Protocol::Http1));
        }
        assert_eq!(
            told(&[b"P", b"OST / HTTP/1.1\r\n"]).await,
            Some(Protocol::Http1)
        );
        assert_eq!(told(&[]).await, None);
    }
}
