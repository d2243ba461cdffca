//! Start-up from a [`Config`] and a bound listener (port 0 in tests), and graceful shutdown:
//! stop accepting, let in-flight images finish, publish every result they produced, stop.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use follow_bus::{
    BusError, HealthChecker, Hub, Producer, ProgressTracker, UploadGuard, Valkey, ValkeyConfig,
};
use follow_proto::{
    FILE_DESCRIPTOR_SET, gateway::v1::gateway_service_server::GatewayServiceServer,
};
use follow_token::Verifier;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{service::Routes, transport::Server};
use tonic_health::ServingStatus;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::{
    config::Config,
    http::{self, Probe},
    metrics::Metrics,
    outbox::Outbox,
    service::GatewayService,
    storage::Storage,
    upload::Gateway,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid Valkey settings: {0}")]
    Valkey(#[from] BusError),
    #[error("cannot serve: {0}")]
    Serve(String),
}

const SERVICE: &str = "follow.gateway.v1.GatewayService";

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    config: Config,
    valkey: Valkey,
}

impl Application {
    pub fn build(config: Config, listener: TcpListener) -> Result<Self, StartError> {
        let valkey = Valkey::new(ValkeyConfig::new(config.valkey_url.clone()))?;
        Ok(Self {
            listener,
            config,
            valkey,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    pub async fn run(self, cancel: CancellationToken) -> Result<(), StartError> {
        let Self {
            listener,
            config,
            valkey,
        } = self;
        // Uploads, pipelines and watch streams; then the workers that outlive them.
        let (jobs, workers) = (TaskTracker::new(), TaskTracker::new());
        let drained = CancellationToken::new();
        let outbox = Arc::new(Outbox::new(config.outbox_capacity));
        let gateway = Arc::new(Gateway {
            verifier: Verifier::new(config.upload_keys.clone()).with_leeway(5),
            guard: UploadGuard::new(&valkey)?,
            progress: ProgressTracker::new(&valkey)?,
            storage: Storage::new(&config.s3),
            outbox: Arc::clone(&outbox),
            admission: Arc::new(Semaphore::new(config.workers + config.queue)),
            workers: Arc::new(Semaphore::new(config.workers)),
            metrics: Arc::new(Metrics::new()),
            tasks: jobs.clone(),
            holder: format!("gateway-{}", std::process::id()),
            config: config.clone(),
        });
        {
            let (outbox, producer, drained) = (
                Arc::clone(&outbox),
                Producer::new(&valkey)?,
                drained.clone(),
            );
            workers.spawn(async move { outbox.publish(producer, drained).await });
        }
        let (hub, hub_worker) = Hub::new(valkey.clone(), Hub::DEFAULT_MAX_LAG, cancel.clone());
        workers.spawn(hub_worker);
        let probe = Probe {
            gateway: Arc::clone(&gateway),
            valkey: HealthChecker::new(&valkey, None)?,
        };
        let (reporter, health_service) = tonic_health::server::health_reporter();
        {
            let (probe, cancel) = (probe.clone(), cancel.clone());
            workers.spawn(async move {
                let mut last = None;
                loop {
                    let (valkey, storage) = probe.check().await;
                    let ok = valkey && storage;
                    if last != Some(ok) {
                        let status = if ok {
                            ServingStatus::Serving
                        } else {
                            ServingStatus::NotServing
                        };
                        reporter.set_service_status("", status).await;
                        reporter.set_service_status(SERVICE, status).await;
                        last = Some(ok);
                    }
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            });
        }
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(SERVICE)
            .with_service_name("grpc.health.v1.Health")
            .build_v1()
            .map_err(|e| StartError::Serve(e.to_string()))?;
        let service = GatewayService {
            gateway: Arc::clone(&gateway),
            hub: Arc::new(hub),
            cancel: cancel.clone(),
        };
        // grpc-web only in front of gRPC: it refuses other HTTP/1.1 requests (uploads, /health).
        let grpc = Routes::new(GatewayServiceServer::new(service))
            .add_service(health_service)
            .add_service(reflection)
            .prepare()
            .into_axum_router()
            .layer(tonic_web::GrpcWebLayer::new());
        let routes = Routes::from(grpc.merge(http::router(Arc::clone(&gateway), probe)));
        tracing::info!(addr = ?listener.local_addr().ok(), "follow-image-gateway serving");
        let served = Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(Duration::from_secs(20)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(cors())
            .add_routes(routes)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), cancel.cancelled())
            .await;
        cancel.cancel();
        jobs.close();
        jobs.wait().await;
        // Every pipeline is done and has queued its result: publish them, then stop.
        drained.cancel();
        workers.close();
        workers.wait().await;
        drop(gateway);
        tracing::info!("follow-image-gateway stopped");
        served.map_err(|e| StartError::Serve(e.to_string()))
    }
}

fn cors() -> CorsLayer {
    use axum::http::{HeaderName, Method};
    let header = HeaderName::from_static;
    CorsLayer::new()
        .allow_origin(AllowOrigin::any())
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::OPTIONS])
        .allow_headers([
            header("authorization"),
            header("content-type"),
            header("x-grpc-web"),
            header("x-user-agent"),
            header("grpc-timeout"),
        ])
        .expose_headers([
            header("grpc-status"),
            header("grpc-message"),
            header("grpc-status-details-bin"),
        ])
        .max_age(Duration::from_secs(3600))
}
