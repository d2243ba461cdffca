//! Reaching Valkey: one node, or a Valkey Cluster through its seed nodes, behind one handle, so
//! that every component runs the same code on both.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{
    Cmd, IntoConnectionInfo, Pipeline, ProtocolVersion, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::{ClusterClient, ClusterConfig},
    cluster_async::ClusterConnection,
};

use crate::{
    BusError,
    keys::{self, Partitions},
};

/// How to reach Valkey.
#[derive(Debug, Clone)]
pub struct ValkeyConfig {
    /// `redis://host:port[/db]` (or `rediss://`, `redis+unix://`) for one node; two or more
    /// such URLs, comma-separated, for the seed nodes of a cluster.
    pub url: String,
    /// How many partitions the work streams have (the same on every service).
    pub partitions: Partitions,
    /// A command that takes longer fails (and the caller sees the bus as unavailable).
    pub response_timeout: Duration,
    pub connect_timeout: Duration,
}

impl ValkeyConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            partitions: Partitions::DEFAULT,
            response_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
        }
    }
}

/// A connection for ordinary commands: to the one node, or to the cluster (which routes each
/// command to its slot's primary and follows the topology as it changes).
#[derive(Clone)]
pub enum Connection {
    Node(ConnectionManager),
    Cluster(Renewing),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => {
                let (generation, mut conn) = c.current();
                Box::pin(async move {
                    let result = conn.req_packed_command(cmd).await;
                    c.check(generation, &result);
                    result
                })
            }
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Node(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => {
                let (generation, mut conn) = c.current();
                Box::pin(async move {
                    let result = conn.req_packed_commands(cmd, offset, count).await;
                    c.check(generation, &result);
                    result
                })
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Node(c) => c.get_db(),
            Self::Cluster(_) => 0,
        }
    }
}

/// A cluster connection that is made afresh (from the seed nodes) when it has lost every node:
/// after the whole cluster went down at once, the client's own recovery can find no connection
/// left to learn the topology from, and would never come back.
#[derive(Clone)]
pub struct Renewing(Arc<RenewingInner>);

impl std::fmt::Debug for Renewing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Renewing").field(&self.current().0).finish()
    }
}

struct RenewingInner {
    make: Box<dyn Fn() -> ClusterConnection + Send + Sync>,
    current: std::sync::RwLock<(u64, ClusterConnection)>,
}

impl Renewing {
    fn new(make: impl Fn() -> ClusterConnection + Send + Sync + 'static) -> Self {
        let first = make();
        Self(Arc::new(RenewingInner {
            make: Box::new(make),
            current: std::sync::RwLock::new((0, first)),
        }))
    }

    /// The connection now, with its generation.
    fn current(&self) -> (u64, ClusterConnection) {
        self.0
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Replaces the connection of `generation` (once) if `result` says it has no node left.
    fn check<T>(&self, generation: u64, result: &redis::RedisResult<T>) {
        let Err(e) = result else { return };
        if e.kind() != redis::ErrorKind::ClusterConnectionNotFound {
            return;
        }
        let mut current = self
            .0
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.0 == generation {
            tracing::warn!("the cluster connection lost every node: connecting afresh");
            *current = (generation + 1, (self.0.make)());
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Node(_) => "Connection::Node",
            Self::Cluster(_) => "Connection::Cluster",
        })
    }
}

/// Where a [`Subscriber`] hands what it receives.
pub type Pushes = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

/// A connection that receives progress messages as RESP3 pushes (see [`Valkey::subscriber`]).
#[derive(Debug)]
pub struct Subscriber(Connection);

impl Subscriber {
    /// Subscribes `channels`: `SUBSCRIBE` on one node, `SSUBSCRIBE` (each channel on the shard
    /// that owns its slot) on a cluster.
    pub async fn subscribe(&mut self, channels: &[String]) -> Result<(), BusError> {
        match &mut self.0 {
            Connection::Node(c) => c.subscribe(channels).await?,
            // The hub connects afresh whenever its subscriptions fail.
            Connection::Cluster(c) => c.current().1.ssubscribe(channels).await?,
        }
        Ok(())
    }
}

#[derive(Clone)]
enum Target {
    Node(redis::Client),
    Cluster(Vec<redis::ConnectionInfo>),
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
    target: Target,
    config: ValkeyConfig,
    shared: Connection,
    /// The blocking readers' and subscribers' connections open now.
    own: Arc<AtomicU64>,
}

