//! `spawn` mode: a whole throwaway stack for one test — real Valkey, PostgreSQL and Garage from
//! `follow-testkit`, and this build's `follow-api` and `follow-image-gateway` binaries started
//! as processes with fresh keys made by `follow-api keygen`. Everything dies with the handle.

use std::time::Duration;

use anyhow::{Context, bail};
use follow_testkit::ValkeyUser as User;
use follow_testkit::{
    GarageServer, PostgresServer, ServiceProcess, ValkeyCluster, ValkeyDeployment, ValkeyServer,
};

use crate::{Backend, Platform, Service, ValkeyKind, binary};

/// The stack's Valkey: one node, or a cluster of three primaries and three replicas.
async fn start_valkey(kind: ValkeyKind) -> anyhow::Result<ValkeyDeployment> {
    Ok(match kind {
        ValkeyKind::Cluster => ValkeyDeployment::Cluster(ValkeyCluster::start().await?),
        ValkeyKind::Node => ValkeyDeployment::Node(Box::new(ValkeyServer::start().await?)),
    })
}

#[derive(Debug)]
pub(crate) struct Stack {
    valkey: ValkeyDeployment,
    _postgres: PostgresServer,
    garage: GarageServer,
    api: ServiceProcess,
    gateway: ServiceProcess,
    /// The services' settings, for more instances of them.
    api_env: Vec<(String, String)>,
    gateway_env: Vec<(String, String)>,
    more_apis: Vec<ServiceProcess>,
    more_gateways: Vec<ServiceProcess>,
}

