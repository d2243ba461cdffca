//! Configuration: typed, read once from `FOLLOW_*` environment variables at start-up and
//! validated there, so a bad setting stops the process before it serves anything.
//!
//! | variable | default | meaning |
//! |---|---|---|
//! | `FOLLOW_API_LISTEN` | `127.0.0.1:8080` | gRPC, grpc-web, `/health`, `/metrics` (one port) |
//! | `FOLLOW_DATABASE_URL` | — (required) | PostgreSQL |
//! | `FOLLOW_DATABASE_MAX_CONNECTIONS` | `16` | pool size |
//! | `FOLLOW_VALKEY_URL` | `redis://127.0.0.1:6379` | Valkey |
//! | `FOLLOW_USER_PUBLIC_KEYS` | — (required) | `kid=KEY,…` public keys that sign user tokens |
//! | `FOLLOW_UPLOAD_SIGNING_KEY` | — (required, secret) | `kid=KEY`: private key for upload tokens |
//! | `FOLLOW_GATEWAY_URL` | `http://127.0.0.1:8081` | base of the upload URLs handed out |
//! | `FOLLOW_UPLOAD_TOKEN_TTL_SECS` | `900` | lifetime of an upload token |
//! | `FOLLOW_MAX_FILE_SIZE` | `26214400` (25 MiB) | the largest upload a client may declare |
//! | `FOLLOW_S3_ENDPOINT` | `http://127.0.0.1:3900` | S3 server (path-style) |
//! | `FOLLOW_S3_REGION` | `garage` | S3 region |
//! | `FOLLOW_S3_BUCKET` | `follow-images` | bucket of images and previews |
//! | `FOLLOW_S3_ACCESS_KEY_ID` / `FOLLOW_S3_SECRET_ACCESS_KEY` | — (required, secret) | S3 credentials |
//! | `FOLLOW_PREVIEW_URL_TTL_SECS` | `900` | lifetime of presigned preview URLs |
//! | `FOLLOW_WATCH_HEARTBEAT_SECS` | `15` | heartbeat on idle watch streams |
//! | `FOLLOW_WATCH_MAX_LAG_SECS` | `30` | a watch stream whose client leaves events untaken for longer (while more come) is ended with `RESOURCE_EXHAUSTED` |
//! | `FOLLOW_SHUTDOWN_GRACE_SECS` | `10` | after SIGTERM/SIGINT, how long open connections may take to finish (streams end with `UNAVAILABLE` at once; a client that does not read them is cut after this) |
//! | `FOLLOW_HUB_CHANNELS` | `pattern` | how the progress hub subscribes in Valkey: `pattern` (one `PSUBSCRIBE`) or `per-image` (one `SUBSCRIBE` per watched image); see `cargo bench -p follow-bus --bench hub` |
//! | `FOLLOW_KEEPALIVE_SECS` | `20` | how a vanished client is noticed: HTTP/2 PING interval, and TCP keepalive idle time |
//! | `FOLLOW_KEEPALIVE_TIMEOUT_SECS` | `10` | a connection whose PING (or TCP keepalive probes) is not answered in this time is closed; so is one whose sent data stays unacknowledged for keepalive + timeout (`TCP_USER_TIMEOUT`) |
//! | `FOLLOW_CONSUMER_NAME` | `api-{hostname}-{pid}` | this instance's name in `api-workers` |
//! | `FOLLOW_RESULT_BATCH` | `64` | results applied per transaction at most |
//! | `FOLLOW_EXPIRY_INTERVAL_SECS` | `30` | how often expired uploads are looked for |
//! | `FOLLOW_EXPIRY_GRACE_SECS` | `300` | how long after its token expired a pending image is expired (an upload accepted just before may still be processing) |
//! | `FOLLOW_CORS_ORIGINS` | `*` | comma-separated origins allowed to call from browsers |

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use follow_bus::Channels;
use follow_token::{Kid, SigningKey, VerifyingKeys};

