//! Reading `FOLLOW_*` settings: one [`Env`] reader with typed accessors, one [`ConfigError`]
//! naming the variable (never a secret's value), and the settings both services share — how
//! they serve ([`ServerConfig`]), where S3 is ([`S3Config`]). Each service's own `Config` is
//! built from these once at start-up and validated there. Every setting, with its default, is
//! documented in `docs/operations.md` (a test holds that reference to the code).

use std::{fmt, net::SocketAddr, str::FromStr, time::Duration};

use follow_bus::{ValkeyConfig, keys::Partitions};
use follow_token::VerifyingKeys;
pub use secrecy::{ExposeSecret, SecretString};

/// Why the configuration was refused; names the variable, never a secret's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub reason: String,
}

/// A `ConfigError` for `name`.
pub fn invalid(name: &'static str, reason: impl fmt::Display) -> ConfigError {
    ConfigError {
        name,
        reason: reason.to_string(),
    }
}

/// A service's configuration, read once at start-up.
pub trait FromEnv: Sized {
    /// Reads every setting through `lookup` (the environment, or a map in tests).
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError>;

    /// Reads every setting from the process environment.
    fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }
}

/// Settings read through a lookup: the process environment, or a map in tests.
pub struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl fmt::Debug for Env<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Env")
    }
}

impl<'a> Env<'a> {
    pub fn new(lookup: &'a dyn Fn(&str) -> Option<String>) -> Self {
        Self(lookup)
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<String> {
        (self.0)(name)
    }

    pub fn or(&self, name: &str, default: &str) -> String {
        self.get(name).unwrap_or_else(|| default.to_owned())
    }

    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| invalid(name, "is required"))
    }

    pub fn secret(&self, name: &'static str) -> Result<SecretString, ConfigError> {
        self.required(name).map(SecretString::from)
    }

    pub fn parsed<T: FromStr>(&self, name: &'static str, default: &str) -> Result<T, ConfigError>
    where
        T::Err: fmt::Display,
    {
        self.or(name, default)
            .trim()
            .parse()
            .map_err(|e| invalid(name, e))
    }

    /// A whole number within `range`.
    pub fn number<T>(
        &self,
        name: &'static str,
        default: T,
        range: std::ops::RangeInclusive<T>,
    ) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
        T::Err: fmt::Display,
    {
        let value: T = self.parsed(name, &default.to_string())?;
        if !range.contains(&value) {
            return Err(invalid(
                name,
                format!("must be {}-{}", range.start(), range.end()),
            ));
        }
        Ok(value)
    }

    /// Whole seconds, at least 1.
    pub fn secs(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        self.number(name, default, 1..=u64::from(u32::MAX))
            .map(Duration::from_secs)
    }

    /// `kid=KEY,…` public keys (at least one).
    pub fn verifying_keys(&self, name: &'static str) -> Result<VerifyingKeys, ConfigError> {
        let keys =
            VerifyingKeys::parse_list(&self.required(name)?).map_err(|e| invalid(name, e))?;
        if keys.is_empty() {
            return Err(invalid(name, "no key"));
        }
        Ok(keys)
    }

    /// `FOLLOW_CONSUMER_NAME`: this instance's name in its consumer group, by default
    /// `{role}-{hostname}-{pid}` (unique per process).
    pub fn consumer_name(&self, role: &str) -> Result<String, ConfigError> {
        let name = self.get("FOLLOW_CONSUMER_NAME").map_or_else(
            || format!("{role}-{}-{}", hostname(), std::process::id()),
            |name| name.trim().to_owned(),
        );
        if name.is_empty() || name.len() > 200 {
            return Err(invalid("FOLLOW_CONSUMER_NAME", "must be 1-200 characters"));
        }
        Ok(name)
    }

    /// A comma-separated list, blanks dropped.
    pub fn list(&self, name: &str, default: &str) -> Vec<String> {
        self.or(name, default)
            .split(',')
            .map(|o| o.trim().to_owned())
            .filter(|o| !o.is_empty())
            .collect()
    }
}

/// How a service serves its one port.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub shutdown_grace: Duration,
    /// HTTP/2 streams (calls) one connection may have open at once.
    pub max_streams_per_connection: u32,
    /// Origins allowed by CORS on the public surface; `*` allows any.
    pub cors_origins: Vec<String>,
}

impl ServerConfig {
    /// The shared settings, with the listen address from `listen_var` (each service has its own).
    pub fn from_env(
        env: &Env<'_>,
        listen_var: &'static str,
        default_listen: &str,
    ) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: env.parsed(listen_var, default_listen)?,
            keepalive_interval: env.secs("FOLLOW_KEEPALIVE_SECS", 20)?,
            keepalive_timeout: env.secs("FOLLOW_KEEPALIVE_TIMEOUT_SECS", 10)?,
            shutdown_grace: env.secs("FOLLOW_SHUTDOWN_GRACE_SECS", 10)?,
            max_streams_per_connection: env.number(
                "FOLLOW_MAX_STREAMS_PER_CONNECTION",
                100,
                1..=10_000,
            )?,
            cors_origins: env.list("FOLLOW_CORS_ORIGINS", "*"),
        })
    }
}

