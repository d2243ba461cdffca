//! Black-box end-to-end tests of the whole platform: only its public surfaces (gRPC through the
//! generated clients, grpc-web, HTTP, the services' command lines) and the state it leaves in
//! Valkey, PostgreSQL and S3 — never service code.
//!
//! [`Platform::start`] provides the stack a test runs against, chosen by `FOLLOW_E2E_MODE`:
//!
//! | mode | what runs | process control (stop, kill, restart) |
//! |---|---|---|
//! | `spawn` (default) | a throwaway stack per test on free loopback ports: Valkey, PostgreSQL, Garage from `follow-testkit`, and the `follow-api` / `follow-image-gateway` binaries of this build | yes |
//! | `local` | a running stack (`./dev up`) named by `FOLLOW_E2E_*` variables ([`local`]) | no: scenarios that need it say so and pass |
//! | `compose` | `compose.yaml` brought up as its own project per test, on free ports, where a Docker engine exists | yes, through `docker compose` |
//!
//! Tests in `local` mode share one stack: each isolates itself with its own user and routes.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used)]

pub mod client;
mod compose;
pub mod local;
pub mod observe;
pub mod relay;
mod spawn;
pub mod user;
mod valkey;

pub use valkey::ValkeyConnection;

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, bail};
pub use follow_keys::keys::{self, Partitions};
use follow_proto::{
    api::v1::{image_service_client::ImageServiceClient, route_service_client::RouteServiceClient},
    tonic::transport::{Channel, Endpoint},
};

/// A service of the platform a scenario can stop, kill or start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    Api,
    Gateway,
    Valkey,
    /// The S3 server.
    Storage,
}

/// The stack one test runs against.
#[derive(Debug)]
pub struct Platform {
    pub api_url: String,
    pub gateway_url: String,
    pub valkey_url: String,
    /// The partitions of the work streams (`FOLLOW_VALKEY_PARTITIONS`, as the services read it).
    pub partitions: Partitions,
    pub database_url: String,
    user_signing_key: String,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Spawn(Box<spawn::Stack>),
    Compose(compose::Project),
    Local,
}

/// The Valkey a spawned stack runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValkeyKind {
    /// One node.
    Node,
    /// A cluster of three primaries and three replicas.
    Cluster,
}

impl ValkeyKind {
    /// `FOLLOW_E2E_VALKEY`: `node` (the default) or `cluster`.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("FOLLOW_E2E_VALKEY").as_deref() {
            Ok("cluster") => Ok(Self::Cluster),
            Ok("node") | Err(_) => Ok(Self::Node),
            Ok(other) => bail!("FOLLOW_E2E_VALKEY={other}: expected node or cluster"),
        }
    }
}

