//! Configuration from `FOLLOW_*` environment variables, validated once at start-up; the shared
//! ones are read by `follow_service::config`. Every setting, with its default, is documented in
//! `docs/operations.md` (a test holds that reference to the code).

use std::{path::PathBuf, time::Duration};

use follow_service::config::{
    ConfigError, Env, FromEnv, S3Config, SecretString, ServerConfig, ValkeySettings, token_leeway,
};
use follow_token::VerifyingKeys;

/// Limits and output of the image pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PipelineConfig {
    pub max_pixels: u64,
    pub long_edge: u32,
    pub preview_edge: u32,
    pub jpeg_quality: u8,
    /// libwebp's quality for the WebP files of opaque images (those with alpha are lossless).
    pub webp_quality: u8,
}

/// The WebP quality whose files score as the JPEGs of quality 85 do on SSIMULACRA2
/// (docs/performance.md, "WebP").
const DEFAULT_WEBP_QUALITY: u8 = 90;

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            max_pixels: 50_000_000,
            long_edge: 2048,
            preview_edge: 320,
            jpeg_quality: 85,
            webp_quality: DEFAULT_WEBP_QUALITY,
        }
    }
}

/// How bodies are received.
#[derive(Debug, Clone)]
pub struct ReceiveConfig {
    pub max_upload_bytes: u64,
    pub max_receiving: usize,
    pub max_uploads_per_user: usize,
    pub spool_dir: PathBuf,
    pub body_idle_timeout: Duration,
    pub body_timeout: Duration,
    pub min_upload_rate: u64,
    /// The size of the parts a large original is stored in while its bytes arrive (S3's
    /// smallest is 5 MiB).
    pub part_bytes: u64,
}

/// Resumable (tus) uploads.
#[derive(Debug, Clone)]
pub struct ResumableConfig {
    /// How long an unfinished upload lives after its last chunk (never past its token).
    pub expiry: Duration,
    /// Unfinished uploads one user may have open at once, on every instance together.
    pub per_user: u32,
    /// How often each instance looks for expired uploads to remove.
    pub sweep_every: Duration,
}

/// How jobs are processed.
#[derive(Debug, Clone)]
pub struct JobConfig {
    pub workers: usize,
    pub consumer_name: String,
    pub lease: Duration,
    pub max_failures: u64,
    pub keep_originals: bool,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub valkey: ValkeySettings,
    pub upload_keys: VerifyingKeys,
    pub token_leeway: Duration,
    pub s3: S3Config,
    pub pipeline: PipelineConfig,
    pub receive: ReceiveConfig,
    pub resumable: ResumableConfig,
    pub jobs: JobConfig,
    pub max_watches_per_upload: usize,
    pub ops_token: Option<SecretString>,
}

impl FromEnv for Config {
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        let env = Env::new(&lookup);
        let upload_keys = env.verifying_keys("FOLLOW_UPLOAD_PUBLIC_KEYS")?;
        let long_edge = env.number("FOLLOW_LONG_EDGE", 2048, 16..=16384)?;
        let max_receiving = env.number("FOLLOW_MAX_RECEIVING", 256, 1..=100_000)?;
        Ok(Self {
            server: ServerConfig::from_env(&env, "FOLLOW_GATEWAY_LISTEN", "127.0.0.1:8081")?,
            valkey: ValkeySettings::from_env(&env)?,
            upload_keys,
            token_leeway: token_leeway(&env)?,
            s3: S3Config::from_env(&env)?,
            pipeline: PipelineConfig {
                max_pixels: env.number("FOLLOW_MAX_PIXELS", 50_000_000, 1..=1_000_000_000)?,
                long_edge,
                preview_edge: env.number("FOLLOW_PREVIEW_EDGE", 320, 16..=long_edge)?,
                jpeg_quality: env.number("FOLLOW_JPEG_QUALITY", 85, 1..=100)?,
                webp_quality: env.number("FOLLOW_WEBP_QUALITY", DEFAULT_WEBP_QUALITY, 1..=100)?,
            },
            receive: ReceiveConfig {
                max_upload_bytes: env.number("FOLLOW_MAX_UPLOAD_BYTES", 52_428_800, 1..=1 << 32)?,
                max_receiving,
                max_uploads_per_user: env.number(
                    "FOLLOW_MAX_UPLOADS_PER_USER",
                    8.min(max_receiving),
                    1..=max_receiving,
                )?,
                spool_dir: env.get("FOLLOW_SPOOL_DIR").map_or_else(
                    || std::env::temp_dir().join("follow-gateway-spool"),
                    PathBuf::from,
                ),
                body_idle_timeout: env.secs("FOLLOW_BODY_IDLE_TIMEOUT_SECS", 15)?,
                body_timeout: env.secs("FOLLOW_BODY_TIMEOUT_SECS", 300)?,
                min_upload_rate: env.number("FOLLOW_MIN_UPLOAD_RATE", 16_384, 0..=1 << 30)?,
                part_bytes: env.number("FOLLOW_UPLOAD_PART_BYTES", 8 << 20, 5 << 20..=1 << 30)?,
            },
            resumable: ResumableConfig {
                expiry: env.secs("FOLLOW_RESUMABLE_EXPIRY_SECS", 3600)?,
                per_user: env.number("FOLLOW_RESUMABLE_PER_USER", 20, 1..=10_000)?,
                sweep_every: env.secs("FOLLOW_RESUMABLE_SWEEP_SECS", 30)?,
            },
            jobs: JobConfig {
                workers: env.number("FOLLOW_PIPELINE_WORKERS", cores, 1..=256)?,
                consumer_name: env.consumer_name("gateway")?,
                lease: env.secs("FOLLOW_JOB_LEASE_SECS", 60)?,
                max_failures: env.number("FOLLOW_JOB_MAX_FAILURES", 3, 1..=100)?,
                keep_originals: env.parsed("FOLLOW_KEEP_ORIGINALS", "false")?,
            },
            max_watches_per_upload: env.number("FOLLOW_MAX_WATCHES_PER_UPLOAD", 4, 1..=1000)?,
            ops_token: env
                .get("FOLLOW_OPS_TOKEN")
                .filter(|t| !t.is_empty())
                .map(SecretString::from),
        })
    }
}