/// Runs `follow-api args` with `env` added; its standard output, or its error.
async fn follow_api(args: &[&str], env: &[(&str, String)]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(binary("follow-api")?)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "follow-api {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A `kid=KEY` private key and its `kid=PUB` public half.
pub(crate) async fn keygen(kid: &str) -> anyhow::Result<(String, String)> {
    let text = follow_api(&["keygen", "--kid", kid], &[]).await?;
    let mut lines = text.lines().filter(|l| !l.starts_with('#'));
    match (lines.next(), lines.next()) {
        (Some(private), Some(public)) => Ok((private.to_owned(), public.to_owned())),
        _ => bail!("unexpected keygen output"),
    }
}

/// `follow-api migrate` as the database's owner: the schema, and the service role the API
/// runs as (its password from the test server).
async fn migrate(postgres: &PostgresServer) -> anyhow::Result<()> {
    let env = [
        ("FOLLOW_DATABASE_OWNER_URL", postgres.url()),
        (
            "FOLLOW_DATABASE_SERVICE_PASSWORD",
            postgres.service_password(),
        ),
    ];
    follow_api(&["migrate"], &env).await.map(drop)
}

async fn start_api(env: Vec<(String, String)>) -> anyhow::Result<ServiceProcess> {
    Ok(ServiceProcess::start(
        "follow-api",
        &binary("follow-api")?,
        &["serve"],
        env,
        "FOLLOW_API_LISTEN",
    )
    .await?)
}

async fn start_gateway(env: Vec<(String, String)>) -> anyhow::Result<ServiceProcess> {
    Ok(ServiceProcess::start(
        "follow-image-gateway",
        &binary("follow-image-gateway")?,
        &[],
        env,
        "FOLLOW_GATEWAY_LISTEN",
    )
    .await?)
}

impl Stack {
    pub(crate) async fn start(kind: ValkeyKind) -> anyhow::Result<Platform> {
        let (valkey, postgres, garage, user, upload) = tokio::join!(
            start_valkey(kind),
            PostgresServer::start(),
            GarageServer::start(),
            keygen("user-e2e"),
            keygen("upload-e2e"),
        );
        let (valkey, postgres, garage) = (valkey?, postgres?, garage?);
        let ((user_private, user_public), (upload_private, upload_public)) = (user?, upload?);
        let common = |user: User, extra: &[(&str, String)]| {
            let mut env: Vec<(String, String)> = [
                ("FOLLOW_VALKEY_URL", valkey.url_as(user)),
                ("FOLLOW_LOG_FORMAT", "text".to_owned()),
                ("FOLLOW_LOG", "info".to_owned()),
            ]
            .into_iter()
            .chain(garage.service_env())
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
            env
        };
        // The API signs upload URLs for the gateway's address, so the gateway starts first.
        // Quick leases and reconciling, so takeovers and recoveries happen within a test.
        let gateway_env = common(
            User::Gateway,
            &[
                ("FOLLOW_UPLOAD_PUBLIC_KEYS", upload_public),
                ("FOLLOW_CONSUMER_NAME", "gateway-e2e".to_owned()),
                ("FOLLOW_JOB_LEASE_SECS", "4".to_owned()),
                ("FOLLOW_S3_ATTEMPT_TIMEOUT_SECS", "2".to_owned()),
                ("FOLLOW_S3_OPERATION_TIMEOUT_SECS", "5".to_owned()),
                // The load tests are one user sending hundreds at once; the per-user limits have
                // their own tests (the services' test suites, at their defaults).
                ("FOLLOW_MAX_UPLOADS_PER_USER", "64".to_owned()),
            ],
        );
        let gateway = start_gateway(gateway_env.clone()).await?;
        migrate(&postgres).await?;
        let api_env = common(
            User::Api,
            &[
                ("FOLLOW_DATABASE_URL", postgres.service_url()),
                ("FOLLOW_USER_PUBLIC_KEYS", user_public),
                ("FOLLOW_UPLOAD_SIGNING_KEY", upload_private),
                ("FOLLOW_GATEWAY_URL", gateway.url()),
                ("FOLLOW_CONSUMER_NAME", "api-e2e".to_owned()),
                ("FOLLOW_RECONCILE_INTERVAL_SECS", "2".to_owned()),
                ("FOLLOW_UPLOAD_TOKENS_PER_MINUTE", "1000000".to_owned()),
                ("FOLLOW_UPLOAD_TOKEN_BURST", "1000000".to_owned()),
                ("FOLLOW_MAX_WATCHES_PER_USER", "10000".to_owned()),
            ],
        );
        let api = start_api(api_env.clone()).await?;
        Ok(Platform {
            api_url: api.url(),
            gateway_url: gateway.url(),
            valkey_url: valkey.url_as(User::Admin),
            partitions: Platform::partitions_from_env()?,
            database_url: postgres.url(),
            user_signing_key: user_private,
            backend: Backend::Spawn(Box::new(Self {
                valkey,
                _postgres: postgres,
                garage,
                api,
                gateway,
                api_env,
                gateway_env,
                more_apis: Vec::new(),
                more_gateways: Vec::new(),
            })),
        })
    }

    /// Starts one more `follow-api` on the same databases (its own consumer name in the group,
    /// and `more` settings) and returns its URL.
    pub(crate) async fn add_api(&mut self, more: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut env = self.api_env.clone();
        let name = format!("api-e2e-{}", self.more_apis.len() + 2);
        env.retain(|(k, _)| k != "FOLLOW_CONSUMER_NAME" && !more.iter().any(|(m, _)| k == m));
        env.push(("FOLLOW_CONSUMER_NAME".to_owned(), name));
        env.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let api = start_api(env).await?;
        let url = api.url();
        self.more_apis.push(api);
        Ok(url)
    }

    /// Starts one more `follow-image-gateway` (its own consumer name, and `more` settings) and
    /// returns its URL.
    pub(crate) async fn add_gateway(&mut self, more: &[(&str, &str)]) -> anyhow::Result<String> {
        let mut env = self.gateway_env.clone();
        let name = format!("gateway-e2e-{}", self.more_gateways.len() + 2);
        env.retain(|(k, _)| k != "FOLLOW_CONSUMER_NAME" && !more.iter().any(|(m, _)| k == m));
        env.push(("FOLLOW_CONSUMER_NAME".to_owned(), name));
        env.extend(more.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        let gateway = start_gateway(env).await?;
        let url = gateway.url();
        self.more_gateways.push(gateway);
        Ok(url)
    }

    /// The cluster, when Valkey is one.
    pub(crate) fn cluster(&mut self) -> Option<&mut ValkeyCluster> {
        self.valkey.cluster()
    }

    pub(crate) fn bucket(&self) -> (aws_sdk_s3::Client, String) {
        (self.garage.client(), self.garage.bucket().to_owned())
    }

    pub(crate) fn signal(&self, service: Service, stop: bool) -> anyhow::Result<()> {
        match (service, stop) {
            (Service::Api, true) => self.api.pause(),
            (Service::Api, false) => self.api.resume(),
            (Service::Gateway, true) => self.gateway.pause(),
            (Service::Gateway, false) => self.gateway.resume(),
            (Service::Valkey, stop) => self.valkey.signal(stop),
            (Service::Storage, true) => self.garage.pause(),
            (Service::Storage, false) => self.garage.resume(),
        }
        Ok(())
    }

    fn process(&mut self, service: Service) -> Option<&mut ServiceProcess> {
        match service {
            Service::Api => Some(&mut self.api),
            Service::Gateway => Some(&mut self.gateway),
            Service::Valkey | Service::Storage => None,
        }
    }

    pub(crate) async fn stop(&mut self, service: Service) -> anyhow::Result<()> {
        match self.process(service) {
            Some(process) => {
                process
                    .terminate(Duration::from_secs(30))
                    .await
                    .context("the service did not exit within 30 s of SIGTERM")?;
            }
            // Valkey without persistence: stopping it loses its data, as a crash of an
            // in-memory deployment would.
            None if service == Service::Valkey => self.valkey.stop().await,
            None => self.garage.stop().await,
        }
        Ok(())
    }

    pub(crate) async fn kill(&mut self, service: Service) -> anyhow::Result<()> {
        match self.process(service) {
            Some(process) => process.kill().await,
            None if service == Service::Valkey => self.valkey.stop().await,
            None => self.garage.stop().await,
        }
        Ok(())
    }

    pub(crate) async fn start_service(
        &mut self,
        service: Service,
        env: &[(&str, Option<&str>)],
    ) -> anyhow::Result<()> {
        match self.process(service) {
            Some(process) => {
                for (key, value) in env {
                    process.set_env(key, *value);
                }
                process.restart().await?;
            }
            None if service == Service::Valkey => self.valkey.restart().await?,
            None => self.garage.restart().await?,
        }
        Ok(())
    }

    /// Process ids of the API instances, the first one first.
    pub(crate) fn api_pids(&self) -> Vec<u32> {
        std::iter::once(&self.api)
            .chain(&self.more_apis)
            .filter_map(ServiceProcess::pid)
            .collect()
    }

    pub(crate) fn gateway_pid(&self) -> Option<u32> {
        self.gateway.pid()
    }

    pub(crate) fn is_running(&mut self, service: Service) -> bool {
        self.process(service).is_none_or(ServiceProcess::is_running)
    }

    pub(crate) fn log(&self, service: Service) -> String {
        match service {
            Service::Api => self.api.log(),
            Service::Gateway => self.gateway.log(),
            Service::Valkey | Service::Storage => String::new(),
        }
    }
}