/// Why the configuration was refused; names the variable, never a secret's value.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// A secret string whose `Debug` never shows it.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

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
    pub preview_url_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub database_url: Secret,
    pub database_max_connections: u32,
    pub valkey_url: String,
    pub user_keys: VerifyingKeys,
    pub upload_signing_key: SigningKey,
    pub gateway_url: String,
    pub upload_token_ttl: Duration,
    pub max_file_size: u64,
    pub s3: S3Config,
    pub heartbeat: Duration,
    pub watch_max_lag: Duration,
    pub hub_channels: Channels,
    pub shutdown_grace: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub consumer_name: String,
    pub result_batch: usize,
    pub expiry_interval: Duration,
    pub expiry_grace: Duration,
    pub cors_origins: Vec<String>,
}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads every setting through `lookup` (the environment, or a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let env = Env(&lookup);
        let s3 = S3Config {
            endpoint: env.or("FOLLOW_S3_ENDPOINT", "http://127.0.0.1:3900"),
            region: env.or("FOLLOW_S3_REGION", "garage"),
            bucket: env.or("FOLLOW_S3_BUCKET", "follow-images"),
            access_key_id: env.required("FOLLOW_S3_ACCESS_KEY_ID")?,
            secret_access_key: Secret(env.required("FOLLOW_S3_SECRET_ACCESS_KEY")?),
            preview_url_ttl: env.secs("FOLLOW_PREVIEW_URL_TTL_SECS", 900)?,
        };
        let user_keys = VerifyingKeys::parse_list(&env.required("FOLLOW_USER_PUBLIC_KEYS")?)
            .map_err(|e| invalid("FOLLOW_USER_PUBLIC_KEYS", e))?;
        if user_keys.is_empty() {
            return Err(invalid("FOLLOW_USER_PUBLIC_KEYS", "no key"));
        }
        let upload_signing_key = parse_signing_key(
            "FOLLOW_UPLOAD_SIGNING_KEY",
            &env.required("FOLLOW_UPLOAD_SIGNING_KEY")?,
        )?;
        let gateway_url = env
            .or("FOLLOW_GATEWAY_URL", "http://127.0.0.1:8081")
            .trim_end_matches('/')
            .to_owned();
        if !(gateway_url.starts_with("http://") || gateway_url.starts_with("https://")) {
            return Err(invalid("FOLLOW_GATEWAY_URL", "must be an http(s) URL"));
        }
        let config = Self {
            listen: env.parsed("FOLLOW_API_LISTEN", "127.0.0.1:8080")?,
            database_url: Secret(env.required("FOLLOW_DATABASE_URL")?),
            database_max_connections: env.parsed("FOLLOW_DATABASE_MAX_CONNECTIONS", "16")?,
            valkey_url: env.or("FOLLOW_VALKEY_URL", "redis://127.0.0.1:6379"),
            user_keys,
            upload_signing_key,
            gateway_url,
            upload_token_ttl: env.secs("FOLLOW_UPLOAD_TOKEN_TTL_SECS", 900)?,
            max_file_size: env.parsed("FOLLOW_MAX_FILE_SIZE", "26214400")?,
            s3,
            heartbeat: env.secs("FOLLOW_WATCH_HEARTBEAT_SECS", 15)?,
            watch_max_lag: env.secs("FOLLOW_WATCH_MAX_LAG_SECS", 30)?,
            hub_channels: env.parsed("FOLLOW_HUB_CHANNELS", "pattern")?,
            shutdown_grace: env.secs("FOLLOW_SHUTDOWN_GRACE_SECS", 10)?,
            keepalive_interval: env.secs("FOLLOW_KEEPALIVE_SECS", 20)?,
            keepalive_timeout: env.secs("FOLLOW_KEEPALIVE_TIMEOUT_SECS", 10)?,
            consumer_name: match lookup("FOLLOW_CONSUMER_NAME") {
                Some(name) => name,
                None => default_consumer_name(),
            },
            result_batch: env.parsed("FOLLOW_RESULT_BATCH", "64")?,
            expiry_interval: env.secs("FOLLOW_EXPIRY_INTERVAL_SECS", 30)?,
            expiry_grace: env.secs("FOLLOW_EXPIRY_GRACE_SECS", 300)?,
            cors_origins: env
                .or("FOLLOW_CORS_ORIGINS", "*")
                .split(',')
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let positive = [
            ("FOLLOW_UPLOAD_TOKEN_TTL_SECS", self.upload_token_ttl),
            ("FOLLOW_PREVIEW_URL_TTL_SECS", self.s3.preview_url_ttl),
            ("FOLLOW_WATCH_HEARTBEAT_SECS", self.heartbeat),
            ("FOLLOW_WATCH_MAX_LAG_SECS", self.watch_max_lag),
            ("FOLLOW_KEEPALIVE_SECS", self.keepalive_interval),
            ("FOLLOW_KEEPALIVE_TIMEOUT_SECS", self.keepalive_timeout),
            ("FOLLOW_EXPIRY_INTERVAL_SECS", self.expiry_interval),
        ];
        for (name, value) in positive {
            if value.is_zero() {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        if self.s3.preview_url_ttl > Duration::from_secs(7 * 24 * 3600) {
            return Err(invalid(
                "FOLLOW_PREVIEW_URL_TTL_SECS",
                "S3 presigned URLs live at most 7 days",
            ));
        }
        if !(1..=1000).contains(&self.result_batch) {
            return Err(invalid("FOLLOW_RESULT_BATCH", "must be 1-1000"));
        }
        if self.max_file_size == 0 {
            return Err(invalid("FOLLOW_MAX_FILE_SIZE", "must be at least 1"));
        }
        if self.database_max_connections == 0 {
            return Err(invalid(
                "FOLLOW_DATABASE_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        if self.consumer_name.is_empty() || self.consumer_name.len() > 200 {
            return Err(invalid("FOLLOW_CONSUMER_NAME", "must be 1-200 characters"));
        }
        Ok(())
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

fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!("api-{host}-{}", std::process::id())
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

    fn secs(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.parsed::<u64>(name, &default.to_string())
            .map(Duration::from_secs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use follow_token::SigningKey;

    use super::*;

    fn base() -> HashMap<&'static str, String> {
        let user = SigningKey::generate("u1".parse().unwrap());
        let upload = SigningKey::generate("k1".parse().unwrap());
        HashMap::from([
            ("FOLLOW_DATABASE_URL", "postgres://x/y".to_owned()),
            (
                "FOLLOW_USER_PUBLIC_KEYS",
                format!("u1={}", user.verifying_key().to_base64()),
            ),
            (
                "FOLLOW_UPLOAD_SIGNING_KEY",
                format!("k1={}", upload.to_base64()),
            ),
            ("FOLLOW_S3_ACCESS_KEY_ID", "GK1".to_owned()),
            ("FOLLOW_S3_SECRET_ACCESS_KEY", "s3cr3t-value".to_owned()),
        ])
    }

    fn load(vars: &HashMap<&'static str, String>) -> Result<Config, ConfigError> {
        Config::from_lookup(|name| vars.get(name).cloned())
    }

    #[test]
    fn defaults_apply_and_secrets_stay_out_of_debug() {
        let config = load(&base()).unwrap();
        assert_eq!(config.listen.port(), 8080);
        assert_eq!(config.heartbeat, Duration::from_secs(15));
        assert_eq!(config.cors_origins, ["*"]);
        let debug = format!("{config:?}");
        assert!(!debug.contains("s3cr3t-value"));
        assert!(!debug.contains("postgres://x/y"));
    }

    #[test]
    fn bad_settings_name_their_variable() {
        for (name, value) in [
            ("FOLLOW_API_LISTEN", "nowhere"),
            ("FOLLOW_WATCH_HEARTBEAT_SECS", "0"),
            ("FOLLOW_WATCH_MAX_LAG_SECS", "0"),
            ("FOLLOW_HUB_CHANNELS", "both"),
            ("FOLLOW_RESULT_BATCH", "100000"),
            ("FOLLOW_UPLOAD_SIGNING_KEY", "no-kid"),
            ("FOLLOW_USER_PUBLIC_KEYS", "u1=garbage"),
            ("FOLLOW_GATEWAY_URL", "ftp://gateway"),
            ("FOLLOW_PREVIEW_URL_TTL_SECS", "99999999"),
        ] {
            let mut vars = base();
            vars.insert(name, value.to_owned());
            let e = load(&vars).unwrap_err();
            assert_eq!(e.name, name, "{value}");
        }
        let mut vars = base();
        vars.remove("FOLLOW_DATABASE_URL");
        assert_eq!(load(&vars).unwrap_err().name, "FOLLOW_DATABASE_URL");
    }
}
