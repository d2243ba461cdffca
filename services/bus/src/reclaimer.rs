use std::time::Duration;

use redis::{Value, aio::ConnectionManager};

use crate::{
    BusError, Entry, EntryId, Valkey,
    dead_letter::{drop_over_delivered, with_delivery_counts},
    keys,
    stream::{parse_entries, string},
};

/// Takes over results left pending by consumers that went away (`XAUTOCLAIM`), moving those
/// delivered too often to the dead stream.
#[derive(Debug)]
pub struct Reclaimer {
    conn: ConnectionManager,
    group: String,
    consumer: String,
    min_idle: Duration,
    max_deliveries: u64,
    page_size: usize,
}

impl Reclaimer {
    pub fn new(
        valkey: &Valkey,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        max_deliveries: u64,
        page_size: usize,
    ) -> Result<Self, BusError> {
        Ok(Self {
            conn: valkey.connection()?,
            group: group.to_owned(),
            consumer: consumer.to_owned(),
            min_idle,
            max_deliveries,
            page_size,
        })
    }

    /// Claims one page of entries idle for `min_idle` or more, starting at `cursor` (`0-0` for
    /// the start), dead-lettering those delivered too often.
    pub async fn claim_page(&mut self, cursor: &EntryId) -> Result<ReclaimPage, BusError> {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(keys::RESULT_STREAM)
            .arg(&self.group)
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
            tracing::info!(count = claimed.len(), consumer = %self.consumer, "reclaimed idle results");
        }
        let claimed = with_delivery_counts(&mut self.conn, &self.group, claimed).await?;
        let (entries, dead_lettered) = drop_over_delivered(
            &mut self.conn,
            &self.group,
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

    /// Walks every page, returning every entry that may still be handled.
    pub async fn claim_all(&mut self) -> Result<Vec<(Entry, u64)>, BusError> {
        let mut cursor = EntryId("0-0".into());
        let mut all = Vec::new();
        loop {
            let page = self.claim_page(&cursor).await?;
            let last = page.is_last();
            all.extend(page.entries);
            if last {
                return Ok(all);
            }
            cursor = page.next;
        }
    }
}

/// One page of [`Reclaimer::claim_page`].
#[derive(Debug)]
pub struct ReclaimPage {
    /// The claimed entries that may still be handled, each with its delivery count (this claim
    /// included).
    pub entries: Vec<(Entry, u64)>,
    /// Claimed entries moved to the dead stream for having been delivered too often.
    pub dead_lettered: u64,
    /// Where the next page starts.
    pub next: EntryId,
}

impl ReclaimPage {
    pub fn is_last(&self) -> bool {
        self.next.0 == "0-0"
    }
}
