//! A local Valkey Cluster of one test: three primaries, each with one replica, from the same
//! `valkey-server` binary as [`ValkeyServer`] (cluster mode, each node on its own ports in its
//! own temporary directory), with the platform's ACL users on every node. It is put together
//! with `CLUSTER MEET` / `ADDSLOTSRANGE` / `REPLICATE`, so no `valkey-cli` is needed.
//!
//! Nodes are addressed by their index (0–2 start as primaries, 3–5 as their replicas); roles
//! change with failovers, so [`ValkeyCluster::primary_for`] asks the cluster who serves a key.

use std::time::Duration;

use follow_keys::acl::User;
use redis::aio::MultiplexedConnection;

use crate::{
    TestkitError, ValkeyServer, eventually_async, process::with_free_ports, valkey::passwords,
};

const PRIMARIES: usize = 3;
const SLOTS: u16 = 16384;
/// How long forming the cluster, or recovering from a fault, may take.
const SETTLE_WITHIN: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct ValkeyCluster {
    nodes: Vec<ValkeyServer>,
}

impl ValkeyCluster {
    /// Starts six nodes and forms the cluster; returns once every slot is served and every
    /// replica is in sync with its primary.
    pub async fn start() -> Result<Self, TestkitError> {
        let cluster = with_free_ports(
            "valkey cluster",
            |ports: [u16; 2 * 2 * PRIMARIES]| async move {
                let passwords = passwords();
                let mut nodes = Vec::with_capacity(2 * PRIMARIES);
                for pair in ports.chunks(2) {
                    nodes
                        .push(ValkeyServer::start_node(pair[0], pair[1], passwords.clone()).await?);
                }
                Ok(Self { nodes })
            },
        )
        .await?;
        cluster.form().await?;
        Ok(cluster)
    }

    /// Every node's URL as `user`, comma-separated: how a service is pointed at the cluster
    /// (`FOLLOW_VALKEY_URL`).
    pub fn urls_as(&self, user: User) -> String {
        self.nodes
            .iter()
            .map(|n| n.url_as(user))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// [`ValkeyCluster::urls_as`] the operator.
    pub fn urls(&self) -> String {
        self.urls_as(User::Admin)
    }

    /// Every node, by index.
    pub fn nodes(&self) -> &[ValkeyServer] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [ValkeyServer] {
        &mut self.nodes
    }

    pub fn node(&self, index: usize) -> &ValkeyServer {
        &self.nodes[index]
    }

    pub fn node_mut(&mut self, index: usize) -> &mut ValkeyServer {
        &mut self.nodes[index]
    }

    /// A cluster connection as the operator, for a test to inspect or poke at the data.
    pub async fn connection(&self) -> redis::cluster_async::ClusterConnection {
        redis::cluster::ClusterClient::new(self.nodes.iter().map(|n| n.url()).collect::<Vec<_>>())
            .expect("valid urls")
            .get_async_connection()
            .await
            .expect("the test cluster accepts connections")
    }

    /// The hash slot of `key`.
    pub async fn slot_of(&self, key: &str) -> Result<u16, TestkitError> {
        let (mut conn, _) = self.any_node().await?;
        query(&mut conn, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).await
    }

    /// The index of the node serving `key` now (the primary of its slot).
    pub async fn primary_for(&self, key: &str) -> Result<usize, TestkitError> {
        let slot = self.slot_of(key).await?;
        let (mut conn, _) = self.any_node().await?;
        let port = slot_owners(&mut conn)
            .await?
            .into_iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|(_, _, port)| port)
            .ok_or_else(|| not_ready(format!("slot {slot} is not served")))?;
        self.index_of(port)
    }

    /// The node ids, by index.
    pub async fn node_id(&self, index: usize) -> Result<String, TestkitError> {
        query(
            &mut connect(&self.nodes[index]).await?,
            redis::cmd("CLUSTER").arg("MYID"),
        )
        .await
    }

