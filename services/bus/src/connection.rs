use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

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

/// A handle to Valkey that hands out auto-reconnecting connections: one multiplexed connection
/// for every ordinary command of the process (each clone of the handle shares it), and one of
/// its own for each blocking reader and each subscriber, by necessity. How many are open is
/// [`Valkey::open_connections`] (in each service's `/metrics`).
///
/// Connections are lazy: creating one never fails because Valkey is down, so a service starts
/// (and reports itself degraded) without it, and commands fail fast until it is back.
#[derive(Clone)]
pub struct Valkey {
    client: redis::Client,
    config: ValkeyConfig,
    shared: ConnectionManager,
    /// The blocking readers' and subscribers' connections open now.
    own: Arc<AtomicU64>,
}

impl std::fmt::Debug for Valkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Valkey")
            .field("open_connections", &self.open_connections())
            .finish_non_exhaustive()
    }
}

/// A connection of its own, counted while it lives ([`Valkey::open_connections`]).
#[derive(Debug)]
pub struct Open(Arc<AtomicU64>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Valkey {
    /// Only the URL is checked here; nothing is connected yet.
    pub fn new(config: ValkeyConfig) -> Result<Self, BusError> {
        let client = redis::Client::open(config.url.as_str())?;
        let shared = manager(&client, &config, config.response_timeout)?;
        Ok(Self {
            client,
            config,
            shared,
            own: Arc::default(),
        })
    }

    /// The process's multiplexed connection for ordinary (non-blocking) commands: cheap to
    /// clone, shared by every clone of this handle.
    pub fn connection(&self) -> Result<ConnectionManager, BusError> {
        Ok(self.shared.clone())
    }

    /// A connection of its own for one blocking reader: `XREADGROUP BLOCK` holds a connection
    /// for up to `block`, which must not stall other commands, and must not time out before it.
    pub(crate) fn blocking_connection(
        &self,
        block: Duration,
    ) -> Result<(ConnectionManager, Open), BusError> {
        let manager = manager(
            &self.client,
            &self.config,
            block + self.config.response_timeout,
        )?;
        Ok((manager, self.open()))
    }

    /// A connection for subscribing (`SUBSCRIBE` / `PSUBSCRIBE`).
    pub async fn pubsub(&self) -> Result<(redis::aio::PubSub, Open), BusError> {
        Ok((self.client.get_async_pubsub().await?, self.open()))
    }

    /// Connections to Valkey this process holds: the shared one, and each blocking reader's
    /// and subscriber's.
    pub fn open_connections(&self) -> u64 {
        1 + self.own.load(Ordering::Relaxed)
    }

    fn open(&self) -> Open {
        self.own.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(&self.own))
    }
}

fn manager(
    client: &redis::Client,
    config: &ValkeyConfig,
    response_timeout: Duration,
) -> Result<ConnectionManager, BusError> {
    // Few, quick reconnect attempts per command: while Valkey is down a caller should learn it
    // in well under a second (to answer 503), not after a long backoff.
    let config = ConnectionManagerConfig::new()
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(250))
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(response_timeout));
    Ok(ConnectionManager::new_lazy_with_config(
        client.clone(),
        config,
    )?)
}
