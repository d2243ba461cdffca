//! What happens to an entry at the end: acknowledged (maybe handing a result off), or moved to
//! its queue's dead stream; and the counts (deliveries, failures) that decide which. Shared by
//! the consumer and the reclaimer.

use crate::{
    BusError, Connection, Entry, EntryId, ImageResult, StreamMessage,
    codec::format_time,
    keys::{self, Partition, Partitions, QueuePartition},
};

/// The dead stream is for operators to inspect; it is capped (approximately) so a flood of
/// poison cannot grow Valkey's memory without bound.
pub(crate) const DEAD_STREAM_MAX_LEN: usize = 100_000;

/// An entry with how often the group delivered it and how often the handler failed on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Counted {
    pub(crate) entry: Entry,
    pub(crate) deliveries: u64,
    pub(crate) failures: u64,
}

/// Copies `entry` with the reason to the dead stream and acknowledges it in one `MULTI` (the
/// `XADD` first, so an entry is never acknowledged without having been kept), with `hand_off`
/// (a result that must reach the API) added to `image:result` in the same transaction.
pub(crate) async fn dead_letter(
    conn: &mut Connection,
    queue: &QueuePartition,
    consumer: &str,
    counted: &Counted,
    reason: &str,
    hand_off: Option<&ImageResult>,
) -> Result<(), BusError> {
    let entry = &counted.entry;
    let mut xadd = redis::cmd("XADD");
    xadd.arg(&queue.dead)
        .arg("MAXLEN")
        .arg("~")
        .arg(DEAD_STREAM_MAX_LEN)
        .arg("*");
    for (name, value) in entry.fields.iter().flatten() {
        xadd.arg(name.as_slice()).arg(value.as_slice());
    }
    xadd.arg("dead_reason")
        .arg(reason)
        .arg("dead_original_id")
        .arg(entry.id.0.as_str())
        .arg("dead_consumer")
        .arg(consumer)
        .arg("dead_deliveries")
        .arg(counted.deliveries)
        .arg("dead_failures")
        .arg(counted.failures)
        .arg("dead_at")
        .arg(format_time(time::OffsetDateTime::now_utc()));
    let mut pipe = redis::pipe();
    pipe.atomic().add_command(xadd).ignore();
    if let Some(result) = hand_off {
        pipe.add_command(result_xadd(result, queue.partition))
            .ignore();
    }
    ack_commands(&mut pipe, queue, std::slice::from_ref(&entry.id));
    pipe.query_async::<()>(conn).await?;
    tracing::warn!(
        stream = %queue.stream,
        entry_id = %entry.id,
        deliveries = counted.deliveries,
        failures = counted.failures,
        reason,
        "entry dead-lettered"
    );
    Ok(())
}

/// `XADD image:result:{pN} * <fields>` on `partition` (the handing-off job's, so that both are
/// in one slot): never trimmed by the producer (see [`crate::Trimmer`]).
pub(crate) fn result_xadd(result: &ImageResult, partition: Partition) -> redis::Cmd {
    let mut xadd = redis::cmd("XADD");
    xadd.arg(keys::RESULTS.stream(partition))
        .arg("*")
        .arg(result.to_fields());
    xadd
}

/// `XACK` of `ids` and the end of their failure counts, added to `pipe`.
pub(crate) fn ack_commands(pipe: &mut redis::Pipeline, queue: &QueuePartition, ids: &[EntryId]) {
    let ids: Vec<&str> = ids.iter().map(|id| id.0.as_str()).collect();
    pipe.cmd("XACK")
        .arg(&queue.stream)
        .arg(queue.group())
        .arg(&ids)
        .ignore()
        .cmd("HDEL")
        .arg(&queue.failures)
        .arg(&ids)
        .ignore();
}

