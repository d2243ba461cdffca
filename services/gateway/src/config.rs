//! Configuration from `FOLLOW_*` environment variables, validated once at start-up.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `FOLLOW_GATEWAY_LISTEN` | `127.0.0.1:8081` | uploads, gRPC, grpc-web, `/health`, `/metrics` |
//! | `FOLLOW_VALKEY_URL` | `redis://127.0.0.1:6379` | Valkey |
//! | `FOLLOW_UPLOAD_PUBLIC_KEYS` | — (required) | `kid=KEY,…` keys that verify upload tokens |
//! | `FOLLOW_S3_ENDPOINT` / `_REGION` / `_BUCKET` | `http://127.0.0.1:3900` / `garage` / `follow-images` | S3 (path-style) |
//! | `FOLLOW_S3_ACCESS_KEY_ID` / `FOLLOW_S3_SECRET_ACCESS_KEY` | — (required, secret) | S3 credentials |
//! | `FOLLOW_MAX_UPLOAD_BYTES` | `52428800` (50 MiB) | global cap on a body, whatever the token allows |
//! | `FOLLOW_MAX_PIXELS` | `50000000` | larger images are refused from their header (`IMAGE_TOO_LARGE`) |
//! | `FOLLOW_LONG_EDGE` / `FOLLOW_PREVIEW_EDGE` | `2048` / `320` | long edge of the stored image / preview (never upscaled) |
//! | `FOLLOW_JPEG_QUALITY` | `85` | quality of JPEG output (opaque images) |
//! | `FOLLOW_PIPELINE_WORKERS` | number of cores | images processed at once (blocking pool) |
//! | `FOLLOW_PIPELINE_QUEUE` | `4 × workers` | accepted images that may wait for a worker; beyond: 503 |
//! | `FOLLOW_BODY_IDLE_TIMEOUT_SECS` | `15` | longest wait for the next bytes of a body |
//! | `FOLLOW_BODY_TIMEOUT_SECS` | `300` | longest time for a whole body |
//! | `FOLLOW_MIN_UPLOAD_RATE` | `16384` | bytes/s a body must average after its first 10 s |
//! | `FOLLOW_OUTBOX_CAPACITY` | `10000` | results kept while Valkey is down |

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use follow_token::VerifyingKeys;

#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// A secret whose `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// Limits and output of the image pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    pub max_pixels: u64,
    pub long_edge: u32,
    pub preview_edge: u32,
    pub jpeg_quality: u8,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            long_edge: 2048,
            preview_edge: 320,
            jpeg_quality: 85,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub valkey_url: String,
    pub upload_keys: VerifyingKeys,
    pub s3: S3Config,
    pub max_upload_bytes: u64,
    pub pipeline: PipelineConfig,
    pub workers: usize,
    pub queue: usize,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    pub min_upload_rate: u64,
    pub outbox_capacity: usize,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let upload_keys = VerifyingKeys::parse_list(&env.required("FOLLOW_UPLOAD_PUBLIC_KEYS")?)
            .map_err(|e| invalid("FOLLOW_UPLOAD_PUBLIC_KEYS", e))?;
        if upload_keys.is_empty() {
            return Err(invalid("FOLLOW_UPLOAD_PUBLIC_KEYS", "no key"));
        }
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let workers: usize = env.parsed("FOLLOW_PIPELINE_WORKERS", &cores.to_string())?;
        let config = Self {
            listen: env.parsed("FOLLOW_GATEWAY_LISTEN", "127.0.0.1:8081")?,
            valkey_url: env.or("FOLLOW_VALKEY_URL", "redis://127.0.0.1:6379"),
            upload_keys,
            s3: S3Config {
                endpoint: env.or("FOLLOW_S3_ENDPOINT", "http://127.0.0.1:3900"),
                region: env.or("FOLLOW_S3_REGION", "garage"),
                bucket: env.or("FOLLOW_S3_BUCKET", "follow-images"),
                access_key_id: env.required("FOLLOW_S3_ACCESS_KEY_ID")?,
                secret_access_key: Secret(env.required("FOLLOW_S3_SECRET_ACCESS_KEY")?),
            },
            max_upload_bytes: env.parsed("FOLLOW_MAX_UPLOAD_BYTES", "52428800")?,
            pipeline: PipelineConfig {
                max_pixels: env.parsed("FOLLOW_MAX_PIXELS", "50000000")?,
                long_edge: env.parsed("FOLLOW_LONG_EDGE", "2048")?,
                preview_edge: env.parsed("FOLLOW_PREVIEW_EDGE", "320")?,
                jpeg_quality: env.parsed("FOLLOW_JPEG_QUALITY", "85")?,
            },
            workers,
            queue: env.parsed("FOLLOW_PIPELINE_QUEUE", &(4 * workers).to_string())?,
            body_idle_timeout: Duration::from_secs(
                env.parsed("FOLLOW_BODY_IDLE_TIMEOUT_SECS", "15")?,
            ),
            body_timeout: Duration::from_secs(env.parsed("FOLLOW_BODY_TIMEOUT_SECS", "300")?),
            min_upload_rate: env.parsed("FOLLOW_MIN_UPLOAD_RATE", "16384")?,
            outbox_capacity: env.parsed("FOLLOW_OUTBOX_CAPACITY", "10000")?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let p = &self.pipeline;
        if p.max_pixels == 0 {
            return Err(invalid("FOLLOW_MAX_PIXELS", "must be at least 1"));
        }
        if !(16..=16384).contains(&p.long_edge) {
            return Err(invalid("FOLLOW_LONG_EDGE", "must be 16-16384"));
        }
        if !(16..=p.long_edge).contains(&p.preview_edge) {
            return Err(invalid(
                "FOLLOW_PREVIEW_EDGE",
                "must be 16 up to FOLLOW_LONG_EDGE",
            ));
        }
        if !(1..=100).contains(&p.jpeg_quality) {
            return Err(invalid("FOLLOW_JPEG_QUALITY", "must be 1-100"));
        }
        if self.workers == 0 || self.workers > 256 {
            return Err(invalid("FOLLOW_PIPELINE_WORKERS", "must be 1-256"));
        }
        if self.max_upload_bytes == 0 {
            return Err(invalid("FOLLOW_MAX_UPLOAD_BYTES", "must be at least 1"));
        }
        if self.body_idle_timeout.is_zero() || self.body_timeout.is_zero() {
            return Err(invalid(
                "FOLLOW_BODY_TIMEOUT_SECS",
                "timeouts must be at least 1 s",
            ));
        }
        if self.outbox_capacity == 0 {
            return Err(invalid("FOLLOW_OUTBOX_CAPACITY", "must be at least 1"));
        }
        Ok(())
    }
}

fn invalid(name: &'static str, reason: impl fmt::Display) -> ConfigError {
    ConfigError {
        name,
        reason: reason.to_string(),
    }
}

struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn or(&self, name: &str, default: &str) -> String {
        (self.0)(name).unwrap_or_else(|| default.to_owned())
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        (self.0)(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(name, "is required"))
    }

    fn parsed<T: FromStr>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        self.or(name, default)
            .trim()
            .parse()
            .map_err(|e| invalid(name, e))
    }
}
