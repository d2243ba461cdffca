use std::path::{Path, PathBuf};

use tokio::process::Command;

use crate::{
    Home, TestkitError,
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
    dir: Home,
    s3_port: u16,
    access_key: String,
    secret_key: String,
    child: Guarded,
}

impl GarageServer {
    pub async fn start() -> Result<Self, TestkitError> {
        let binary = find_binary()?;
        with_free_ports("garage", |ports| {
            let binary = binary.clone();
            async move { Self::start_in(binary, Home::temp("follow-garage-")?, ports).await }
        })
        .await
    }

    /// A server whose data, layout, key and bucket live in `dir` (made on the first start;
    /// metadata and data synced) on ports `[s3, rpc, admin]`.
    pub async fn start_kept(dir: &Path, ports: [u16; 3]) -> Result<Self, TestkitError> {
        Self::start_in(find_binary()?, Home::kept(dir)?, ports).await
    }

    async fn start_in(
        binary: PathBuf,
        dir: Home,
        [s3, rpc, admin]: [u16; 3],
    ) -> Result<Self, TestkitError> {
        let config = dir.path().join("garage.toml");
        let credentials = dir.path().join("credentials");
        let fresh = !credentials.exists();
        if fresh {
            let d = dir.path().display();
            let sync = dir.is_kept();
            write_private(
                &config,
                &format!(
                    r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
metadata_fsync = {sync}
data_fsync = {sync}
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
        }
        // Garage's key id format: GK + 24 hex digits; secret: 64 hex digits.
        let (access_key, secret_key) = match std::fs::read_to_string(&credentials) {
            Ok(text) => match text.split_once('\n') {
                Some((id, secret)) => (id.to_owned(), secret.trim().to_owned()),
                None => (format!("GK{}", random_hex(12)), random_hex(32)),
            },
            Err(_) => (format!("GK{}", random_hex(12)), random_hex(32)),
        };
        let mut server = Self {
            binary,
            dir,
            s3_port: s3,
            access_key,
            secret_key,
            child: Guarded::default(),
        };
        server.spawn().await?;
        if fresh {
            server.provision().await?;
            write_private(
                &credentials,
                &format!("{}\n{}\n", server.access_key, server.secret_key),
            )?;
        }
        Ok(server)
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

    /// The `FOLLOW_S3_*` settings that point a service at this server.
    pub fn service_env(&self) -> [(&'static str, String); 5] {
        [
            ("FOLLOW_S3_ENDPOINT", self.endpoint()),
            ("FOLLOW_S3_REGION", REGION.to_owned()),
            ("FOLLOW_S3_BUCKET", BUCKET.to_owned()),
            ("FOLLOW_S3_ACCESS_KEY_ID", self.access_key.clone()),
            ("FOLLOW_S3_SECRET_ACCESS_KEY", self.secret_key.clone()),
        ]
    }

    /// Makes bucket `name` (unless it exists) and lets this server's key read and write it.
    pub async fn ensure_bucket(&self, name: &str) -> Result<(), TestkitError> {
        if run(
            "garage bucket info",
            self.cli().args(["bucket", "info", name]),
        )
        .await
        .is_err()
        {
            run(
                "garage bucket create",
                self.cli().args(["bucket", "create", name]),
            )
            .await?;
        }
        run(
            "garage bucket allow",
            self.cli()
                .args([
                    "bucket", "allow", "--read", "--write", "--owner", name, "--key",
                ])
                .arg(&self.access_key),
        )
        .await?;
        Ok(())
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

/// Writes a file only its owner may read (it holds secrets).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?
        .write_all(text.as_bytes())
}

fn random_hex(bytes: usize) -> String {
    use std::io::Read as _;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom is readable");
    hex::encode(buf)
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
