//! The `XREADGROUP` loop that feeds results to a handler.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    BusError, Entry, EntryId, ImageResult, Reclaimer, Valkey,
    dead_letter::{dead_letter, drop_over_delivered, with_delivery_counts},
    keys,
    stream::parse_read_reply,
};

/// What to do with one delivered result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Applied (or nothing to apply): acknowledge it.
    Ack,
    /// A transient failure (the database is down): keep it pending and hand it to the handler
    /// again after a backoff. Never dead-letters, however long it lasts.
    Retry,
    /// It can never be applied: move it to the dead stream with this reason, then acknowledge.
    DeadLetter(String),
}

/// One result handed to the [`Handler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub id: EntryId,
    pub result: ImageResult,
    /// How many times the group has delivered this entry, this delivery included.
    pub deliveries: u64,
}

/// Applies results. Called with a batch of one or more (up to `batch_size`, more when there is a
/// backlog); must return one [`Outcome`] per delivery, in order. It is called again with the same
/// results after a crash or a [`Outcome::Retry`], so applying must be idempotent.
pub trait Handler: Send {
    fn handle(&mut self, batch: &[Delivery]) -> impl Future<Output = Vec<Outcome>> + Send;
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub group: String,
    /// Unique per process (and stable across its restarts, if it is to re-read its own pending
    /// entries first; otherwise the reclaimer picks them up after `min_idle`).
    pub consumer: String,
    /// `COUNT` of each read: the largest batch handed to the handler.
    pub batch_size: usize,
    /// `BLOCK` of each read: how long a read waits for new entries.
    pub block: Duration,
    /// An entry delivered more often than this is dead-lettered instead of handled again.
    pub max_deliveries: u64,
    /// Entries idle this long in another consumer's pending list are taken over.
    pub min_idle: Duration,
    pub reclaim_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl ConsumerConfig {
    pub fn new(consumer: impl Into<String>) -> Self {
        Self {
            group: keys::RESULT_GROUP.to_owned(),
            consumer: consumer.into(),
            batch_size: 64,
            block: Duration::from_secs(2),
            max_deliveries: 10,
            min_idle: Duration::from_secs(60),
            reclaim_interval: Duration::from_secs(15),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Results handed to the handler (a retried result counts each time).
    pub handled: AtomicU64,
    pub acked: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Entries taken over from other consumers.
    pub reclaimed: AtomicU64,
}

/// Reads `image:result` as one consumer of a group and feeds a [`Handler`].
///
/// On start (and after any error) it first re-reads its own pending entries, then reads new ones
/// with `BLOCK`; every `reclaim_interval` it takes over entries idle in other consumers with the
/// [`Reclaimer`]. It creates the group (`MKSTREAM`, from the start of the stream) when missing,
/// including after Valkey lost its data (`NOGROUP`). It acknowledges only what the handler says is
/// done; on cancellation it stops between batches, and whatever it had not acknowledged stays
/// pending, to be re-read or reclaimed: nothing is lost.
#[derive(Debug)]
pub struct Consumer {
    reader: ConnectionManager,
    conn: ConnectionManager,
    reclaimer: Reclaimer,
    config: ConsumerConfig,
    stats: Arc<ConsumerStats>,
}

/// Where the next read comes from.
enum Cursor {
    /// Our own pending entries after this id.
    Pending(EntryId),
    /// New entries (`>`).
    New,
}

impl Cursor {
    fn start() -> Self {
        Cursor::Pending(EntryId("0".into()))
    }
}

impl Consumer {
    pub fn new(valkey: &Valkey, config: ConsumerConfig) -> Result<Self, BusError> {
        let reclaimer = Reclaimer::new(
            valkey,
            &config.group,
            &config.consumer,
            config.min_idle,
            config.max_deliveries,
            config.batch_size,
        )?;
        Ok(Self {
            reader: valkey.blocking_connection(config.block)?,
            conn: valkey.connection()?,
            reclaimer,
            config,
            stats: Arc::default(),
        })
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Creates the group from the start of the stream (and the stream) unless it exists.
    pub async fn ensure_group(&mut self) -> Result<(), BusError> {
        ensure_group(&mut self.conn, &self.config.group).await
    }

    /// Runs until `cancel`. Bus errors are logged and retried with backoff, never returned.
    pub async fn run<H: Handler>(mut self, handler: &mut H, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut cursor = Cursor::start();
        let mut group_ready = false;
        let mut next_reclaim = Instant::now();
        tracing::info!(consumer = %self.config.consumer, group = %self.config.group, "result consumer started");
        while !cancel.is_cancelled() {
            let step = self
                .step(
                    handler,
                    &cancel,
                    &mut cursor,
                    &mut group_ready,
                    &mut next_reclaim,
                )
                .await;
            match step {
                Ok(()) => backoff.reset(),
                Err(e) => {
                    // Whatever was half done is still pending: re-read it once the bus is back.
                    cursor = Cursor::start();
                    if e.is_nogroup() {
                        tracing::warn!(
                            "consumer group is gone (Valkey lost its data?); recreating it"
                        );
                        group_ready = false;
                        continue;
                    }
                    tracing::warn!(error = %e, "result consumer: bus error; retrying");
                    if sleep_or_cancel(backoff.next(), &cancel).await {
                        break;
                    }
                }
            }
        }
        tracing::info!(consumer = %self.config.consumer, "result consumer stopped");
    }

    async fn step<H: Handler>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
        cursor: &mut Cursor,
        group_ready: &mut bool,
        next_reclaim: &mut Instant,
    ) -> Result<(), BusError> {
        if !*group_ready {
            self.ensure_group().await?;
            *group_ready = true;
        }
        if Instant::now() >= *next_reclaim {
            self.reclaim(handler, cancel).await?;
            *next_reclaim = Instant::now() + self.config.reclaim_interval;
        }
        match cursor {
            Cursor::Pending(after) => {
                let entries = self.read(after.0.as_str(), None).await?;
                let Some(last) = entries.last().map(|e| e.id.clone()) else {
                    *cursor = Cursor::New;
                    return Ok(());
                };
                let entries =
                    with_delivery_counts(&mut self.conn, &self.config.group, entries).await?;
                self.process(handler, cancel, entries).await?;
                *cursor = Cursor::Pending(last);
            }
            Cursor::New => {
                let block = self.config.block;
                let entries = tokio::select! {
                    read = self.read(">", Some(block)) => read?,
                    // Anything delivered to us meanwhile stays pending for the next start.
                    () = cancel.cancelled() => return Ok(()),
                };
                let entries = entries.into_iter().map(|e| (e, 1)).collect();
                self.process(handler, cancel, entries).await?;
            }
        }
        Ok(())
    }

    async fn read(&mut self, from: &str, block: Option<Duration>) -> Result<Vec<Entry>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(self.config.batch_size);
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        cmd.arg("STREAMS").arg(keys::RESULT_STREAM).arg(from);
        parse_read_reply(cmd.query_async(&mut self.reader).await?)
    }

    /// Takes over entries idle in other consumers, page by page, and handles them.
    async fn reclaim<H: Handler>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
    ) -> Result<(), BusError> {
        let mut cursor = EntryId("0-0".into());
        loop {
            let page = self.reclaimer.claim_page(&cursor).await?;
            let claimed = page.entries.len() as u64 + page.dead_lettered;
            self.stats.reclaimed.fetch_add(claimed, Relaxed);
            self.stats
                .dead_lettered
                .fetch_add(page.dead_lettered, Relaxed);
            let last = page.is_last();
            self.process(handler, cancel, page.entries).await?;
            if last || cancel.is_cancelled() {
                return Ok(());
            }
            cursor = page.next;
        }
    }

    /// Sorts out deleted, over-delivered and poison entries, then hands the rest to the handler.
    async fn process<H: Handler>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
        entries: Vec<(Entry, u64)>,
    ) -> Result<(), BusError> {
        let (group, consumer) = (&self.config.group, &self.config.consumer);
        let (entries, dead_lettered) = drop_over_delivered(
            &mut self.conn,
            group,
            consumer,
            self.config.max_deliveries,
            entries,
        )
        .await?;
        self.stats.dead_lettered.fetch_add(dead_lettered, Relaxed);
        let mut deleted = Vec::new();
        let mut batch = Vec::with_capacity(entries.len());
        for (entry, deliveries) in entries {
            let Some(fields) = &entry.fields else {
                deleted.push(entry.id);
                continue;
            };
            match ImageResult::from_fields(fields) {
                Ok(result) => batch.push((
                    Delivery {
                        id: entry.id.clone(),
                        result,
                        deliveries,
                    },
                    entry,
                )),
                Err(e) => {
                    let reason = format!("poison: {e}");
                    dead_letter(&mut self.conn, group, consumer, &entry, deliveries, &reason)
                        .await?;
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                }
            }
        }
        // Deleted while pending: there is nothing left to apply.
        self.ack(deleted).await?;
        self.deliver(handler, cancel, batch).await
    }

