//! Configuration: typed, read once from `FOLLOW_*` environment variables at start-up and
//! validated there, so a bad setting stops the process before it serves anything; the shared
//! ones are read by `follow_service::config`. Every setting, with its default, is documented in
//! `docs/operations.md` (a test holds that reference to the code).

use std::time::Duration;

use follow_service::config::{
    ConfigError, Env, ExposeSecret as _, FromEnv, S3Config, SecretString, ServerConfig,
    ValkeySettings, invalid, token_leeway,
};
use follow_token::{Claims as _, Kid, SigningKey, UploadClaims, VerifyingKeys};

use crate::routes::MAX_WAYPOINTS;

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub database_url: SecretString,
    pub database_max_connections: u32,
    pub valkey: ValkeySettings,
    pub user_keys: VerifyingKeys,
    pub token_leeway: Duration,
    pub upload_signing_key: SigningKey,
    pub gateway_url: String,
    pub upload_token_ttl: Duration,
    pub upload_tokens_per_minute: u32,
    pub upload_token_burst: u32,
    pub max_watches_per_user: usize,
    pub max_file_size: u64,
    pub s3: S3Config,
    pub preview_url_ttl: Duration,
    pub heartbeat: Duration,
    pub watch_recheck: Duration,
    pub watch_max_lag: Duration,
    pub consumer_name: String,
    pub result_batch: usize,
    pub result_max_failures: u64,
    pub reconcile_interval: Duration,
    pub expiry_grace: Duration,
}

impl FromEnv for Config {
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env::new(&lookup);
        let user_keys = env.verifying_keys("FOLLOW_USER_PUBLIC_KEYS")?;
        let upload_signing_key = parse_signing_key(
            "FOLLOW_UPLOAD_SIGNING_KEY",
            env.secret("FOLLOW_UPLOAD_SIGNING_KEY")?.expose_secret(),
        )?;
        let gateway_url = env
            .or("FOLLOW_GATEWAY_URL", "http://127.0.0.1:8081")
            .trim_end_matches('/')
            .to_owned();
        if !(gateway_url.starts_with("http://") || gateway_url.starts_with("https://")) {
            return Err(invalid("FOLLOW_GATEWAY_URL", "must be an http(s) URL"));
        }
        let consumer_name = env.consumer_name("api")?;
        Ok(Self {
            server: ServerConfig::from_env(&env, "FOLLOW_API_LISTEN", "127.0.0.1:8080")?,
            database_url: env.secret("FOLLOW_DATABASE_URL")?,
            database_max_connections: env.number(
                "FOLLOW_DATABASE_MAX_CONNECTIONS",
                16,
                1..=1000,
            )?,
            valkey: ValkeySettings::from_env(&env)?,
            user_keys,
            token_leeway: token_leeway(&env)?,
            upload_signing_key,
            gateway_url,
            upload_token_ttl: Duration::from_secs(env.number(
                "FOLLOW_UPLOAD_TOKEN_TTL_SECS",
                900,
                1..=UploadClaims::MAX_LIFETIME.as_secs(),
            )?),
            upload_tokens_per_minute: env.number(
                "FOLLOW_UPLOAD_TOKENS_PER_MINUTE",
                300,
                1..=1_000_000,
            )?,
            upload_token_burst: env.number(
                "FOLLOW_UPLOAD_TOKEN_BURST",
                200,
                MAX_WAYPOINTS as u32..=1_000_000,
            )?,
            max_watches_per_user: env.number("FOLLOW_MAX_WATCHES_PER_USER", 32, 1..=100_000)?,
            max_file_size: env.number("FOLLOW_MAX_FILE_SIZE", 26_214_400, 1..=1 << 32)?,
            s3: S3Config::from_env(&env)?,
            preview_url_ttl: Duration::from_secs(env.number(
                "FOLLOW_PREVIEW_URL_TTL_SECS",
                900,
                1..=7 * 24 * 3600,
            )?),
            heartbeat: env.secs("FOLLOW_WATCH_HEARTBEAT_SECS", 15)?,
            watch_recheck: env.secs("FOLLOW_WATCH_RECHECK_SECS", 3)?,
            watch_max_lag: env.secs("FOLLOW_WATCH_MAX_LAG_SECS", 30)?,
            consumer_name,
            result_batch: env.number("FOLLOW_RESULT_BATCH", 64, 1..=1000)?,
            result_max_failures: env.number("FOLLOW_RESULT_MAX_FAILURES", 5, 1..=100)?,
            reconcile_interval: env.secs("FOLLOW_RECONCILE_INTERVAL_SECS", 30)?,
            expiry_grace: Duration::from_secs(env.number(
                "FOLLOW_EXPIRY_GRACE_SECS",
                300,
                0..=7 * 24 * 3600,
            )?),
        })
    }
}

/// `kid=KEY` (PEM or base64 seed) → a signing key.
pub fn parse_signing_key(name: &'static str, value: &str) -> Result<SigningKey, ConfigError> {
    let (kid, key) = value
        .split_once('=')
        .ok_or_else(|| invalid(name, "expected kid=KEY"))?;
    let kid: Kid = kid.trim().parse().map_err(|e| invalid(name, e))?;
    SigningKey::parse(kid, key.trim()).map_err(|e| invalid(name, e))
}