/// Dead-letters the entries delivered more than `max_deliveries` times (a safety net against
/// entries that crash their consumer); returns the others and how many were dead-lettered.
pub(crate) async fn drop_over_delivered(
    conn: &mut Connection,
    queue: &QueuePartition,
    consumer: &str,
    max_deliveries: u64,
    entries: Vec<Counted>,
) -> Result<(Vec<Counted>, u64), BusError> {
    let mut keep = Vec::with_capacity(entries.len());
    let mut dropped = 0;
    for counted in entries {
        if counted.deliveries > max_deliveries {
            let reason = format!(
                "delivered {} times without an outcome (more than {max_deliveries}): it may crash its consumer",
                counted.deliveries
            );
            dead_letter(conn, queue, consumer, &counted, &reason, None).await?;
            dropped += 1;
        } else {
            keep.push(counted);
        }
    }
    Ok((keep, dropped))
}

/// How often each entry has been delivered to the group (from its pending entry) and how often
/// the handler failed on it, in one round trip for the whole batch. An entry no longer pending
/// counts as delivered once.
pub(crate) async fn with_counts(
    conn: &mut Connection,
    queue: &QueuePartition,
    entries: Vec<Entry>,
) -> Result<Vec<Counted>, BusError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for entry in &entries {
        pipe.cmd("XPENDING")
            .arg(&queue.stream)
            .arg(queue.group())
            .arg(entry.id.0.as_str())
            .arg(entry.id.0.as_str())
            .arg(1);
    }
    pipe.cmd("HMGET")
        .arg(&queue.failures)
        .arg(entries.iter().map(|e| e.id.0.as_str()).collect::<Vec<_>>());
    // Each XPENDING: [] or [[id, consumer, idle_ms, times_delivered]]; then the failure counts.
    let mut replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    let failures: Vec<Option<u64>> = match replies.pop() {
        Some(value) => redis::from_redis_value(value).map_err(redis::RedisError::from)?,
        None => Vec::new(),
    };
    entries
        .into_iter()
        .zip(replies)
        .enumerate()
        .map(|(i, (entry, reply))| {
            let pending: Vec<(String, String, u64, u64)> =
                redis::from_redis_value(reply).map_err(redis::RedisError::from)?;
            Ok(Counted {
                entry,
                deliveries: pending.first().map_or(1, |(_, _, _, n)| *n),
                failures: failures.get(i).copied().flatten().unwrap_or(0),
            })
        })
        .collect()
}

/// Where a dead entry is: its partition and its id in that partition's dead stream. Written
/// `pN/<stream id>` (as operators list and name it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadId {
    pub partition: u16,
    pub id: EntryId,
}

impl std::fmt::Display for DeadId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "p{}/{}", self.partition, self.id)
    }
}

impl std::str::FromStr for DeadId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.strip_prefix('p')
            .and_then(|s| s.split_once('/'))
            .and_then(|(p, id)| {
                let id = EntryId(id.to_owned());
                id.successor()?;
                Some(Self {
                    partition: p.parse().ok()?,
                    id,
                })
            })
            .ok_or_else(|| format!("`{s}` is not a dead entry id (pN/<stream id>)"))
    }
}

/// An entry of a dead stream, as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadEntry {
    pub id: DeadId,
    /// The original entry's fields (what is replayed), in order.
    pub fields: Vec<(String, String)>,
    /// Why, where from and when: the `dead_*` fields.
    pub reason: String,
    pub original_id: String,
    pub consumer: String,
    pub deliveries: u64,
    pub failures: u64,
    pub dead_at: String,
}

/// Operators' hands on a queue's dead streams (one per partition): list, inspect, replay onto
/// the queue, drop.
#[derive(Debug, Clone)]
pub struct DeadLetters {
    conn: Connection,
    queue: keys::Queue,
    partitions: Partitions,
}