    /// Moves the slots `first..=last` to the node `to` while the cluster serves them (atomic
    /// slot migration, `CLUSTER MIGRATESLOTS`), returning once `to` serves them all.
    pub async fn migrate_slots(
        &self,
        first: u16,
        last: u16,
        to: usize,
    ) -> Result<(), TestkitError> {
        let (mut conn, _) = self.any_node().await?;
        let owners = slot_owners(&mut conn).await?;
        let from = owners
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&first))
            .map(|(_, _, port)| *port)
            .ok_or_else(|| not_ready(format!("slot {first} is not served")))?;
        let from = self.index_of(from)?;
        let target = self.node_id(to).await?;
        let _: () = query(
            &mut connect(&self.nodes[from]).await?,
            redis::cmd("CLUSTER")
                .arg("MIGRATESLOTS")
                .arg("SLOTSRANGE")
                .arg(first)
                .arg(last)
                .arg("NODE")
                .arg(&target),
        )
        .await?;
        let port = self.nodes[to].port();
        eventually_async(
            SETTLE_WITHIN,
            "the migrated slots to be served by their new node",
            || async {
                let (mut conn, _) = self.any_node().await.ok()?;
                let owners = slot_owners(&mut conn).await.ok()?;
                (first..=last)
                    .all(|slot| {
                        owners
                            .iter()
                            .any(|(s, e, p)| (*s..=*e).contains(&slot) && *p == port)
                    })
                    .then_some(())
            },
        )
        .await;
        Ok(())
    }

    /// Waits until every running node says the cluster is ok and agrees on who serves every
    /// slot, each slot by a running node.
    pub async fn settled(&mut self) -> Result<(), TestkitError> {
        let ports: Vec<u16> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then_some(n.port()))
            .collect();
        let nodes = &self.nodes;
        eventually_async(SETTLE_WITHIN, "the cluster to settle", || {
            let ports = ports.clone();
            async move {
                let mut maps = Vec::new();
                for node in nodes.iter().filter(|n| ports.contains(&n.port())) {
                    let mut conn = connect(node).await.ok()?;
                    let info: String = query(&mut conn, redis::cmd("CLUSTER").arg("INFO"))
                        .await
                        .ok()?;
                    if !info.contains("cluster_state:ok") {
                        return None;
                    }
                    let mut owners = slot_owners(&mut conn).await.ok()?;
                    owners.sort_unstable();
                    let covered: u32 = owners.iter().map(|(s, e, _)| u32::from(e - s) + 1).sum();
                    if covered != u32::from(SLOTS)
                        || owners.iter().any(|(_, _, p)| !ports.contains(p))
                    {
                        return None;
                    }
                    maps.push(owners);
                }
                maps.windows(2).all(|w| w[0] == w[1]).then_some(())
            }
        })
        .await;
        Ok(())
    }

    async fn form(&self) -> Result<(), TestkitError> {
        let mut first = connect(&self.nodes[0]).await?;
        for node in &self.nodes[1..] {
            let cluster_port = node.cluster_port().unwrap_or_default();
            let _: () = query(
                &mut first,
                redis::cmd("CLUSTER")
                    .arg("MEET")
                    .arg("127.0.0.1")
                    .arg(node.port())
                    .arg(cluster_port),
            )
            .await?;
        }
        let share = SLOTS / PRIMARIES as u16;
        for (i, node) in self.nodes[..PRIMARIES].iter().enumerate() {
            let start = share * i as u16;
            let end = if i + 1 == PRIMARIES {
                SLOTS - 1
            } else {
                start + share - 1
            };
            let _: () = query(
                &mut connect(node).await?,
                redis::cmd("CLUSTER")
                    .arg("ADDSLOTSRANGE")
                    .arg(start)
                    .arg(end),
            )
            .await?;
        }
        let total = self.nodes.len();
        eventually_async(SETTLE_WITHIN, "every node to know every other", || async {
            for node in &self.nodes {
                let mut conn = connect(node).await.ok()?;
                let known: String = query(&mut conn, redis::cmd("CLUSTER").arg("NODES"))
                    .await
                    .ok()?;
                let joined = known.lines().filter(|l| !l.contains("handshake")).count();
                if joined != total {
                    return None;
                }
            }
            Some(())
        })
        .await;
        for (replica, primary) in self.nodes[PRIMARIES..].iter().zip(&self.nodes) {
            let id = query::<String>(
                &mut connect(primary).await?,
                redis::cmd("CLUSTER").arg("MYID"),
            )
            .await?;
            let _: () = query(
                &mut connect(replica).await?,
                redis::cmd("CLUSTER").arg("REPLICATE").arg(&id),
            )
            .await?;
        }
        until_all_say(
            &self.nodes[PRIMARIES..],
            &["INFO", "replication"],
            "master_link_status:up",
        )
        .await;
        // The forming node's view settles last: wait until every node agrees.
        until_all_say(&self.nodes, &["CLUSTER", "INFO"], "cluster_state:ok").await;
        Ok(())
    }

    /// A connection to some node that answers, with its index.
    async fn any_node(&self) -> Result<(MultiplexedConnection, usize), TestkitError> {
        for (i, node) in self.nodes.iter().enumerate() {
            let connecting = tokio::time::timeout(Duration::from_millis(500), connect(node));
            if let Ok(Ok(mut conn)) = connecting.await {
                let cmd = redis::cmd("PING");
                let ping = tokio::time::timeout(
                    Duration::from_millis(500),
                    query::<String>(&mut conn, &cmd),
                );
                if let Ok(Ok(_)) = ping.await {
                    return Ok((conn, i));
                }
            }
        }
        Err(not_ready("no node of the cluster answers".into()))
    }

    fn index_of(&self, port: u16) -> Result<usize, TestkitError> {
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .ok_or_else(|| not_ready(format!("no node of the cluster has port {port}")))
    }
}

