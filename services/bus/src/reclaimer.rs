use std::time::Duration;

use redis::Value;

use crate::{
    BusError, Connection, ConsumerConfig, EntryId, Valkey,
    dead_letter::{Counted, drop_over_delivered, with_counts},
    keys::QueuePartition,
    stream::{parse_entries, string},
};

/// Takes over entries left pending by consumers that went away (`XAUTOCLAIM`), moving those
/// delivered too often to the dead stream.
#[derive(Debug)]
pub(crate) struct Reclaimer {
    conn: Connection,
    queue: QueuePartition,
    consumer: String,
    min_idle: Duration,
    max_deliveries: u64,
    page_size: usize,
}

impl Reclaimer {
    /// A reclaimer for the consumer `config` describes.
    pub(crate) fn new(valkey: &Valkey, config: &ConsumerConfig) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            queue: config.queue.at(config.partition),
            consumer: config.consumer.clone(),
            min_idle: config.min_idle,
            max_deliveries: config.max_deliveries,
            page_size: config.batch_size,
        })
    }

    /// Claims one page of entries idle for `min_idle` or more, starting at `cursor` (`0-0` for
    /// the start), dead-lettering those delivered too often.
    pub(crate) async fn claim_page(&mut self, cursor: &EntryId) -> Result<ReclaimPage, BusError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&self.queue.stream)
            .arg(self.queue.group())
            .arg(&self.consumer)
            .arg(u64::try_from(self.min_idle.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor.0.as_str())
            .arg("COUNT")
            .arg(self.page_size)
            .query_async(&mut self.conn)
            .await?;
        // [next-cursor, [entries...], [deleted ids...]]
        let Value::Array(parts) = reply else {
            return Err(BusError::reply(format!("XAUTOCLAIM: {reply:?}")));
        };
        let mut parts = parts.into_iter();
        let next = EntryId(string(parts.next().unwrap_or(Value::Nil))?);
        let claimed = parse_entries(parts.next().unwrap_or(Value::Array(Vec::new())))?;
        if !claimed.is_empty() {
            tracing::info!(stream = %self.queue.stream, count = claimed.len(), consumer = %self.consumer, "reclaimed idle entries");
        }
        let claimed = with_counts(&mut self.conn, &self.queue, claimed).await?;
        let (entries, dead_lettered) = drop_over_delivered(
            &mut self.conn,
            &self.queue,
            &self.consumer,
            self.max_deliveries,
            claimed,
        )
        .await?;
        Ok(ReclaimPage {
            entries,
            dead_lettered,
            next,
        })
    }
}

/// One page of [`Reclaimer::claim_page`].
#[derive(Debug)]
pub(crate) struct ReclaimPage {
    /// The claimed entries that may still be handled (this claim counted).
    pub(crate) entries: Vec<Counted>,
    /// Claimed entries moved to the dead stream for having been delivered too often.
    pub(crate) dead_lettered: u64,
    /// Where the next page starts.
    pub(crate) next: EntryId,
}

impl ReclaimPage {
    pub(crate) fn is_last(&self) -> bool {
        self.next.0 == "0-0"
    }
}
