use std::path::PathBuf;

use tempfile::TempDir;
use tokio::process::Command;

use crate::{
    TestkitError,
    process::{Guarded, run, spawn_ready, with_free_ports},
    which,
};

/// The bucket every [`GarageServer`] has.
pub(crate) const BUCKET: &str = "follow-test";
/// The S3 region Garage answers as.
pub(crate) const REGION: &str = "garage";

/// A single-node Garage (a real S3 server) of one test, with a bucket [`BUCKET`] and a key that
/// may read and write it. Path-style addressing. Killed when dropped.
#[derive(Debug)]
pub struct GarageServer {
    binary: PathBuf,
    dir: TempDir,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    child: Guarded,
}

impl GarageServer {
    pub async fn start() -> Result<Self, TestkitError> {
        let binary = find_binary()?;
        with_free_ports("garage", |[s3, rpc, admin]| {
            let binary = binary.clone();
            async move {
                let dir = tempfile::Builder::new()
                    .prefix("follow-garage-")
                    .tempdir()?;
                let d = dir.path().display();
                std::fs::write(
                    dir.path().join("garage.toml"),
                    format!(
                        r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = false
data_fsync = false
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                        secret = random_hex(32),
                    ),
                )?;
                let mut server = Self {
                    binary,
                    dir,
                    s3_port: s3,
                    // Garage's key id format: GK + 24 hex digits; secret: 64 hex digits.
                    access_key: format!("GK{}", random_hex(12)),
                    secret_key: random_hex(32),
                    child: Guarded::default(),
                };
                server.spawn().await?;
                server.provision().await?;
                Ok(server)
            }
        })
        .await
    }

    /// `http://127.0.0.1:PORT`: the S3 endpoint (path-style).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    pub fn bucket(&self) -> &str {
        BUCKET
    }

    pub fn region(&self) -> &str {
        REGION
    }

    pub fn access_key(&self) -> &str {
        &self.access_key
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// An S3 client of this server (path-style, its key), for a test to inspect the bucket.
    pub fn client(&self) -> aws_sdk_s3::Client {
        crate::s3_client(&self.endpoint(), REGION, &self.access_key, &self.secret_key)
    }

    /// Freezes the server (`SIGSTOP`): connections are accepted by the kernel, nothing answers.
    pub fn pause(&self) {
        self.child.signal(rustix::process::Signal::STOP);
    }

    /// Lets a paused server go on (`SIGCONT`).
    pub fn resume(&self) {
        self.child.signal(rustix::process::Signal::CONT);
    }

    /// Kills the server. Data and layout stay for [`GarageServer::restart`].
    pub async fn stop(&mut self) {
        self.child.kill().await;
    }

    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        self.stop().await;
        self.spawn().await
    }

    fn cli(&self) -> Command {
        let mut c = Command::new(&self.binary);
        c.arg("-c").arg(self.dir.path().join("garage.toml"));
        c
    }

    async fn spawn(&mut self) -> Result<(), TestkitError> {
        let mut command = self.cli();
        command.arg("server");
        let child = spawn_ready(
            "garage",
            command,
            &self.dir.path().join("garage.log"),
            |_| {
                let mut status = self.cli();
                status.arg("status");
                async move { run("garage status", &mut status).await.is_ok() }
            },
        )
        .await?;
        self.child = Guarded::new(child);
        Ok(())
    }

    async fn provision(&self) -> Result<(), TestkitError> {
        let node = run("garage node id", self.cli().args(["node", "id", "-q"])).await?;
        let node = node.trim().split('@').next().unwrap_or_default().to_owned();
        run(
            "garage layout assign",
            self.cli()
                .args(["layout", "assign", "-z", "test", "-c", "1G", &node]),
        )
        .await?;
        run(
            "garage layout apply",
            self.cli().args(["layout", "apply", "--version", "1"]),
        )
        .await?;
        run(
            "garage key import",
            self.cli()
                .args(["key", "import", "--yes", "-n", "test"])
                .args([&self.access_key, &self.secret_key]),
        )
        .await?;
        run(
            "garage bucket create",
            self.cli().args(["bucket", "create", BUCKET]),
        )
        .await?;
        run(
            "garage bucket allow",
            self.cli()
                .args([
                    "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key",
                ])
                .arg(&self.access_key),
        )
        .await?;
        Ok(())
    }
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

fn find_binary() -> Result<PathBuf, TestkitError> {
    if let Some(path) = std::env::var_os("FOLLOW_GARAGE") {
        return Ok(PathBuf::from(path));
    }
    if let Some(path) = which("garage") {
        return Ok(path);
    }
    let cargo_bin = std::env::var_os("HOME")
        .map(|home| PathBuf::from(home).join(".cargo/bin/garage"))
        .filter(|p| p.is_file());
    cargo_bin.ok_or(TestkitError::NotFound {
        what: "garage",
        hint: "run ./dev test (it installs it), or set FOLLOW_GARAGE",
    })
}
