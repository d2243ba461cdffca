//! Start-up: an [`Application`] is built from a [`Config`] and a bound listener (port 0 in
//! tests), then runs until its cancellation token fires, and stops gracefully: the server stops
//! accepting, open watch streams end with `UNAVAILABLE` (clients resume with their cursor), the
//! workers finish their current step, and nothing is left running.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use follow_bus::{
    BusError, Consumer, HealthChecker, Hub, ProgressTracker, Trimmer, Valkey, ValkeyConfig, keys,
};
use follow_proto::{
    FILE_DESCRIPTOR_SET,
    api::v1::{image_service_server::ImageServiceServer, route_service_server::RouteServiceServer},
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{service::Routes, transport::Server};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    MIGRATOR,
    auth::Authenticator,
    breaker::CircuitBreaker,
    config::Config,
    http::{self, Probe},
    images::ImageService,
    metrics::Metrics,
    results::ResultApplier,
    routes::RouteService,
    state::{Limits, Shared},
    storage::Presigner,
    workers,
};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach PostgreSQL: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid Valkey settings: {0}")]
    Valkey(#[from] BusError),
    #[error("cannot serve: {0}")]
    Serve(String),
}

/// The gRPC services' names, as `grpc.health.v1` reports them.
const SERVICES: [&str; 2] = ["follow.api.v1.RouteService", "follow.api.v1.ImageService"];

