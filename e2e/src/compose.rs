//! `compose` mode: `compose.yaml` brought up as a project of its own per test (`docker compose
//! -p follow-e2e-…`), on free host ports and with fresh keys, and removed with its volumes when
//! the test ends. Needs a Docker engine with the compose plugin.

use std::{path::PathBuf, process::Stdio};

use anyhow::{Context, bail};

use crate::{Backend, Platform, Service, spawn::keygen};

#[derive(Debug)]
pub(crate) struct Project {
    name: String,
    file: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Project {
    pub(crate) async fn up() -> anyhow::Result<Platform> {
        let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../compose.yaml");
        let (user, upload) = tokio::try_join!(keygen("user-e2e"), keygen("upload-e2e"))?;
        let port = || -> anyhow::Result<String> { Ok(follow_testkit::free_port()?.to_string()) };
        let (api, gateway, valkey, postgres, s3) = (port()?, port()?, port()?, port()?, port()?);
        let secret = || uuid::Uuid::new_v4().simple().to_string();
        let (valkey_admin, pg_password) = (secret(), secret());
        let project = Self {
            name: format!("follow-e2e-{}", uuid::Uuid::new_v4().simple()),
            file,
            env: vec![
                ("FOLLOW_API_PORT", api.clone()),
                ("FOLLOW_GATEWAY_PORT", gateway.clone()),
                ("FOLLOW_VALKEY_PORT", valkey.clone()),
                ("FOLLOW_PG_PORT", postgres.clone()),
                ("FOLLOW_S3_PORT", s3),
                ("FOLLOW_USER_PUBLIC_KEYS", user.1),
                ("FOLLOW_UPLOAD_SIGNING_KEY", upload.0),
                ("FOLLOW_UPLOAD_PUBLIC_KEYS", upload.1),
                ("FOLLOW_VALKEY_ADMIN_PASSWORD", valkey_admin.clone()),
                ("FOLLOW_VALKEY_API_PASSWORD", secret()),
                ("FOLLOW_VALKEY_GATEWAY_PASSWORD", secret()),
                ("FOLLOW_PG_PASSWORD", pg_password.clone()),
                ("FOLLOW_PG_API_PASSWORD", secret()),
                ("FOLLOW_MINIO_ROOT_USER", "follow-operator".to_owned()),
                ("FOLLOW_MINIO_ROOT_PASSWORD", secret()),
                ("FOLLOW_S3_GATEWAY_SECRET_KEY", secret()),
                ("FOLLOW_S3_API_SECRET_KEY", secret()),
            ],
        };
        project
            .run(&["up", "--detach", "--wait", "--build"])
            .await
            .context("docker compose up (compose mode needs a Docker engine)")?;
        Ok(Platform {
            api_url: format!("http://127.0.0.1:{api}"),
            gateway_url: format!("http://127.0.0.1:{gateway}"),
            valkey_url: format!("redis://default:{valkey_admin}@127.0.0.1:{valkey}"),
            partitions: Platform::partitions_from_env()?,
            database_url: format!("postgres://follow:{pg_password}@127.0.0.1:{postgres}/follow"),
            user_signing_key: user.0,
            backend: Backend::Compose(project),
        })
    }

    pub(crate) fn name_of(&self, service: Service) -> &'static str {
        match service {
            Service::Api => "api",
            Service::Gateway => "gateway",
            Service::Valkey => "valkey",
            Service::Storage => "minio",
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new("docker");
        command
            .arg("compose")
            .arg("--project-name")
            .arg(&self.name)
            .arg("--file")
            .arg(&self.file)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    pub(crate) async fn run(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = tokio::process::Command::from(self.command(args))
            .output()
            .await?;
        if !out.status.success() {
            bail!(
                "docker compose {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self
            .command(&["down", "--volumes", "--timeout", "5"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
