use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::{
    BusError, Connection, EntryId, Valkey,
    keys::{Partitions, Queue, QueuePartition},
};

/// Bounds a queue's streams (each partition's) without ever dropping an entry its group has not acknowledged.
///
/// Every entry at or below the group's last-delivered id that is not pending has been
/// acknowledged; entries above it have not been delivered yet. So the cut is the oldest pending
/// entry if there is one, else just above the last-delivered id — `XTRIM MINID` keeps everything
/// from there on. Both bounds only grow, so reading them before trimming is race-free.
#[derive(Debug)]
pub struct Trimmer {
    conn: Connection,
    queue: Queue,
    partitions: Partitions,
}

impl Trimmer {
    pub fn new(valkey: &Valkey, queue: Queue) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            queue,
            partitions: valkey.partitions(),
        })
    }

    /// Trims every `every` until `cancel`; errors are logged and tried again next time.
    pub async fn run(mut self, every: Duration, cancel: CancellationToken) {
        loop {
            for partition in self.partitions.all() {
                let queue = self.queue.at(partition);
                if let Err(e) = self.trim_partition(&queue).await {
                    tracing::warn!(stream = %queue.stream, error = %e, "trimming failed");
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }

    /// Trims every partition once; returns how many entries were removed. Where the group does
    /// not exist nothing is trimmed.
    pub async fn trim(&mut self) -> Result<u64, BusError> {
        let mut removed = 0;
        for partition in self.partitions.all() {
            removed += self.trim_partition(&self.queue.at(partition)).await?;
        }
        Ok(removed)
    }

    async fn trim_partition(&mut self, queue: &QueuePartition) -> Result<u64, BusError> {
        let Some(min_id) = self.keep_from(queue).await? else {
            return Ok(0);
        };
        let removed: u64 = redis::cmd("XTRIM")
            .arg(&queue.stream)
            .arg("MINID")
            .arg(min_id.0.as_str())
            .query_async(&mut self.conn)
            .await?;
        if removed > 0 {
            tracing::debug!(stream = %queue.stream, removed, %min_id, "trimmed acknowledged entries");
        }
        Ok(removed)
    }

    /// The smallest id that must be kept, or `None` when the group does not exist.
    async fn keep_from(&mut self, queue: &QueuePartition) -> Result<Option<EntryId>, BusError> {
        let Some(group) = crate::health::group(&mut self.conn, queue).await? else {
            return Ok(None);
        };
        if group.pending > 0 {
            let summary: redis::streams::StreamPendingReply = redis::cmd("XPENDING")
                .arg(&queue.stream)
                .arg(queue.group())
                .query_async(&mut self.conn)
                .await?;
            if let redis::streams::StreamPendingReply::Data(data) = summary {
                return Ok(Some(EntryId(data.start_id)));
            }
        }
        EntryId(group.last_delivered_id)
            .successor()
            .map(Some)
            .ok_or_else(|| BusError::reply("last-delivered-id is not a stream id"))
    }
}