/// Where the bucket is, and how long S3 may take.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub endpoint: String,
    /// Where clients reach S3: presigned URLs are made for it.
    pub public_endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub connect_timeout: Duration,
    pub attempt_timeout: Duration,
    pub operation_timeout: Duration,
    pub max_attempts: u32,
}

impl S3Config {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        let endpoint = env.or("FOLLOW_S3_ENDPOINT", "http://127.0.0.1:3900");
        let public_endpoint = env.or("FOLLOW_S3_PUBLIC_ENDPOINT", &endpoint);
        for (name, url) in [
            ("FOLLOW_S3_ENDPOINT", &endpoint),
            ("FOLLOW_S3_PUBLIC_ENDPOINT", &public_endpoint),
        ] {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(invalid(name, "must be an http(s) URL"));
            }
        }
        let config = Self {
            endpoint,
            public_endpoint,
            region: env.or("FOLLOW_S3_REGION", "garage"),
            bucket: env.or("FOLLOW_S3_BUCKET", "follow-images"),
            access_key_id: env.required("FOLLOW_S3_ACCESS_KEY_ID")?,
            secret_access_key: env.secret("FOLLOW_S3_SECRET_ACCESS_KEY")?,
            connect_timeout: Duration::from_millis(env.number(
                "FOLLOW_S3_CONNECT_TIMEOUT_MS",
                2000,
                1..=600_000,
            )?),
            attempt_timeout: env.secs("FOLLOW_S3_ATTEMPT_TIMEOUT_SECS", 10)?,
            operation_timeout: env.secs("FOLLOW_S3_OPERATION_TIMEOUT_SECS", 30)?,
            max_attempts: env.number("FOLLOW_S3_MAX_ATTEMPTS", 3, 1..=10)?,
        };
        if config.operation_timeout < config.attempt_timeout {
            return Err(invalid(
                "FOLLOW_S3_OPERATION_TIMEOUT_SECS",
                "must be at least FOLLOW_S3_ATTEMPT_TIMEOUT_SECS",
            ));
        }
        Ok(config)
    }
}

/// `FOLLOW_TOKEN_LEEWAY_SECS`: the clock skew tolerated on a token's times.
pub fn token_leeway(env: &Env<'_>) -> Result<Duration, ConfigError> {
    env.number("FOLLOW_TOKEN_LEEWAY_SECS", 5, 0..=300)
        .map(Duration::from_secs)
}

/// Where Valkey is, and how the work streams are cut.
#[derive(Debug, Clone)]
pub struct ValkeySettings {
    /// `FOLLOW_VALKEY_URL`: one node's URL, or a cluster's seed nodes' URLs, comma-separated.
    /// URLs may carry a password: a secret.
    pub url: SecretString,
    /// `FOLLOW_VALKEY_PARTITIONS`: the work streams' partition count (the same on every
    /// service).
    pub partitions: Partitions,
}

impl ValkeySettings {
    pub fn from_env(env: &Env<'_>) -> Result<Self, ConfigError> {
        Ok(Self {
            url: SecretString::from(env.or("FOLLOW_VALKEY_URL", "redis://127.0.0.1:6379")),
            partitions: env.parsed("FOLLOW_VALKEY_PARTITIONS", "16")?,
        })
    }

    /// The bus's configuration.
    pub fn config(&self) -> ValkeyConfig {
        ValkeyConfig {
            partitions: self.partitions,
            ..ValkeyConfig::new(self.url.expose_secret())
        }
    }
}

/// This host's name (for default consumer names).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn numbers_and_durations_are_checked_and_name_their_variable() {
        let vars = HashMap::from([
            ("A", "0".to_owned()),
            ("B", "x".to_owned()),
            ("C", " 7 ".to_owned()),
        ]);
        let lookup = |n: &str| vars.get(n).cloned();
        let env = Env::new(&lookup);
        assert_eq!(env.secs("A", 5).unwrap_err().name, "A");
        assert_eq!(env.secs("B", 5).unwrap_err().name, "B");
        assert_eq!(env.secs("C", 5).unwrap(), Duration::from_secs(7));
        assert_eq!(env.number("C", 1u32, 1..=5).unwrap_err().name, "C");
        assert_eq!(env.secs("D", 5).unwrap(), Duration::from_secs(5));
        assert_eq!(env.required("D").unwrap_err().name, "D");
        assert_eq!(env.list("D", " a, ,b "), ["a", "b"]);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let vars = HashMap::from([
            ("FOLLOW_S3_ACCESS_KEY_ID", "GK1".to_owned()),
            ("FOLLOW_S3_SECRET_ACCESS_KEY", "s3cr3t-value".to_owned()),
        ]);
        let lookup = |n: &str| vars.get(n).cloned();
        let s3 = S3Config::from_env(&Env::new(&lookup)).unwrap();
        assert!(!format!("{s3:?}").contains("s3cr3t-value"));
        assert_eq!(s3.secret_access_key.expose_secret(), "s3cr3t-value");
    }
}
