//! The platform's Valkey as a test sees it: one node, or a Valkey Cluster (its seed nodes'
//! URLs, comma-separated, as the services are given them).

use futures_util::{Stream, StreamExt as _};
use redis::{
    Cmd, Pipeline, PushInfo, PushKind, RedisFuture, Value,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

/// A connection for a test to inspect or poke at the data, wherever its keys live.
#[derive(Clone)]
pub enum ValkeyConnection {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for ValkeyConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Node(_) => "ValkeyConnection::Node",
            Self::Cluster(_) => "ValkeyConnection::Cluster",
        })
    }
}

impl ConnectionLike for ValkeyConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Node(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
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
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// The seed URLs of a cluster, `None` for one node.
fn seeds(url: &str) -> Option<Vec<&str>> {
    let urls: Vec<&str> = url.split(',').map(str::trim).collect();
    (urls.len() > 1).then_some(urls)
}

pub(crate) async fn connect(url: &str) -> anyhow::Result<ValkeyConnection> {
    Ok(match seeds(url) {
        None => ValkeyConnection::Node(
            redis::Client::open(url)?
                .get_multiplexed_async_connection()
                .await?,
        ),
        Some(seeds) => ValkeyConnection::Cluster(
            ClusterClientBuilder::new(seeds)
                .build()?
                .get_async_connection()
                .await?,
        ),
    })
}

/// Whether `url` names a cluster.
pub(crate) fn is_cluster(url: &str) -> bool {
    seeds(url).is_some()
}

/// Every message published on `channel` from now on: `SUBSCRIBE` on one node, `SSUBSCRIBE` on
/// a cluster (where the services publish with `SPUBLISH`).
pub(crate) async fn messages(
    url: &str,
    channel: String,
) -> anyhow::Result<impl Stream<Item = Vec<u8>> + Unpin + use<>> {
    Ok(match seeds(url) {
        None => {
            let mut pubsub = redis::Client::open(url)?.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            pubsub
                .into_on_message()
                .map(|m| m.get_payload_bytes().to_vec())
                .left_stream()
        }
        Some(seeds) => {
            let (pushes, received) = tokio::sync::mpsc::unbounded_channel::<PushInfo>();
            let mut conn = ClusterClientBuilder::new(seeds)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(pushes)
                .build()?
                .get_async_connection()
                .await?;
            conn.ssubscribe(channel).await?;
            futures_util::stream::unfold((received, conn), |(mut received, conn)| async move {
                loop {
                    let push = received.recv().await?;
                    if push.kind == PushKind::SMessage
                        && let [_, Value::BulkString(payload)] = push.data.as_slice()
                    {
                        return Some((payload.clone(), (received, conn)));
                    }
                }
            })
            .boxed()
            .right_stream()
        }
    })
}
