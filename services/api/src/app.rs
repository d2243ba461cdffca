//! Start-up: an [`Application`] is built from a [`Config`] and a bound listener (port 0 in
//! tests), then runs until its cancellation token fires, and stops gracefully: the server stops
//! accepting, open watch streams end with `UNAVAILABLE` (clients resume with their cursor), the
//! workers finish their current step, and nothing is left running.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use follow_bus::{
    BusError, ConsumerConfig, ConsumerStats, Epochs, HealthChecker, Hub, Producer, ProgressTracker,
    RateLimiter, UploadGuard, Valkey, keys,
};
use follow_proto::api::v1::{
    image_service_server::ImageServiceServer, route_service_server::RouteServiceServer,
};
use follow_service::{
    app::{self, Served, Shell},
    config::ExposeSecret as _,
    limits::Tally,
    metrics::Registry,
    s3::Bucket,
    serve::ServeError,
    workers::Workers,
};
use sqlx::{PgPool, postgres::PgPoolOptions};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::service::{Routes, interceptor::InterceptedService};

use crate::{
    auth::{Authenticator, interceptor},
    breaker::CircuitBreaker,
    config::Config,
    http::ApiProbe,
    images::ImageService,
    metrics::Metrics,
    reconciler::Reconciler,
    results::ResultApplier,
    routes::RouteService,
    state::{Limits, Shared},
};

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot reach PostgreSQL: {0}")]
    Database(#[source] sqlx::Error),
    #[error(transparent)]
    Schema(#[from] crate::schema::SchemaError),
    #[error("invalid Valkey settings: {0}")]
    Valkey(#[from] BusError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The gRPC services' names, as reflection and `grpc.health.v1` report them.
const SERVICES: &[&str] = &["follow.api.v1.RouteService", "follow.api.v1.ImageService"];
/// The largest `RouteService` request read: a 100-waypoint `CreateRouteWithWaypoints` with
/// the longest name and request id is about 5 KiB.
const MAX_ROUTE_REQUEST_BYTES: usize = 32 * 1024;
/// The largest `ImageService` request read: a watch of 100 image ids is about 4 KiB.
const MAX_IMAGE_REQUEST_BYTES: usize = 16 * 1024;

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
        .connect(config.database_url.expose_secret())
        .await
        .map_err(StartError::Database)
}

impl Application {
    /// Connects, checks the schema is this build's (`follow-api migrate` makes it so) and the
    /// settings; serves nothing yet.
    pub async fn build(config: Config, listener: TcpListener) -> Result<Self, StartError> {
        let pool = connect(&config).await?;
        crate::schema::check(&pool).await?;
        let valkey = Valkey::new(config.valkey.config())?;
        valkey.claim_partitions().await?;
        Ok(Self {
            listener,
            config,
            pool,
            valkey,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        app::local_addr(&self.listener, self.config.server.listen)
    }

    /// Serves until `cancel`, then shuts down gracefully.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StartError> {
        let Self {
            listener,
            config,
            pool,
            valkey,
        } = self;
        let shell = Shell::new("follow-api", cancel.clone());
        let workers = &shell.workers;
        let mut registry = Registry::with_prefix("follow_api");
        let metrics = Arc::new(Metrics::register(&mut registry));
        let progress = ProgressTracker::new(&valkey)?;
        let bucket = Bucket::new(&config.s3);
        bucket.register(&mut registry);
        let hub = Arc::new(Hub::new(valkey.clone(), config.watch_max_lag));
        workers.hub(&hub);
        let parts = Parts {
            pool: &pool,
            valkey: &valkey,
            progress: &progress,
            bucket: &bucket,
            metrics: &metrics,
            hub: &hub,
        };
        let (consumer_stats, queue) = result_workers(workers, &config, parts)?;
        let probe = ApiProbe {
            pool: pool.clone(),
            valkey: queue,
            workers: workers.clone(),
            metrics: Arc::clone(&metrics),
            registry: Arc::new(registry),
            consumer: consumer_stats,
            hub: hub.stats(),
        };

        let shared = Arc::new(Shared {
            pool: pool.clone(),
            progress,
            breaker: CircuitBreaker::new(3, Duration::from_secs(2)),
            bucket,
            signing_key: config.upload_signing_key.clone(),
            limits: Limits {
                gateway_url: config.gateway_url.clone(),
                upload_token_ttl: config.upload_token_ttl,
                max_file_size: config.max_file_size,
                heartbeat: config.heartbeat,
                recheck: config.watch_recheck,
                preview_url_ttl: config.preview_url_ttl,
                expiry_grace: config.expiry_grace,
            },
            hub,
            metrics,
            // Half the pool: a stampede of watches never takes every connection from the RPCs.
            watch_db_permits: Semaphore::new((config.database_max_connections / 2).max(1) as usize),
            token_rate: RateLimiter::new(
                &valkey,
                "upload-tokens",
                config.upload_tokens_per_minute,
                config.upload_token_burst,
            )?,
            watches: Tally::new(config.max_watches_per_user),
            cancel: cancel.clone(),
        });
        let served = Served {
            grpc: grpc(&shared, &config),
            names: SERVICES,
            public: axum::Router::new(),
            probe,
        };
        let served = shell.serve(listener, &config.server, served).await;
        drop(shared);
        pool.close().await;
        Ok(served?)
    }
}

/// What the result workers share with the rest of the instance.
struct Parts<'a> {
    pool: &'a PgPool,
    valkey: &'a Valkey,
    progress: &'a ProgressTracker,
    bucket: &'a Bucket,
    metrics: &'a Arc<Metrics>,
    /// Where the reconciler hears of uploads that begin, and of lost subscriptions.
    hub: &'a Hub,
}

/// The workers that carry results into PostgreSQL: the `image:result` consumers, their trimmer
/// and the reconciler. Returns the consumers' counters and the result queue's checker.
fn result_workers(
    workers: &Workers,
    config: &Config,
    parts: Parts<'_>,
) -> Result<(Arc<ConsumerStats>, HealthChecker), StartError> {
    let Parts {
        pool,
        valkey,
        progress,
        bucket,
        metrics,
        hub,
    } = parts;
    let applier = ResultApplier::new(pool.clone())
        .with_announcer(progress.clone())
        .with_metrics(Arc::clone(metrics));
    let consumer_config = ConsumerConfig {
        batch_size: config.result_batch,
        max_failures: config.result_max_failures,
        ..ConsumerConfig::new(keys::RESULTS, config.consumer_name.clone())
    };
    let consumer_stats = Arc::new(ConsumerStats::default());
    workers.consume(
        "result-consumer",
        valkey,
        consumer_config,
        Arc::clone(&consumer_stats),
        applier.clone(),
    );
    workers.trim("result-trimmer", valkey, keys::RESULTS);
    let queue = HealthChecker::new(valkey, Some(keys::RESULTS))?;
    let reconciler = Reconciler {
        pool: pool.clone(),
        bucket: bucket.clone(),
        producer: Producer::new(valkey)?,
        guard: UploadGuard::new(valkey)?,
        valkey: queue.clone(),
        epochs: Epochs::new(valkey)?,
        applier,
        announcer: progress.clone(),
        metrics: Arc::clone(metrics),
        hub: hub.stats(),
        uploads: Arc::new(tokio::sync::Mutex::new(hub.uploads())),
        every: config.reconcile_interval,
        grace: config.expiry_grace,
    };
    let cancel = workers.cancel().clone();
    workers.supervise("reconciler", move || reconciler.clone().run(cancel.clone()));
    Ok((consumer_stats, queue))
}

/// The API's gRPC services. Every call is authenticated from its headers before its message is
/// read, and no message larger than its method needs is read at all.
fn grpc(shared: &Arc<Shared>, config: &Config) -> Routes {
    let auth = interceptor(Arc::new(Authenticator::new(
        config.user_keys.clone(),
        config.token_leeway,
    )));
    let routes = RouteServiceServer::new(RouteService::new(Arc::clone(shared)))
        .max_decoding_message_size(MAX_ROUTE_REQUEST_BYTES);
    let images = ImageServiceServer::new(ImageService::new(Arc::clone(shared)))
        .max_decoding_message_size(MAX_IMAGE_REQUEST_BYTES);
    Routes::new(InterceptedService::new(routes, auth.clone()))
        .add_service(InterceptedService::new(images, auth))
}
