use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::BusError;

/// How to reach Valkey.
#[derive(Debug, Clone)]
pub struct ValkeyConfig {
    /// `redis://host:port[/db]` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// A command that takes longer fails (and the caller sees the bus as unavailable).
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl ValkeyConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A handle to Valkey that hands out auto-reconnecting connections.
///
/// Connections are lazy: creating one never fails because Valkey is down, so a service starts
/// (and reports itself degraded) without it, and commands fail fast until it is back.
#[derive(Debug, Clone)]
pub struct Valkey {
    client: redis::Client,
    config: ValkeyConfig,
}

impl Valkey {
    /// Only the URL is checked here; nothing is connected yet.
    pub fn new(config: ValkeyConfig) -> Result<Self, BusError> {
        let client = redis::Client::open(config.url.as_str())?;
        Ok(Self { client, config })
    }

    /// A multiplexed connection for ordinary (non-blocking) commands; cheap to clone and share.
    pub fn connection(&self) -> Result<ConnectionManager, BusError> {
        self.manager(self.config.response_timeout)
    }

    /// A connection of its own for one blocking reader: `XREADGROUP BLOCK` holds a connection
    /// for up to `block`, which must not stall other commands, and must not time out before it.
    pub(crate) fn blocking_connection(
        &self,
        block: Duration,
    ) -> Result<ConnectionManager, BusError> {
        self.manager(block + self.config.response_timeout)
    }

    /// A connection for subscribing (`SUBSCRIBE` / `PSUBSCRIBE`).
    pub async fn pubsub(&self) -> Result<redis::aio::PubSub, BusError> {
        Ok(self.client.get_async_pubsub().await?)
    }

    fn manager(&self, response_timeout: Duration) -> Result<ConnectionManager, BusError> {
        // Few, quick reconnect attempts per command: while Valkey is down a caller should learn
        // it in well under a second (to answer 503), not after a long backoff.
        let config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(250))
            .set_connection_timeout(Some(self.config.connect_timeout))
            .set_response_timeout(Some(response_timeout));
        Ok(ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            config,
        )?)
    }
}