pub struct Application {
    listener: TcpListener,
    config: Config,
    pool: PgPool,
    valkey: Valkey,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Connects to PostgreSQL with the pool settings of `config` (a short acquire timeout: callers
/// learn of an outage in seconds, not minutes).
pub async fn connect(config: &Config) -> Result<PgPool, StartError> {
    PgPoolOptions::new()
        .max_connections(config.database_max_connections)
        .acquire_timeout(Duration::from_secs(3))
        .connect(config.database_url.expose())
        .await
        .map_err(StartError::Database)
}

impl Application {
    /// Connects, migrates, and checks settings; serves nothing yet.
    pub async fn build(config: Config, listener: TcpListener) -> Result<Self, StartError> {
        let pool = connect(&config).await?;
        MIGRATOR.run(&pool).await?;
        let valkey = Valkey::new(ValkeyConfig::new(config.valkey_url.clone()))?;
        Ok(Self {
            listener,
            config,
            pool,
            valkey,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Serves until `cancel`, then shuts down gracefully.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StartError> {
        let Self {
            listener,
            config,
            pool,
            valkey,
        } = self;
        let tasks = TaskTracker::new();
        let metrics = Arc::new(Metrics::new());
        let progress = ProgressTracker::new(&valkey)?;
        let (hub, hub_worker) = Hub::with_channels(
            valkey.clone(),
            config.hub_channels,
            config.watch_max_lag,
            cancel.clone(),
        );
        let mut hub_worker = Some(hub_worker);
        workers::supervise(&tasks, &cancel, "progress-hub", move || {
            // The hub's command channel belongs to this one worker; it is not restarted.
            let worker = hub_worker.take();
            async move {
                if let Some(worker) = worker {
                    worker.await;
                }
            }
        });

        let consumer = Consumer::new(
            &valkey,
            workers::consumer_config(&config.consumer_name, config.result_batch),
        )?;
        let consumer_stats = consumer.stats();
        let applier = ResultApplier::new(pool.clone())
            .with_announcer(progress.clone())
            .with_metrics(Arc::clone(&metrics));
        let mut consumer = Some(consumer);
        {
            let cancel = cancel.clone();
            let valkey = valkey.clone();
            let config_name = config.consumer_name.clone();
            let batch = config.result_batch;
            workers::supervise(&tasks, &cancel.clone(), "result-consumer", move || {
                // After a panic a fresh consumer picks up where the old one left: its pending
                // entries are re-read first.
                let consumer = consumer.take().map_or_else(
                    || Consumer::new(&valkey, workers::consumer_config(&config_name, batch)),
                    Ok,
                );
                let applier = applier.clone();
                let cancel = cancel.clone();
                async move {
                    match consumer {
                        Ok(consumer) => workers::consume(consumer, applier, cancel).await,
                        Err(e) => tracing::error!(error = %e, "cannot create the consumer"),
                    }
                }
            });
        }
        {
            let valkey = valkey.clone();
            let cancel2 = cancel.clone();
            workers::supervise(&tasks, &cancel, "result-trimmer", move || {
                let trimmer = Trimmer::new(&valkey, keys::RESULT_GROUP);
                let cancel = cancel2.clone();
                async move {
                    match trimmer {
                        Ok(t) => workers::trim(t, Duration::from_secs(30), cancel).await,
                        Err(e) => tracing::error!(error = %e, "cannot create the trimmer"),
                    }
                }
            });
        }
        {
            let (pool, progress, metrics, cancel2) = (
                pool.clone(),
                progress.clone(),
                Arc::clone(&metrics),
                cancel.clone(),
            );
            let (grace, every) = (config.expiry_grace, config.expiry_interval);
            workers::supervise(&tasks, &cancel, "image-expiry", move || {
                workers::expire(
                    pool.clone(),
                    progress.clone(),
                    Arc::clone(&metrics),
                    grace,
                    every,
                    cancel2.clone(),
                )
            });
        }

        let probe = Probe {
            pool: pool.clone(),
            valkey: HealthChecker::new(&valkey, Some(keys::RESULT_GROUP))?,
            metrics: Arc::clone(&metrics),
            consumer: consumer_stats,
            hub: hub.stats(),
        };
        let (reporter, health_service) = tonic_health::server::health_reporter();
        {
            let (probe, cancel2) = (probe.clone(), cancel.clone());
            workers::supervise(&tasks, &cancel, "health-reporter", move || {
                workers::report_health(
                    probe.clone(),
                    reporter.clone(),
                    SERVICES.to_vec(),
                    Duration::from_secs(2),
                    cancel2.clone(),
                )
            });
        }

        let shared = Arc::new(Shared {
            pool,
            auth: Authenticator::new(config.user_keys.clone()),
            progress,
            breaker: CircuitBreaker::new(3, Duration::from_secs(2)),
            presigner: Presigner::new(&config.s3),
            signing_key: config.upload_signing_key.clone(),
            limits: Limits {
                gateway_url: config.gateway_url.clone(),
                upload_token_ttl: config.upload_token_ttl,
                max_file_size: config.max_file_size,
                heartbeat: config.heartbeat,
            },
            hub,
            metrics,
            // Half the pool: a stampede of watches never takes every connection from the RPCs.
            watch_db_permits: Semaphore::new((config.database_max_connections / 2).max(1) as usize),
            cancel: cancel.clone(),
        });
        // Only this service's APIs are advertised (the descriptor set holds the gateway's too).
        let reflection = SERVICES
            .iter()
            .chain(&["grpc.health.v1.Health"])
            .fold(
                tonic_reflection::server::Builder::configure()
                    .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
                    .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
                |builder, name| builder.with_service_name(*name),
            )
            .build_v1()
            .map_err(|e| StartError::Serve(e.to_string()))?;
        // grpc-web translation only in front of the gRPC services: it refuses any other
        // HTTP/1.1 request, and /health and /metrics are plain HTTP.
        let grpc = Routes::new(RouteServiceServer::new(RouteService::new(Arc::clone(
            &shared,
        ))))
        .add_service(ImageServiceServer::new(ImageService::new(Arc::clone(
            &shared,
        ))))
        .add_service(health_service)
        .add_service(reflection)
        .prepare()
        .into_axum_router()
        .layer(tonic_web::GrpcWebLayer::new());
        let routes = Routes::from(grpc.merge(http::router(probe)));

        let addr = listener.local_addr().ok();
        tracing::info!(?addr, "follow-api serving");
        let serve = Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(config.keepalive_interval))
            .http2_keepalive_timeout(Some(config.keepalive_timeout))
            .layer(cors(&config.cors_origins))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                connections(
                    listener,
                    config.keepalive_interval,
                    config.keepalive_timeout,
                ),
                cancel.cancelled(),
            );
        // Streams end at shutdown (with UNAVAILABLE) when their clients read; one whose client
        // does not must not hold the process: after the grace it is cut.
        let grace = config.shutdown_grace;
        let served = tokio::select! {
            served = serve => served,
            () = async { cancel.cancelled().await; tokio::time::sleep(grace).await } => {
                tracing::warn!(?grace, "connections still open after the shutdown grace; cut");
                Ok(())
            }
        };
        // However the server ended, everything else stops with it.
        cancel.cancel();
        tasks.close();
        tasks.wait().await;
        drop(shared);
        tracing::info!("follow-api stopped");
        served.map_err(|e| StartError::Serve(e.to_string()))
    }
}

/// Accepted connections, each set up so that a peer that vanished is noticed: TCP keepalive
/// (for HTTP/1.1, which has no PING), `TCP_USER_TIMEOUT` (sent data never acknowledged, which
/// keepalive probes do not cover), and no Nagle delay for small stream messages.
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

/// CORS for grpc-web from browsers: the headers grpc-web sends and the trailers it must read.
fn cors(origins: &[String]) -> CorsLayer {
    use axum::http::{HeaderName, Method};
    let allow_origin = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| o.parse().ok()))
    };
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(allow_origin)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
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
        ])
        .max_age(Duration::from_secs(3600))
}