impl Platform {
    /// Starts (or finds) the stack for `FOLLOW_E2E_MODE` (and `FOLLOW_E2E_VALKEY`) and waits
    /// until both services' `/health` say ok.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_on(ValkeyKind::from_env()?).await
    }

    /// [`Platform::start`] on the Valkey `kind` (which only a spawned stack can choose).
    pub async fn start_on(kind: ValkeyKind) -> anyhow::Result<Self> {
        let mode = std::env::var("FOLLOW_E2E_MODE").unwrap_or_else(|_| "spawn".into());
        if mode != "spawn" && kind == ValkeyKind::Cluster {
            bail!("FOLLOW_E2E_MODE={mode} cannot start a Valkey Cluster (spawn mode does)");
        }
        let platform = match mode.as_str() {
            "spawn" => spawn::Stack::start(kind).await?,
            "local" => local::platform()?,
            "compose" => compose::Project::up().await?,
            other => bail!("FOLLOW_E2E_MODE={other}: expected spawn, local or compose"),
        };
        for url in [&platform.api_url, &platform.gateway_url] {
            platform.wait_healthy(url).await;
        }
        Ok(platform)
    }

    /// Whether this mode can stop and start services (not `local`). Scenarios that need it
    /// print why they did nothing when it cannot.
    pub fn controls_processes(&self) -> bool {
        !matches!(self.backend, Backend::Local)
    }

    /// [`Platform::controls_processes`], saying the scenario is skipped (and why: `needs`)
    /// when it cannot.
    pub fn can_control(&self, needs: &str) -> bool {
        let can = self.controls_processes();
        if !can {
            eprintln!("skipped: needs {needs}");
        }
        can
    }

    /// Whether the stack is this test's own processes (spawn mode: API instances added,
    /// frozen, built with failpoints), saying the scenario is skipped (and why) when not.
    pub fn is_spawned(&self, needs: &str) -> bool {
        let spawned = matches!(self.backend, Backend::Spawn(_));
        if !spawned {
            eprintln!("skipped: needs spawn mode ({needs})");
        }
        spawned
    }

    /// Stops `service` gracefully (SIGTERM, waiting for it to exit).
    pub async fn stop(&mut self, service: Service) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::Spawn(stack) => stack.stop(service).await,
            Backend::Compose(project) => project.run(&["stop", project.name_of(service)]).await,
            Backend::Local => bail!("local mode cannot stop services"),
        }
    }

    /// Kills `service` with SIGKILL, like a crash.
    pub async fn kill(&mut self, service: Service) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::Spawn(stack) => stack.kill(service).await,
            Backend::Compose(project) => {
                project
                    .run(&["kill", "-s", "SIGKILL", project.name_of(service)])
                    .await
            }
            Backend::Local => bail!("local mode cannot kill services"),
        }
    }

    /// Starts a stopped or killed `service` again with its usual settings plus `env`, and for
    /// our own services waits until its `/health` says ok.
    pub async fn start_service(
        &mut self,
        service: Service,
        env: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        match &mut self.backend {
            Backend::Spawn(stack) => stack.start_service(service, env).await?,
            Backend::Compose(project) => {
                if !env.is_empty() {
                    bail!("compose mode cannot change a service's environment");
                }
                project.run(&["start", project.name_of(service)]).await?;
            }
            Backend::Local => bail!("local mode cannot start services"),
        }
        let url = match service {
            Service::Api => &self.api_url,
            Service::Gateway => &self.gateway_url,
            Service::Valkey | Service::Storage => return Ok(()),
        };
        self.wait_healthy(url).await;
        Ok(())
    }

    /// Freezes `service` (`SIGSTOP`): its connections stay open and nothing answers (spawn
    /// mode).
    pub fn pause(&self, service: Service) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Spawn(stack) => stack.signal(service, true),
            _ => bail!("only spawn mode freezes services"),
        }
    }

    /// Lets a paused `service` go on (`SIGCONT`).
    pub fn resume(&self, service: Service) -> anyhow::Result<()> {
        match &self.backend {
            Backend::Spawn(stack) => stack.signal(service, false),
            _ => bail!("only spawn mode freezes services"),
        }
    }

    /// Starts another `follow-image-gateway` on the same stack (spawn mode), with the usual
    /// settings plus `env`, and returns its URL.
    pub async fn add_gateway(&mut self, env: &[(&str, &str)]) -> anyhow::Result<String> {
        let url = match &mut self.backend {
            Backend::Spawn(stack) => stack.add_gateway(env).await?,
            _ => bail!("only spawn mode starts more gateways"),
        };
        self.wait_healthy(&url).await;
        Ok(url)
    }

    /// The Valkey Cluster the platform runs on (spawn mode with `FOLLOW_E2E_VALKEY=cluster`).
    pub fn valkey_cluster(&mut self) -> Option<&mut follow_testkit::ValkeyCluster> {
        match &mut self.backend {
            Backend::Spawn(stack) => stack.cluster(),
            _ => None,
        }
    }

    /// The bucket the platform stores images in (spawn mode): a client and the bucket's name.
    pub fn bucket(&self) -> Option<(aws_sdk_s3::Client, String)> {
        match &self.backend {
            Backend::Spawn(stack) => Some(stack.bucket()),
            _ => None,
        }
    }

    /// Starts another `follow-api` instance on the same stack (spawn mode), with the usual
    /// settings plus `env`, and returns its URL: instances share nothing but Valkey and
    /// PostgreSQL, with no sticky routing between them.
    pub async fn add_api(&mut self, env: &[(&str, &str)]) -> anyhow::Result<String> {
        let url = match &mut self.backend {
            Backend::Spawn(stack) => stack.add_api(env).await?,
            _ => bail!("only spawn mode starts more API instances"),
        };
        self.wait_healthy(&url).await;
        Ok(url)
    }

    /// `ImageService` of the API instance at `url`.
    pub async fn images_at(&self, url: &str) -> anyhow::Result<ImageServiceClient<Channel>> {
        Ok(ImageServiceClient::new(channel(url).await?))
    }

    /// Whether `service`'s process is running (spawn mode; `None` where it cannot be told).
    pub fn is_running(&mut self, service: Service) -> Option<bool> {
        match &mut self.backend {
            Backend::Spawn(stack) => Some(stack.is_running(service)),
            _ => None,
        }
    }

    /// Process ids of the API instances (spawn mode), for memory figures.
    pub fn api_pids(&self) -> Vec<u32> {
        match &self.backend {
            Backend::Spawn(stack) => stack.api_pids(),
            _ => Vec::new(),
        }
    }

    /// The gateway's process id (spawn mode), for memory figures.
    pub fn gateway_pid(&self) -> Option<u32> {
        match &self.backend {
            Backend::Spawn(stack) => stack.gateway_pid(),
            _ => None,
        }
    }

    /// The last lines a service wrote (spawn mode), for failure messages.
    pub fn log(&self, service: Service) -> String {
        match &self.backend {
            Backend::Spawn(stack) => stack.log(service),
            _ => String::new(),
        }
    }

    /// A user token for `sub`, minted with `follow-api token` from the stack's user key.
    pub async fn token(&self, sub: &str) -> anyhow::Result<String> {
        let out = tokio::process::Command::new(binary("follow-api")?)
            .args(["token", "--sub", sub, "--ttl-secs", "3600"])
            .env("FOLLOW_USER_SIGNING_KEY", &self.user_signing_key)
            .output()
            .await?;
        if !out.status.success() {
            bail!("follow-api token: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    pub async fn routes(&self) -> anyhow::Result<RouteServiceClient<Channel>> {
        Ok(RouteServiceClient::new(channel(&self.api_url).await?))
    }

    pub async fn images(&self) -> anyhow::Result<ImageServiceClient<Channel>> {
        self.images_at(&self.api_url).await
    }

    /// `ImageService` over grpc-web on HTTP/1.1, as a browser speaks it.
    pub fn images_web(&self) -> anyhow::Result<ImageServiceClient<client::GrpcWeb>> {
        self.images_web_at(&self.api_url)
    }

    /// [`Platform::images_web`] of the API instance at `url`.
    pub fn images_web_at(&self, url: &str) -> anyhow::Result<ImageServiceClient<client::GrpcWeb>> {
        Ok(ImageServiceClient::with_origin(
            client::grpc_web(),
            url.parse()?,
        ))
    }

    /// A connection to Valkey (one node, or the cluster) as its operator.
    pub async fn valkey(&self) -> anyhow::Result<ValkeyConnection> {
        valkey::connect(&self.valkey_url).await
    }

    /// Whether Valkey is a cluster.
    pub fn is_cluster(&self) -> bool {
        valkey::is_cluster(&self.valkey_url)
    }

    /// The command the services publish progress with: `SPUBLISH` on a cluster.
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The payloads published on `channel` from now on.
    pub async fn messages(
        &self,
        channel: String,
    ) -> anyhow::Result<impl futures_util::Stream<Item = Vec<u8>> + Unpin + use<>> {
        valkey::messages(&self.valkey_url, channel).await
    }

    /// The partitions the services were started with: `FOLLOW_VALKEY_PARTITIONS`, else the
    /// default.
    pub(crate) fn partitions_from_env() -> anyhow::Result<Partitions> {
        std::env::var("FOLLOW_VALKEY_PARTITIONS").map_or(Ok(Partitions::DEFAULT), |p| {
            p.parse().map_err(anyhow::Error::msg)
        })
    }

    pub async fn database(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.database_url)
            .await?)
    }

    /// `GET {url}/health` as `(status, body)`.
    pub async fn health(&self, url: &str) -> anyhow::Result<(u16, serde_json::Value)> {
        let response = reqwest::get(format!("{url}/health")).await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or_default()))
    }

    /// The value of the Prometheus sample `name` (with its labels, as exposed) at `{url}/metrics`;
    /// 0 when it is not there yet.
    pub async fn metric(&self, url: &str, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("{url}/metrics")).await?.text().await?;
        Ok(text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0.0))
    }

    /// Polls `{url}/health` until it says ok (panics after a minute, as a test's wait does).
    async fn wait_healthy(&self, url: &str) {
        let what = format!("{url}/health to say ok");
        follow_testkit::eventually_async(Duration::from_secs(60), &what, || async {
            matches!(self.health(url).await, Ok((200, _))).then_some(())
        })
        .await;
    }
}

/// A fault schedule's clock: ticks every `period`, the first one `period` from now. Faults are
/// injected on a schedule (kill every second, a body paced slower than its token), not slept
/// towards; missed ticks are skipped, never bunched.
pub fn every(period: Duration) -> tokio::time::Interval {
    let mut clock = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    clock.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    clock
}

/// The resident memory of process `pid`, in bytes (0 when it cannot be read).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// A native gRPC (HTTP/2) channel to `url`.
pub async fn channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?.connect().await?)
}

/// A binary of this build: `FOLLOW_E2E_BIN_DIR`, else the target directory this test was built
/// into (`target/<profile>/`, next to `deps/`).
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("FOLLOW_E2E_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe()?;
            let deps = exe.parent().context("test binary without a directory")?;
            deps.parent()
                .context("test binary outside target/")?
                .to_path_buf()
        }
    };
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} not found: build the workspace first (`cargo build --workspace`; ./dev test does) or set FOLLOW_E2E_BIN_DIR",
            path.display()
        );
    }
    Ok(path)
}