impl std::fmt::Debug for Valkey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Valkey")
            .field("cluster", &self.is_cluster())
            .field("partitions", &self.config.partitions)
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
    /// Only the URLs are checked here; nothing is connected yet.
    pub fn new(config: ValkeyConfig) -> Result<Self, BusError> {
        let urls: Vec<&str> = config
            .url
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        let target = match urls.as_slice() {
            [] => return Err(BusError::Unavailable("no Valkey URL is set".into())),
            [one] => Target::Node(redis::Client::open(*one)?),
            seeds => Target::Cluster(
                seeds
                    .iter()
                    .map(|u| u.into_connection_info())
                    .collect::<Result<_, _>>()?,
            ),
        };
        let shared = connect(&target, &config, config.response_timeout, None)?;
        Ok(Self {
            target,
            config,
            shared,
            own: Arc::default(),
        })
    }

    /// The partitions of the work streams, and so the keys of each image.
    pub fn partitions(&self) -> Partitions {
        self.config.partitions
    }

    /// Claims the platform's partition count for this service's (`SET NX`), or checks it is the
    /// one claimed: services cutting the streams differently would each read streams the other
    /// never writes. [`BusError::Invalid`] on a mismatch; Valkey unavailable is logged and left
    /// for later (the claim is made by whichever service starts first once it is back).
    pub async fn claim_partitions(&self) -> Result<(), BusError> {
        let mut conn = self.connection()?;
        let ours = self.config.partitions.to_string();
        let claimed: Option<String> = match redis::cmd("SET")
            .arg(keys::PARTITIONS)
            .arg(&ours)
            .arg("NX")
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(BusError::from)
        {
            Ok(claimed) => claimed,
            Err(e) if e.is_unavailable() => {
                tracing::warn!(error = %e, "the partition count could not be checked");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        match claimed {
            Some(theirs) if theirs != ours => Err(BusError::Invalid(format!(
                "FOLLOW_VALKEY_PARTITIONS is {ours} but the platform's streams are cut into \
                 {theirs} ({}); set the same count on every service (docs/operations.md, \
                 \"Partitions\")",
                keys::PARTITIONS
            ))),
            _ => Ok(()),
        }
    }

    /// Whether this is a Valkey Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.target, Target::Cluster(_))
    }

    /// The command that publishes on a progress channel: `PUBLISH` on one node, `SPUBLISH` on
    /// a cluster (to the channel's shard only, where the hubs subscribed it).
    pub fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// The process's multiplexed connection for ordinary (non-blocking) commands: cheap to
    /// clone, shared by every clone of this handle.
    pub fn connection(&self) -> Result<Connection, BusError> {
        Ok(self.shared.clone())
    }

    /// A connection of its own for one blocking reader: `XREADGROUP BLOCK` holds a connection
    /// for up to `block`, which must not stall other commands, and must not time out before it.
    pub(crate) fn blocking_connection(
        &self,
        block: Duration,
    ) -> Result<(Connection, Open), BusError> {
        let conn = connect(
            &self.target,
            &self.config,
            block + self.config.response_timeout,
            None,
        )?;
        Ok((conn, self.open()))
    }

    /// A connection that hands every message of the channels it subscribes to `pushes`, and
    /// tells it (a `Disconnection` push) when a connection to a node drops. It reconnects and
    /// subscribes again by itself; messages published meanwhile are lost.
    pub fn subscriber(&self, pushes: Pushes) -> Result<(Subscriber, Open), BusError> {
        let connection = connect(
            &self.target,
            &self.config,
            self.config.response_timeout,
            Some(pushes),
        )?;
        Ok((Subscriber(connection), self.open()))
    }

    /// Connections to Valkey this process holds: the shared one, and each blocking reader's
    /// and subscriber's (on a cluster, each stands for one connection per node it talks to).
    pub fn open_connections(&self) -> u64 {
        1 + self.own.load(Ordering::Relaxed)
    }

    fn open(&self) -> Open {
        self.own.fetch_add(1, Ordering::Relaxed);
        Open(Arc::clone(&self.own))
    }
}

/// A lazy connection to `target`; with `pushes`, a RESP3 one that resubscribes after
/// reconnecting and hands its pushes there.
fn connect(
    target: &Target,
    config: &ValkeyConfig,
    response_timeout: Duration,
    pushes: Option<Pushes>,
) -> Result<Connection, BusError> {
    match target {
        Target::Node(client) => {
            // Few, quick reconnect attempts per command: while Valkey is down a caller should
            // learn it in well under a second (to answer 503), not after a long backoff.
            let mut manager = ConnectionManagerConfig::new()
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(250))
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(response_timeout));
            let client = match pushes {
                None => client.clone(),
                Some(pushes) => {
                    manager = manager
                        .set_push_sender(pushes)
                        .set_automatic_resubscription();
                    let info = client.get_connection_info().clone();
                    let redis = info
                        .redis_settings()
                        .clone()
                        .set_protocol(ProtocolVersion::RESP3);
                    redis::Client::open(info.set_redis_settings(redis))?
                }
            };
            Ok(Connection::Node(ConnectionManager::new_lazy_with_config(
                client, manager,
            )?))
        }
        Target::Cluster(seeds) => {
            let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                // Retries are for redirections and reconnections within the response timeout;
                // a shard that is down fails its commands fast, like a node that is down.
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(250)
                .connection_timeout(config.connect_timeout)
                .response_timeout(response_timeout);
            let mut cluster = ClusterConfig::new()
                .set_connection_timeout(config.connect_timeout)
                .set_response_timeout(response_timeout);
            if let Some(pushes) = pushes {
                builder = builder.use_protocol(ProtocolVersion::RESP3);
                cluster = cluster.set_push_sender(pushes);
            }
            let client: ClusterClient = builder.build()?;
            Ok(Connection::Cluster(Renewing::new(move || {
                client.get_pending_async_connection_with_config(cluster.clone())
            })))
        }
    }
}
