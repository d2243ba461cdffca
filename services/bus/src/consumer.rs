//! The `XREADGROUP` loop that feeds a queue's messages to a handler: `image:result` to the API's
//! result applier, `image:jobs` to the gateway's pipeline workers. One machinery for both.
//!
//! A consumer reads one partition of its queue (a multi-stream read would cross hash slots on a
//! cluster); a service runs consumers on every partition (see `follow_service::Workers`).

use std::{
    future::Future,
    marker::PhantomData,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    Backoff, BusError, Connection, Entry, EntryId, ImageResult, Open, Reclaimer, StreamMessage,
    Valkey,
    dead_letter::{
        Counted, ack_commands, dead_letter, drop_over_delivered, result_xadd, with_counts,
    },
    keys::{Partition, Partitions, Queue, QueuePartition},
    stream::parse_read_reply,
};

/// What to do with one delivered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or nothing to do): acknowledge it.
    Ack,
    /// Done: add this result to `image:result` and acknowledge, in one `MULTI` (the gateway's
    /// hand-off of a processed job to the API).
    HandOff(ImageResult),
    /// A transient failure (a dependency is down): keep it pending and hand it to the handler
    /// again after a backoff. Never counted, never dead-lettered, however long it lasts.
    Retry,
    /// The handler failed on it: counted, and handed again after a backoff until it failed
    /// `max_failures` times, then dead-lettered with this reason.
    Fail(String),
    /// It can never be handled: move it to the dead stream with this reason (and hand `result`
    /// off to `image:result` in the same `MULTI`, when there is one), then acknowledge.
    DeadLetter {
        reason: String,
        hand_off: Option<ImageResult>,
    },
}

impl Outcome {
    pub fn dead_letter(reason: impl Into<String>) -> Self {
        Self::DeadLetter {
            reason: reason.into(),
            hand_off: None,
        }
    }
}

/// One message handed to the [`Handler`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery<M> {
    pub id: EntryId,
    pub message: M,
    /// How many times the group has delivered this entry, this delivery included (restarts of
    /// its consumer count too: for crash loops, not for failures).
    pub deliveries: u64,
    /// How many times the handler failed on it before ([`Outcome::Fail`]).
    pub failures: u64,
}

/// Handles messages. Called with a batch of one or more (up to `batch_size`); must return one
/// [`Outcome`] per delivery, in order. It is called again with the same messages after a crash
/// or a [`Outcome::Retry`] / [`Outcome::Fail`], so handling must be idempotent.
pub trait Handler<M>: Send {
    fn handle(&mut self, batch: &[Delivery<M>]) -> impl Future<Output = Vec<Outcome>> + Send;
}

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub queue: Queue,
    /// The partition of `queue` this consumer reads.
    pub partition: Partition,
    /// Unique per process (and stable across its restarts, if it is to re-read its own pending
    /// entries first; otherwise the reclaimer picks them up after `min_idle`).
    pub consumer: String,
    /// `COUNT` of each read: the largest batch handed to the handler.
    pub batch_size: usize,
    /// `BLOCK` of each read: how long a read waits for new entries.
    pub block: Duration,
    /// Handler failures after which an entry is dead-lettered.
    pub max_failures: u64,
    /// Deliveries after which an entry is dead-lettered unhandled: a safety net against an
    /// entry that crashes its consumer every time. Restarts of a consumer re-deliver its pending
    /// entries, so this is far above what crashes alone cause.
    pub max_deliveries: u64,
    /// The lease: entries idle this long in another consumer's pending list are taken over.
    /// While a batch is being handled its entries are touched every third of it, so a slow
    /// handler keeps them.
    pub min_idle: Duration,
    pub reclaim_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl ConsumerConfig {
    /// A consumer of `queue`'s first partition (see [`ConsumerConfig::on`]).
    pub fn new(queue: Queue, consumer: impl Into<String>) -> Self {
        Self {
            queue,
            partition: Partitions::DEFAULT
                .all()
                .next()
                .expect("one partition at least"),
            consumer: consumer.into(),
            batch_size: 64,
            block: Duration::from_secs(2),
            max_failures: 5,
            max_deliveries: 100,
            min_idle: Duration::from_secs(60),
            reclaim_interval: Duration::from_secs(15),
            backoff_min: Duration::from_millis(100),
            // Short: once Valkey (or what the handler waits for) is back, work resumes within
            // about a second.
            backoff_max: Duration::from_secs(1),
        }
    }
}

