//! Start-up from a [`Config`] and a bound listener (port 0 in tests), and graceful shutdown:
//! stop accepting, let uploads being received finish (up to the shutdown grace), let each
//! worker finish the job in hand, stop. Nothing an upload was promised lives only here: an
//! accepted upload's original is in S3 and its job in `image:jobs`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use follow_bus::{
    BusError, ConsumerConfig, ConsumerStats, HealthChecker, Hub, Producer, ProgressTracker,
    Resumables, UploadGuard, Valkey, keys,
};
use follow_proto::gateway::v1::gateway_service_server::GatewayServiceServer;
use follow_service::{
    app::{self, Served, Shell},
    limits::Tally,
    metrics::Registry,
    s3::Bucket,
    serve::ServeError,
    workers::Workers,
};
use follow_token::Verifier;
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{
    config::{Config, JobConfig},
    http::{self, GatewayProbe},
    metrics::Metrics,
    service::GatewayService,
    spool::Spool,
    upload::{Gateway, Sweeper},
    worker::JobHandler,
};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid Valkey settings: {0}")]
    Valkey(#[from] BusError),
    #[error("cannot open the spool directory: {0}")]
    Spool(#[from] std::io::Error),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// The gRPC services of the gateway, as reflection and health name them.
const SERVICES: &[&str] = &["follow.gateway.v1.GatewayService"];
/// The largest request message the gateway's gRPC methods read (theirs are an image id).
const MAX_REQUEST_BYTES: usize = 4 * 1024;

#[derive(Debug)]
pub struct Application {
    listener: TcpListener,
    config: Config,
    valkey: Valkey,
}

impl Application {
    pub fn build(config: Config, listener: TcpListener) -> Result<Self, StartError> {
        let valkey = Valkey::new(config.valkey.config())?;
        Ok(Self {
            listener,
            config,
            valkey,
        })
    }

    /// Where it serves (the listener's address: the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        app::local_addr(&self.listener, self.config.server.listen)
    }

    /// Serves until `cancel`, then stops gracefully (see the module doc).
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StartError> {
        let (listener, valkey, config) = (self.listener, self.valkey, self.config);
        valkey.claim_partitions().await?;
        let shell = Shell::new("follow-image-gateway", cancel.clone());
        let workers = &shell.workers;
        let mut registry = Registry::with_prefix("follow_gateway");
        let metrics = Arc::new(Metrics::register(&mut registry));
        let bucket = Bucket::new(&config.s3);
        bucket.register(&mut registry);
        let progress = ProgressTracker::new(&valkey)?;
        let gateway = Arc::new(Gateway {
            verifier: Verifier::new(config.upload_keys.clone())
                .with_leeway(config.token_leeway.as_secs()),
            guard: UploadGuard::new(&valkey)?,
            progress: progress.clone(),
            producer: Producer::new(&valkey)?,
            bucket: bucket.clone(),
            receiving: Arc::new(Semaphore::new(config.receive.max_receiving)),
            uploads_per_user: Tally::new(config.receive.max_uploads_per_user),
            spool: Spool::open(&config.receive.spool_dir)?,
            metrics: Arc::clone(&metrics),
            holder: config.jobs.consumer_name.clone(),
            resumables: Resumables::new(&valkey)?,
            config: config.clone(),
        });
        let sweeper = Sweeper {
            gateway: Arc::clone(&gateway),
        };
        let cancel_sweep = cancel.clone();
        workers.supervise("resumable-sweeper", move || {
            sweeper.clone().run(cancel_sweep.clone())
        });

        let consumers = Arc::new(ConsumerStats::default());
        let handler = JobHandler {
            bucket,
            progress,
            metrics,
            pipeline: config.pipeline,
            jobs: config.jobs.clone(),
            max_bytes: config.receive.max_upload_bytes,
            slots: Arc::new(Semaphore::new(config.jobs.workers)),
        };
        consume_jobs(workers, &valkey, &config.jobs, &consumers, &handler);
        workers.trim("job-trimmer", &valkey, keys::JOBS);
        let hub = Arc::new(Hub::new(valkey.clone(), Hub::DEFAULT_MAX_LAG));
        workers.hub(&hub);
        let queue = HealthChecker::new(&valkey, None)?;
        let probe = GatewayProbe {
            gateway: Arc::clone(&gateway),
            valkey: queue.clone(),
            hub: hub.stats(),
            workers: workers.clone(),
            consumers: Arc::clone(&consumers),
            registry: Arc::new(registry),
        };
        let service = GatewayService {
            gateway: Arc::clone(&gateway),
            hub,
            queue,
            consumers,
            watches: Tally::new(config.max_watches_per_upload),
            ops_token: config.ops_token.clone(),
            cancel,
        };
        let served = Served {
            // Its requests are an image id at most: nothing larger is read before the token is.
            grpc: Routes::new(
                GatewayServiceServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES),
            ),
            names: SERVICES,
            public: http::public(gateway),
            probe,
        };
        let served = shell.serve(listener, &config.server, served).await;
        Ok(served?)
    }
}

/// The job consumers. Images spread evenly over the partitions: ceil(workers / partitions)
/// consumers on each keep every worker supplied, and each instance holds at most that many jobs
/// per partition (the others stay for other instances).
fn consume_jobs(
    workers: &Workers,
    valkey: &Valkey,
    jobs: &JobConfig,
    stats: &Arc<ConsumerStats>,
    handler: &JobHandler,
) {
    let per_partition = jobs
        .workers
        .div_ceil(usize::from(valkey.partitions().count()));
    for n in 1..=per_partition {
        let consumer = ConsumerConfig {
            batch_size: 1,
            min_idle: jobs.lease,
            reclaim_interval: (jobs.lease / 2).max(Duration::from_secs(1)),
            max_failures: jobs.max_failures,
            ..ConsumerConfig::new(keys::JOBS, format!("{}-{n}", jobs.consumer_name))
        };
        workers.consume(
            "job-worker",
            valkey,
            consumer,
            Arc::clone(stats),
            handler.clone(),
        );
    }
}
