use std::time::Duration;

use crate::{
    BusError, Connection, EntryId, ImageResult, Job, StreamMessage, Valkey,
    guard::QUEUED,
    keys::{self, Partitions},
};

/// Adds messages to the work streams: results to `image:result`, jobs to `image:jobs`, each to
/// the partition of its image.
///
/// Never trims (no `MAXLEN`): an entry its group has not acknowledged must survive, however long
/// its consumers are away. The [`crate::Trimmer`] on the consumer side bounds the streams safely.
#[derive(Clone, Debug)]
pub struct Producer {
    conn: Connection,
    partitions: Partitions,
}

impl Producer {
    pub fn new(valkey: &Valkey) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            partitions: valkey.partitions(),
        })
    }

    /// Adds `result` to its image's partition of `image:result`.
    pub async fn publish(&mut self, result: &ImageResult) -> Result<EntryId, BusError> {
        let stream = keys::RESULTS.stream(self.partitions.of(result.image_id));
        self.add(&stream, result).await
    }

    /// Queues `job` and marks its upload guard [`QUEUED`] for `guard_ttl` in the same `MULTI`,
    /// so the mark means the job is in `image:jobs` (or was taken from it): the reconciler does
    /// not queue it again. (The gateway's receiving lease becomes the token's lifetime here.)
    pub async fn enqueue(&mut self, job: &Job, guard_ttl: Duration) -> Result<EntryId, BusError> {
        let mut set = redis::cmd("SET");
        set.arg(self.partitions.upload_guard(job.image_id))
            .arg(QUEUED)
            .arg("EX")
            .arg(guard_ttl.as_secs().max(1));
        let (id, _): (String, redis::Value) = redis::pipe()
            .atomic()
            .cmd("XADD")
            .arg(keys::JOBS.stream(self.partitions.of(job.image_id)))
            .arg("*")
            .arg(job.to_fields())
            .add_command(set)
            .query_async(&mut self.conn)
            .await?;
        Ok(EntryId(id))
    }

    async fn add(
        &mut self,
        stream: &str,
        message: &impl StreamMessage,
    ) -> Result<EntryId, BusError> {
        let id: String = redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg(message.to_fields())
            .query_async(&mut self.conn)
            .await?;
        Ok(EntryId(id))
    }
}