impl ConsumerConfig {
    /// The same consumer on `partition` (its name may stay: each partition has its own group).
    pub fn on(&self, partition: Partition) -> Self {
        Self {
            partition,
            ..self.clone()
        }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Messages handed to the handler (a retried one counts each time).
    pub handled: AtomicU64,
    pub acked: AtomicU64,
    /// Handlings answered with [`Outcome::Retry`] or [`Outcome::Fail`].
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    /// Entries taken over from other consumers.
    pub reclaimed: AtomicU64,
}

/// Reads a queue as one consumer of its group and feeds a [`Handler`].
///
/// On start (and after any error) it first re-reads its own pending entries, then reads new ones
/// with `BLOCK`; every `reclaim_interval` it takes over entries idle in other consumers with the
/// [`Reclaimer`]. It creates the group (`MKSTREAM`, from the start of the stream) when missing,
/// including after Valkey lost its data (`NOGROUP`). It acknowledges only what the handler says is
/// done; on cancellation it stops between batches, and whatever it had not acknowledged stays
/// pending, to be re-read or reclaimed: nothing is lost.
#[derive(Debug)]
pub struct Consumer<M> {
    reader: Connection,
    /// `reader` counted as open while this consumer lives.
    _reader_open: Open,
    conn: Connection,
    reclaimer: Reclaimer,
    config: ConsumerConfig,
    keys: QueuePartition,
    stats: Arc<ConsumerStats>,
    message: PhantomData<fn() -> M>,
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

/// A decoded entry ready for the handler, with the raw entry for dead-lettering.
type Todo<M> = (Delivery<M>, Counted);

impl<M: StreamMessage + Clone + Send + Sync> Consumer<M> {
    pub fn new(valkey: &Valkey, config: ConsumerConfig) -> Result<Self, BusError> {
        let reclaimer = Reclaimer::new(valkey, &config)?;
        let (reader, _reader_open) = valkey.blocking_connection(config.block)?;
        Ok(Self {
            reader,
            _reader_open,
            conn: valkey.connection()?,
            reclaimer,
            keys: config.queue.at(config.partition),
            config,
            stats: Arc::default(),
            message: PhantomData,
        })
    }

    /// Shares `stats` (e.g. one set for several consumers of one process).
    pub fn with_stats(mut self, stats: Arc<ConsumerStats>) -> Self {
        self.stats = stats;
        self
    }

    pub fn stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.stats)
    }

    /// Creates the group from the start of the stream (and the stream) unless it exists.
    pub async fn ensure_group(&mut self) -> Result<(), BusError> {
        ensure_group(&mut self.conn, &self.keys).await
    }

