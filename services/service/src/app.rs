//! The skeleton both services run in, written once: each builds its parts into a [`Shell`]
//! (its workers, on the one shutdown token) and hands it what it serves; the shell wires
//! `grpc.health.v1` to the service's health probe, serves, and on shutdown stops every worker.

use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

use crate::{
    config::ServerConfig,
    health::{self, Probe},
    serve::{ServeError, Surface, serve},
    workers::Workers,
};

/// What a service serves: its own gRPC services (named for reflection and health) and its
/// public HTTP routes; `/health` and `/metrics` come from its probe.
#[derive(Debug)]
pub struct Served<P> {
    pub grpc: Routes,
    pub names: &'static [&'static str],
    pub public: Router,
    pub probe: P,
}

/// A service being run: its name (for logs) and its workers.
#[derive(Debug)]
pub struct Shell {
    name: &'static str,
    pub workers: Workers,
}

impl Shell {
    pub fn new(name: &'static str, cancel: CancellationToken) -> Self {
        Self {
            name,
            workers: Workers::new(cancel),
        }
    }

    /// The shutdown token everything of the service stops on.
    pub fn cancel(&self) -> &CancellationToken {
        self.workers.cancel()
    }

    /// Serves `served` on `listener` until the shutdown token fires, then stops every worker;
    /// however serving ended, nothing of the service is left running.
    pub async fn serve<P: Probe>(
        self,
        listener: TcpListener,
        config: &ServerConfig,
        served: Served<P>,
    ) -> Result<(), ServeError> {
        let (reporter, health_service) = tonic_health::server::health_reporter();
        self.workers
            .report_health(served.probe.clone(), reporter, served.names);
        let surface = Surface {
            grpc: served.grpc.add_service(health_service),
            names: served.names,
            public: served.public,
            ops: health::router(served.probe),
        };
        let result = serve(listener, surface, config, self.cancel().clone()).await;
        self.workers.stop().await;
        tracing::info!(service = self.name, "stopped");
        result
    }
}

/// Where `listener` serves (the real port when bound to port 0), or `configured` if the
/// socket cannot tell.
pub fn local_addr(listener: &TcpListener, configured: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(configured)
}