    async fn deliver<H: Handler>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
        mut todo: Vec<(Delivery, Entry)>,
    ) -> Result<(), BusError> {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        while !todo.is_empty() {
            let deliveries: Vec<Delivery> = todo.iter().map(|(d, _)| d.clone()).collect();
            self.stats
                .handled
                .fetch_add(deliveries.len() as u64, Relaxed);
            let outcomes = handler.handle(&deliveries).await;
            if outcomes.len() != deliveries.len() {
                tracing::error!(
                    expected = deliveries.len(),
                    got = outcomes.len(),
                    "handler returned the wrong number of outcomes; retrying the rest"
                );
            }
            let mut acks = Vec::new();
            let mut retry = Vec::new();
            let outcomes = outcomes
                .into_iter()
                .chain(std::iter::repeat(Outcome::Retry));
            for ((delivery, entry), outcome) in todo.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Ack => acks.push(delivery.id),
                    Outcome::Retry => retry.push((delivery, entry)),
                    Outcome::DeadLetter(reason) => {
                        let (group, consumer) = (&self.config.group, &self.config.consumer);
                        dead_letter(
                            &mut self.conn,
                            group,
                            consumer,
                            &entry,
                            delivery.deliveries,
                            &reason,
                        )
                        .await?;
                        self.stats.dead_lettered.fetch_add(1, Relaxed);
                    }
                }
            }
            self.ack(acks).await?;
            todo = retry;
            if todo.is_empty() {
                break;
            }
            self.stats.retried.fetch_add(todo.len() as u64, Relaxed);
            // Keep the entries ours while we wait: resetting their idle time stops other
            // consumers from reclaiming them (and raising their delivery count) during an outage.
            self.touch(todo.iter().map(|(d, _)| &d.id)).await?;
            if sleep_or_cancel(backoff.next(), cancel).await {
                break;
            }
        }
        Ok(())
    }

    async fn ack(&mut self, ids: Vec<EntryId>) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let n = ids.len() as u64;
        redis::cmd("XACK")
            .arg(keys::RESULT_STREAM)
            .arg(&self.config.group)
            .arg(ids.iter().map(|id| id.0.as_str()).collect::<Vec<_>>())
            .query_async::<()>(&mut self.conn)
            .await?;
        self.stats.acked.fetch_add(n, Relaxed);
        Ok(())
    }

    /// `XCLAIM … 0 … JUSTID`: resets idle time without counting a delivery.
    async fn touch<'a>(&mut self, ids: impl Iterator<Item = &'a EntryId>) -> Result<(), BusError> {
        redis::cmd("XCLAIM")
            .arg(keys::RESULT_STREAM)
            .arg(&self.config.group)
            .arg(&self.config.consumer)
            .arg(0)
            .arg(ids.map(|id| id.0.as_str()).collect::<Vec<_>>())
            .arg("JUSTID")
            .query_async::<()>(&mut self.conn)
            .await?;
        Ok(())
    }
}

pub(crate) async fn ensure_group(
    conn: &mut ConnectionManager,
    group: &str,
) -> Result<(), BusError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(keys::RESULT_STREAM)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => Ok(other?),
    }
}

/// Returns true when cancelled before the delay ran out.
async fn sleep_or_cancel(delay: Duration, cancel: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => false,
        () = cancel.cancelled() => true,
    }
}

/// Doubling delays between `min` and `max`.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }

    fn next(&mut self) -> Duration {
        let now = self.next;
        self.next = (self.next * 2).min(self.max);
        now
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}