    /// Runs until `cancel`. Bus errors are logged and retried with backoff, never returned.
    pub async fn run<H: Handler<M>>(mut self, handler: &mut H, cancel: CancellationToken) {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        let mut cursor = Cursor::start();
        let mut group_ready = false;
        let (mut next_reclaim, mut failing) = (Instant::now(), false);
        let (stream, consumer) = (self.keys.stream.clone(), self.config.consumer.clone());
        tracing::info!(stream, %consumer, "consumer started");
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
                Ok(()) => {
                    backoff.reset();
                    if failing {
                        failing = false;
                        tracing::info!(stream, "consumer: the bus answers again");
                    }
                }
                Err(e) => {
                    // Whatever was half done is still pending: re-read it once the bus is back.
                    cursor = Cursor::start();
                    if e.is_nogroup() {
                        tracing::warn!(
                            stream,
                            "consumer group is gone (Valkey lost its data?); recreating it"
                        );
                        group_ready = false;
                        continue;
                    }
                    // Once per outage: every partition's consumer retries about every second.
                    if failing {
                        tracing::debug!(stream, error = %e, "consumer: bus error; retrying");
                    } else {
                        tracing::warn!(stream, error = %e, "consumer: bus error; retrying");
                    }
                    failing = true;
                    if sleep_or_cancel(backoff.delay(), &cancel).await {
                        break;
                    }
                }
            }
        }
        tracing::info!(stream, %consumer, "consumer stopped");
    }

    async fn step<H: Handler<M>>(
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
                let entries = with_counts(&mut self.conn, &self.keys, entries).await?;
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
                let entries = entries
                    .into_iter()
                    .map(|entry| Counted {
                        entry,
                        deliveries: 1,
                        failures: 0,
                    })
                    .collect();
                self.process(handler, cancel, entries).await?;
            }
        }
        Ok(())
    }

    async fn read(&mut self, from: &str, block: Option<Duration>) -> Result<Vec<Entry>, BusError> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.keys.group())
            .arg(&self.config.consumer)
            .arg("COUNT")
            .arg(self.config.batch_size);
        if let Some(block) = block {
            cmd.arg("BLOCK")
                .arg(u64::try_from(block.as_millis()).unwrap_or(u64::MAX));
        }
        cmd.arg("STREAMS").arg(&self.keys.stream).arg(from);
        parse_read_reply(cmd.query_async(&mut self.reader).await?)
    }

    /// Takes over entries idle in other consumers, page by page, and handles them.
    async fn reclaim<H: Handler<M>>(
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
    async fn process<H: Handler<M>>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
        entries: Vec<Counted>,
    ) -> Result<(), BusError> {
        let (queue, consumer) = (&self.keys, self.config.consumer.as_str());
        let (entries, dead_lettered) = drop_over_delivered(
            &mut self.conn,
            queue,
            consumer,
            self.config.max_deliveries,
            entries,
        )
        .await?;
        self.stats.dead_lettered.fetch_add(dead_lettered, Relaxed);
        let mut deleted = Vec::new();
        let mut batch = Vec::with_capacity(entries.len());
        for counted in entries {
            let Some(fields) = &counted.entry.fields else {
                deleted.push(counted.entry.id);
                continue;
            };
            match M::from_fields(fields) {
                Ok(message) => batch.push((
                    Delivery {
                        id: counted.entry.id.clone(),
                        message,
                        deliveries: counted.deliveries,
                        failures: counted.failures,
                    },
                    counted,
                )),
                Err(e) => {
                    let reason = format!("poison: {e}");
                    dead_letter(&mut self.conn, queue, consumer, &counted, &reason, None).await?;
                    self.stats.dead_lettered.fetch_add(1, Relaxed);
                }
            }
        }
        // Deleted while pending: there is nothing left to handle.
        self.ack(&deleted, None).await?;
        self.deliver(handler, cancel, batch).await
    }

    async fn deliver<H: Handler<M>>(
        &mut self,
        handler: &mut H,
        cancel: &CancellationToken,
        mut todo: Vec<Todo<M>>,
    ) -> Result<(), BusError> {
        let mut backoff = Backoff::new(self.config.backoff_min, self.config.backoff_max);
        while !todo.is_empty() {
            let deliveries: Vec<Delivery<M>> = todo.iter().map(|(d, _)| d.clone()).collect();
            self.stats
                .handled
                .fetch_add(deliveries.len() as u64, Relaxed);
            let outcomes = self.handle_leased(handler, &deliveries).await?;
            if outcomes.len() != deliveries.len() {
                tracing::error!(
                    expected = deliveries.len(),
                    got = outcomes.len(),
                    "handler returned the wrong number of outcomes; retrying the rest"
                );
            }
            let outcomes = outcomes
                .into_iter()
                .chain(std::iter::repeat(Outcome::Retry));
            let mut acks = Vec::new();
            let mut again = Vec::new();
            for ((mut delivery, mut counted), outcome) in todo.into_iter().zip(outcomes) {
                match outcome {
                    Outcome::Ack => acks.push(delivery.id),
                    Outcome::HandOff(result) => self.ack(&[delivery.id], Some(&result)).await?,
                    Outcome::Retry => again.push((delivery, counted)),
                    Outcome::Fail(reason) => {
                        let failures = self.count_failure(&delivery.id).await?;
                        (delivery.failures, counted.failures) = (failures, failures);
                        if failures >= self.config.max_failures {
                            let reason = format!("failed {failures} times; last: {reason}");
                            self.dead_letter(&counted, &reason, None).await?;
                        } else {
                            tracing::warn!(entry_id = %delivery.id, failures, %reason, "handler failed; will retry");
                            again.push((delivery, counted));
                        }
                    }
                    Outcome::DeadLetter { reason, hand_off } => {
                        self.dead_letter(&counted, &reason, hand_off.as_ref())
                            .await?;
                    }
                }
            }
            self.ack(&acks, None).await?;
            todo = again;
            if todo.is_empty() {
                break;
            }
            self.stats.retried.fetch_add(todo.len() as u64, Relaxed);
            // Keep the entries ours while we wait: resetting their idle time stops other
            // consumers from reclaiming them (and raising their delivery count) during an outage.
            self.touch(todo.iter().map(|(d, _)| &d.id)).await?;
            if sleep_or_cancel(backoff.delay(), cancel).await {
                break;
            }
        }
        Ok(())
    }

    /// Runs the handler on `batch`, touching its entries every third of the lease meanwhile.
    async fn handle_leased<H: Handler<M>>(
        &mut self,
        handler: &mut H,
        batch: &[Delivery<M>],
    ) -> Result<Vec<Outcome>, BusError> {
        let every = (self.config.min_idle / 3).max(Duration::from_millis(100));
        let mut renew = tokio::time::interval_at(Instant::now() + every, every);
        let handling = handler.handle(batch);
        tokio::pin!(handling);
        loop {
            tokio::select! {
                outcomes = &mut handling => return Ok(outcomes),
                _ = renew.tick() => {
                    // A lost renewal only risks a duplicate handling, which is idempotent.
                    if let Err(e) = self.touch(batch.iter().map(|d| &d.id)).await {
                        tracing::warn!(error = %e, "could not renew the lease of a batch");
                    }
                }
            }
        }
    }

    async fn dead_letter(
        &mut self,
        counted: &Counted,
        reason: &str,
        hand_off: Option<&ImageResult>,
    ) -> Result<(), BusError> {
        let (queue, consumer) = (&self.keys, self.config.consumer.as_str());
        dead_letter(&mut self.conn, queue, consumer, counted, reason, hand_off).await?;
        self.stats.dead_lettered.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Acknowledges `ids` (with `hand_off` added to `image:result` in the same `MULTI`).
    async fn ack(
        &mut self,
        ids: &[EntryId],
        hand_off: Option<&ImageResult>,
    ) -> Result<(), BusError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        if let Some(result) = hand_off {
            pipe.add_command(result_xadd(result, self.keys.partition))
                .ignore();
        }
        ack_commands(&mut pipe, &self.keys, ids);
        pipe.query_async::<()>(&mut self.conn).await?;
        self.stats.acked.fetch_add(ids.len() as u64, Relaxed);
        Ok(())
    }

    /// One more handler failure of `id`; returns how many there were.
    async fn count_failure(&mut self, id: &EntryId) -> Result<u64, BusError> {
        Ok(redis::cmd("HINCRBY")
            .arg(&self.keys.failures)
            .arg(id.0.as_str())
            .arg(1)
            .query_async(&mut self.conn)
            .await?)
    }

    /// `XCLAIM … 0 … JUSTID`: resets idle time without counting a delivery.
    async fn touch<'a>(&mut self, ids: impl Iterator<Item = &'a EntryId>) -> Result<(), BusError> {
        redis::cmd("XCLAIM")
            .arg(&self.keys.stream)
            .arg(self.keys.group())
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
    conn: &mut Connection,
    queue: &QueuePartition,
) -> Result<(), BusError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&queue.stream)
        .arg(queue.group())
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