/// Waits until the answer of every one of `nodes` to `command` holds `needle`.
async fn until_all_say(nodes: &[ValkeyServer], command: &[&str], needle: &str) {
    let what = format!("every node's {} to say {needle}", command.join(" "));
    eventually_async(SETTLE_WITHIN, &what, || async {
        for node in nodes {
            let mut conn = connect(node).await.ok()?;
            let mut cmd = redis::cmd(command[0]);
            cmd.arg(&command[1..]);
            let answer: String = query(&mut conn, &cmd).await.ok()?;
            if !answer.contains(needle) {
                return None;
            }
        }
        Some(())
    })
    .await;
}

/// `(first slot, last slot, primary's port)` of every served range, as `conn`'s node sees it.
async fn slot_owners(
    conn: &mut MultiplexedConnection,
) -> Result<Vec<(u16, u16, u16)>, TestkitError> {
    let ranges: Vec<redis::Value> = query(conn, redis::cmd("CLUSTER").arg("SLOTS")).await?;
    let mut owners = Vec::new();
    for range in ranges {
        let redis::Value::Array(parts) = range else {
            continue;
        };
        let number = |v: Option<&redis::Value>| match v {
            Some(redis::Value::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        };
        let port = match parts.get(2) {
            Some(redis::Value::Array(primary)) => number(primary.get(1)),
            _ => None,
        };
        if let (Some(start), Some(end), Some(port)) =
            (number(parts.first()), number(parts.get(1)), port)
        {
            owners.push((start, end, port));
        }
    }
    Ok(owners)
}

async fn connect(node: &ValkeyServer) -> Result<MultiplexedConnection, TestkitError> {
    let client = redis::Client::open(node.url()).map_err(|e| not_ready(e.to_string()))?;
    client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| not_ready(e.to_string()))
}

async fn query<T: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    cmd: &redis::Cmd,
) -> Result<T, TestkitError> {
    cmd.query_async(conn)
        .await
        .map_err(|e| not_ready(e.to_string()))
}

fn not_ready(detail: String) -> TestkitError {
    TestkitError::NotReady {
        what: "valkey cluster",
        detail,
    }
}

/// One Valkey node or a cluster, for what starts a platform on either (the end-to-end stack,
/// `./dev up`): what it does to "Valkey" (stop, restart, pause) it does to every node.
#[derive(Debug)]
pub enum ValkeyDeployment {
    Node(Box<ValkeyServer>),
    Cluster(ValkeyCluster),
}

impl ValkeyDeployment {
    /// How a service is pointed at it (`FOLLOW_VALKEY_URL`) as `user`: one URL, or every
    /// node's, comma-separated.
    pub fn url_as(&self, user: User) -> String {
        match self {
            Self::Node(node) => node.url_as(user),
            Self::Cluster(cluster) => cluster.urls_as(user),
        }
    }

    pub fn cluster(&mut self) -> Option<&mut ValkeyCluster> {
        match self {
            Self::Cluster(cluster) => Some(cluster),
            Self::Node(_) => None,
        }
    }

    fn nodes(&self) -> Vec<&ValkeyServer> {
        match self {
            Self::Node(node) => vec![&**node],
            Self::Cluster(cluster) => cluster.nodes().iter().collect(),
        }
    }

    fn nodes_mut(&mut self) -> Vec<&mut ValkeyServer> {
        match self {
            Self::Node(node) => vec![&mut **node],
            Self::Cluster(cluster) => cluster.nodes_mut().iter_mut().collect(),
        }
    }

    /// Freezes (`SIGSTOP`) or lets go on (`SIGCONT`) every node.
    pub fn signal(&self, stop: bool) {
        for node in self.nodes() {
            if stop {
                node.pause();
            } else {
                node.resume();
            }
        }
    }

    /// Kills every node (their data is gone).
    pub async fn stop(&mut self) {
        for node in self.nodes_mut() {
            node.stop().await;
        }
    }

    /// Starts every node again (empty).
    pub async fn restart(&mut self) -> Result<(), TestkitError> {
        for node in self.nodes_mut() {
            node.restart().await?;
        }
        Ok(())
    }

    /// Stops every node so that it saves what it has (`SIGTERM`).
    pub async fn shut_down(&mut self) {
        for node in self.nodes_mut() {
            node.shut_down().await;
        }
    }
}