impl DeadLetters {
    pub fn new(valkey: &crate::Valkey, queue: keys::Queue) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            queue,
            partitions: valkey.partitions(),
        })
    }

    /// Up to `count` entries after `after` (exclusive; `None` from the start): partition by
    /// partition, oldest first in each.
    pub async fn list(
        &mut self,
        after: Option<&DeadId>,
        count: usize,
    ) -> Result<Vec<DeadEntry>, BusError> {
        let mut entries = Vec::new();
        for partition in self.partitions.all() {
            let start = match after {
                Some(after) if after.partition > partition.index() => continue,
                Some(after) if after.partition == partition.index() => format!("({}", after.id),
                _ => "-".to_owned(),
            };
            let reply: redis::Value = redis::cmd("XRANGE")
                .arg(self.queue.dead(partition))
                .arg(start)
                .arg("+")
                .arg("COUNT")
                .arg(count - entries.len())
                .query_async(&mut self.conn)
                .await?;
            entries.extend(
                crate::stream::parse_entries(reply)?
                    .into_iter()
                    .filter_map(|e| dead_entry(partition, e)),
            );
            if entries.len() >= count {
                break;
            }
        }
        Ok(entries)
    }

    /// The entry `id`, if it is there.
    pub async fn show(&mut self, id: &DeadId) -> Result<Option<DeadEntry>, BusError> {
        let partition = self.partition(id)?;
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(self.queue.dead(partition))
            .arg(id.id.0.as_str())
            .arg(id.id.0.as_str())
            .query_async(&mut self.conn)
            .await?;
        Ok(crate::stream::parse_entries(reply)?
            .into_iter()
            .find_map(|e| dead_entry(partition, e)))
    }

    /// Adds the entry's original fields back to its partition's stream and removes it from the
    /// dead stream, in one `MULTI`; returns the new entry's id (`None` when `id` is not there).
    /// Replaying an already applied result changes nothing: applying is idempotent.
    pub async fn replay(&mut self, id: &DeadId) -> Result<Option<EntryId>, BusError> {
        let Some(entry) = self.show(id).await? else {
            return Ok(None);
        };
        let partition = self.partition(id)?;
        let mut xadd = redis::cmd("XADD");
        xadd.arg(self.queue.stream(partition)).arg("*");
        for (name, value) in &entry.fields {
            xadd.arg(name).arg(value);
        }
        let (new, _): (String, i64) = redis::pipe()
            .atomic()
            .add_command(xadd)
            .cmd("XDEL")
            .arg(self.queue.dead(partition))
            .arg(id.id.0.as_str())
            .query_async(&mut self.conn)
            .await?;
        Ok(Some(EntryId(new)))
    }

    /// Removes `id` from the dead stream; `false` when it was not there.
    pub async fn drop_entry(&mut self, id: &DeadId) -> Result<bool, BusError> {
        let removed: i64 = redis::cmd("XDEL")
            .arg(self.queue.dead(self.partition(id)?))
            .arg(id.id.0.as_str())
            .query_async(&mut self.conn)
            .await?;
        Ok(removed == 1)
    }

    fn partition(&self, id: &DeadId) -> Result<Partition, BusError> {
        self.partitions.get(id.partition).ok_or_else(|| {
            BusError::Invalid(format!(
                "there is no partition {} (there are {})",
                id.partition, self.partitions
            ))
        })
    }
}

fn dead_entry(partition: Partition, entry: Entry) -> Option<DeadEntry> {
    let mut dead = DeadEntry {
        id: DeadId {
            partition: partition.index(),
            id: entry.id,
        },
        fields: Vec::new(),
        reason: String::new(),
        original_id: String::new(),
        consumer: String::new(),
        deliveries: 0,
        failures: 0,
        dead_at: String::new(),
    };
    for (name, value) in entry.fields? {
        let (name, value) = (
            String::from_utf8_lossy(&name).into_owned(),
            String::from_utf8_lossy(&value).into_owned(),
        );
        match name.as_str() {
            "dead_reason" => dead.reason = value,
            "dead_original_id" => dead.original_id = value,
            "dead_consumer" => dead.consumer = value,
            "dead_deliveries" => dead.deliveries = value.parse().unwrap_or(0),
            "dead_failures" => dead.failures = value.parse().unwrap_or(0),
            "dead_at" => dead.dead_at = value,
            _ => dead.fields.push((name, value)),
        }
    }
    Some(dead)
}
