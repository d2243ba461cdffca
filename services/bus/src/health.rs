use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::try_join_all;

use crate::{
    BusError, Connection, EntryId, Valkey,
    keys::{Partition, Queue, QueuePartition},
};

/// Whether Valkey answers, and the state of a queue (for health and metrics).
#[derive(Clone, Debug)]
pub struct HealthChecker {
    valkey: Valkey,
    conn: Connection,
    queue: Option<Queue>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// `PING` answered.
    pub valkey: bool,
    /// Whether the queue's group exists on every partition; `None` when not checked (or Valkey
    /// is down).
    pub group: Option<bool>,
}

impl HealthChecker {
    /// `queue`: the queue whose group this service consumes, or `None` to only ping.
    pub fn new(valkey: &Valkey, queue: Option<Queue>) -> Result<Self, BusError> {
        Ok(Self {
            valkey: valkey.clone(),
            conn: valkey.connection()?,
            queue,
        })
    }

    /// The connections to Valkey this process holds ([`Valkey::open_connections`]).
    pub fn open_connections(&self) -> u64 {
        self.valkey.open_connections()
    }

    pub async fn check(&mut self) -> Health {
        let ping: Result<String, _> = redis::cmd("PING").query_async(&mut self.conn).await;
        if let Err(e) = ping {
            tracing::debug!(error = %e, "valkey health: PING failed");
            return Health {
                valkey: false,
                group: None,
            };
        }
        let group = match self.queue {
            None => None,
            Some(queue) => {
                let groups = self.valkey.partitions().all().map(|p| {
                    let mut conn = self.conn.clone();
                    async move { group(&mut conn, &queue.at(p)).await }
                });
                Some(
                    try_join_all(groups)
                        .await
                        .is_ok_and(|groups| groups.iter().all(Option::is_some)),
                )
            }
        };
        Health {
            valkey: true,
            group,
        }
    }

    /// The backlog of `queue` on all its partitions together, `None` when its group exists on
    /// none.
    pub async fn queue_info(&mut self, queue: Queue) -> Result<Option<QueueInfo>, BusError> {
        let partitions = self.partitions_info(queue).await?;
        Ok(QueueInfo::total(
            partitions.into_iter().filter_map(|(_, info)| info),
        ))
    }

    /// The backlog of each partition of `queue` (`None` where its group does not exist).
    pub async fn partitions_info(
        &mut self,
        queue: Queue,
    ) -> Result<Vec<(Partition, Option<QueueInfo>)>, BusError> {
        let infos = self.valkey.partitions().all().map(|p| {
            let mut conn = self.conn.clone();
            async move { Ok::<_, BusError>((p, partition_info(&mut conn, &queue.at(p)).await?)) }
        });
        try_join_all(infos).await
    }
}

/// The backlog of one partition of a queue, `None` when its group does not exist.
async fn partition_info(
    conn: &mut Connection,
    queue: &QueuePartition,
) -> Result<Option<QueueInfo>, BusError> {
    let Some(group) = group(conn, queue).await? else {
        return Ok(None);
    };
    let mut pipe = redis::pipe();
    // The oldest pending entry, the oldest undelivered one, and the dead stream's size.
    pipe.cmd("XPENDING")
        .arg(&queue.stream)
        .arg(queue.group())
        .cmd("XRANGE")
        .arg(&queue.stream)
        .arg(format!("({}", group.last_delivered_id))
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .cmd("XLEN")
        .arg(&queue.dead)
        .cmd("XRANGE")
        .arg(&queue.dead)
        .arg("-")
        .arg("+")
        .arg("COUNT")
        .arg(1);
    type Entries = Vec<(String, redis::Value)>;
    let (pending, undelivered, dead, oldest_dead): (
        redis::streams::StreamPendingReply,
        Entries,
        u64,
        Entries,
    ) = pipe.query_async(conn).await?;
    let oldest_pending = match pending {
        redis::streams::StreamPendingReply::Data(data) => Some(EntryId(data.start_id)),
        _ => None,
    };
    let oldest_undelivered = undelivered.into_iter().next().map(|(id, _)| EntryId(id));
    let oldest = [oldest_pending, oldest_undelivered]
        .into_iter()
        .flatten()
        .filter_map(|id| age(&id))
        .max();
    Ok(Some(QueueInfo {
        pending: group.pending,
        lag: group.lag,
        oldest,
        dead,
        oldest_dead: oldest_dead
            .into_iter()
            .next()
            .and_then(|(id, _)| age(&EntryId(id))),
    }))
}

/// The backlog of a queue (`XINFO GROUPS`, `XPENDING`, the dead stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    /// Delivered, not acknowledged.
    pub pending: u64,
    /// Not delivered yet; `None` when Valkey cannot tell (after deletions it may not).
    pub lag: Option<u64>,
    /// Age of the oldest entry not acknowledged yet (pending or undelivered).
    pub oldest: Option<Duration>,
    /// Entries in the dead stream, and the age of the oldest.
    pub dead: u64,
    pub oldest_dead: Option<Duration>,
}

impl QueueInfo {
    /// Several partitions' backlogs as one: counts add up, ages are the oldest; `None` for none.
    pub fn total(infos: impl IntoIterator<Item = QueueInfo>) -> Option<QueueInfo> {
        infos.into_iter().reduce(|a, b| QueueInfo {
            pending: a.pending + b.pending,
            lag: a.lag.zip(b.lag).map(|(a, b)| a + b),
            oldest: a.oldest.max(b.oldest),
            dead: a.dead + b.dead,
            oldest_dead: a.oldest_dead.max(b.oldest_dead),
        })
    }
}

/// How long ago an entry was added (its id is its time in milliseconds).
fn age(id: &EntryId) -> Option<Duration> {
    let ms: u64 = id.0.split_once('-')?.0.parse().ok()?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some(now.saturating_sub(Duration::from_millis(ms)))
}

/// What `XINFO GROUPS` says of a queue's group.
pub(crate) struct GroupState {
    pub(crate) pending: u64,
    pub(crate) lag: Option<u64>,
    pub(crate) last_delivered_id: String,
}

/// The queue's group, `None` when it (or its stream) does not exist.
pub(crate) async fn group(
    conn: &mut Connection,
    queue: &QueuePartition,
) -> Result<Option<GroupState>, BusError> {
    let groups: Result<redis::streams::StreamInfoGroupsReply, _> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&queue.stream)
        .query_async(conn)
        .await;
    match groups {
        Ok(g) => Ok(g
            .groups
            .into_iter()
            .find(|g| g.name == queue.group())
            .map(|g| GroupState {
                pending: g.pending as u64,
                lag: g.lag.map(|l| l as u64),
                last_delivered_id: g.last_delivered_id,
            })),
        Err(e) if e.code() == Some("ERR") => Ok(None), // no such stream yet
        Err(e) => Err(e.into()),
    }
}
