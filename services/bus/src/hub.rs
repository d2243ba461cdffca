//! The progress hub: one subscriber connection per process, shared by every watcher in it.
//!
//! The hub subscribes every partition's progress channel (`image:progress:{pN}`: `SUBSCRIBE` on
//! one Valkey, `SSUBSCRIBE` on a cluster, so each publish reaches only its channel's shard) and
//! hands each message to the mailboxes of its image's watchers, dropping those of images nobody
//! here watches. Watches open and close without a round trip to Valkey.
//!
//! Invariants: the hub never waits for a watcher. A watcher that keeps up gets every message.
//! Past [`QUEUE`] untaken messages, a message for an image that already has one waiting replaces
//! it (coalescing: progress is monotonic, so the newer stage supersedes the older). So a slow
//! watcher costs at most `QUEUE` + one message per image, however far behind it is, and an idle
//! one costs no buffer at all. A watcher that
//! has left messages untaken for longer than the hub's `max_lag` while more keep coming is
//! *lagged*: the hub drops its registration and tells it so, and it should end its stream with
//! a status saying to reconnect (with its cursor). After the connection to Valkey drops, or the
//! cluster's topology changes (a shard failed over, slots moved), the hub connects afresh,
//! subscribes everything again and tells every watcher to *resync* (re-read the state), since
//! messages published meanwhile may be gone.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Backoff, BusError, Notice, Subscriber, Valkey};
use redis::{PushInfo, PushKind};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Untaken messages a watcher may have before new ones coalesce (see the module doc).
pub const QUEUE: usize = 32;

/// The longest a subscription waits for the hub to confirm it.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(5);

/// How often the hub on a cluster compares who serves which slots with what it subscribed to.
const TOPOLOGY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Hub {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    shared: Arc<Shared>,
}

/// What the hub's worker works on, kept outside it so that a new worker takes over where a
/// failed one left (see [`Hub::worker`]).
#[derive(Debug)]
struct Shared {
    valkey: Valkey,
    max_lag: Duration,
    stats: Arc<HubStats>,
    commands: tokio::sync::Mutex<mpsc::UnboundedReceiver<Command>>,
    watchers: Mutex<HashMap<Uuid, Vec<Arc<Mailbox>>>>,
    /// A worker has run before: the next one starts by telling every watcher to resync.
    started: AtomicBool,
    /// Where the id of every image whose upload begins (`waiting_upload`) goes, if anyone
    /// asked ([`Hub::uploads`]).
    uploads: Mutex<Option<mpsc::UnboundedSender<Uuid>>>,
}

/// What the hub has done, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Images someone in this process watches.
    pub channels: AtomicU64,
    /// Watchers dropped as [`HubEvent::Lagged`].
    pub lagged: AtomicU64,
    /// The worker holds a working pub/sub connection (for health: without one, watches are
    /// refused while Valkey itself may answer).
    pub connected: AtomicBool,
    /// Times the subscription was lost and made again (a lost connection, a failover, moved
    /// slots): each time, messages may have been missed, and Valkey may have lost writes.
    pub resyncs: AtomicU64,
    /// When the subscription was last made again after a loss (Unix milliseconds; 0: never).
    pub resynced_at_ms: AtomicU64,
}

impl HubStats {
    /// When the subscription was last made again after a loss (the Unix epoch if never): what
    /// was lost before then is what a sweep after then finds.
    pub fn resynced_at(&self) -> time::OffsetDateTime {
        let ms = self.resynced_at_ms.load(Ordering::Relaxed);
        time::OffsetDateTime::UNIX_EPOCH + Duration::from_millis(ms)
    }

    fn resynced(&self) {
        let now = time::OffsetDateTime::now_utc() - time::OffsetDateTime::UNIX_EPOCH;
        let ms = u64::try_from(now.whole_milliseconds()).unwrap_or_default();
        self.resynced_at_ms.store(ms, Ordering::Relaxed);
        self.resyncs.fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Debug)]
enum Command {
    Subscribe {
        mailbox: Arc<Mailbox>,
        done: oneshot::Sender<Result<(), BusError>>,
    },
    Unsubscribe {
        watcher: u64,
        ids: Vec<Uuid>,
    },
}

/// Where the hub leaves a watcher's messages. Locked only for a few instructions at a time.
#[derive(Debug)]
struct Mailbox {
    watcher: u64,
    ids: Vec<Uuid>,
    inbox: Mutex<Inbox>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct Inbox {
    /// Untaken messages in arrival order; bounded by [`Inbox::put`].
    pending: Vec<Notice>,
    /// When the oldest untaken message arrived.
    since: Option<Instant>,
    resync: bool,
    lagged: bool,
    stopped: bool,
}

impl Inbox {
    /// Queues `notice`; past [`QUEUE`] it replaces its image's latest untaken notice when that
    /// one is a stage it supersedes (a later stage, or the committed outcome). A committed
    /// announcement is never coalesced away.
    fn put(&mut self, notice: Notice) {
        self.since.get_or_insert_with(Instant::now);
        if self.pending.len() >= QUEUE
            && let Some(held) = self
                .pending
                .iter_mut()
                .rev()
                .find(|n| n.image_id() == notice.image_id())
        {
            match (&*held, &notice) {
                (Notice::Progress(old), Notice::Progress(new)) => {
                    if new.seq() >= old.seq() {
                        *held = notice;
                    }
                }
                (Notice::Progress(_), Notice::Committed(_)) => *held = notice,
                (Notice::Committed(_), Notice::Progress(_)) => {}
                (Notice::Committed(_), Notice::Committed(_)) => self.pending.push(notice),
            }
            return;
        }
        self.pending.push(notice);
    }
}

impl Mailbox {
    fn with<R>(&self, f: impl FnOnce(&mut Inbox) -> R) -> R {
        // A panic while holding this lock cannot leave the inbox half-updated in a way that
        // matters (every field is valid on its own), so a poisoned lock is still used.
        let result = f(&mut self.inbox.lock().unwrap_or_else(PoisonError::into_inner));
        self.wake.notify_one();
        result
    }
}

/// What a watcher is told.
#[derive(Debug, PartialEq)]
pub enum HubEvent {
    /// The untaken messages, in arrival order (coalesced if there were many).
    Notices(Vec<Notice>),
    /// Messages may have been missed: re-read the state.
    Resync,
    /// The watcher left messages untaken for longer than the hub's `max_lag`; it is no longer
    /// registered and receives nothing more.
    Lagged,
}

/// A watcher's registration; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    mailbox: Arc<Mailbox>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next event; `None` once the hub has stopped.
    pub async fn recv(&mut self) -> Option<HubEvent> {
        loop {
            let event = {
                let mut inbox = self
                    .mailbox
                    .inbox
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if inbox.lagged {
                    Some(Some(HubEvent::Lagged))
                } else if inbox.stopped {
                    Some(None)
                } else if std::mem::take(&mut inbox.resync) {
                    // What is pending is older than the state about to be read.
                    inbox.pending = Vec::new();
                    inbox.since = None;
                    Some(Some(HubEvent::Resync))
                } else if inbox.pending.is_empty() {
                    None
                } else {
                    inbox.since = None;
                    Some(Some(HubEvent::Notices(std::mem::take(&mut inbox.pending))))
                }
            };
            match event {
                Some(event) => return event,
                None => self.mailbox.wake.notified().await,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The hub may be gone already (shutdown); then there is nothing to undo.
        let _ = self.commands.send(Command::Unsubscribe {
            watcher: self.mailbox.watcher,
            ids: self.mailbox.ids.clone(),
        });
    }
}

impl Hub {
    /// How long a watcher may leave messages untaken, unless configured otherwise.
    pub const DEFAULT_MAX_LAG: Duration = Duration::from_secs(30);

    /// A hub on `valkey`. A watcher that leaves messages untaken for longer than `max_lag` is
    /// dropped as [`HubEvent::Lagged`]. Nothing is delivered until [`Hub::worker`] runs.
    pub fn new(valkey: Valkey, max_lag: Duration) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        Self {
            commands,
            next_id: AtomicU64::new(1),
            shared: Arc::new(Shared {
                valkey,
                max_lag,
                stats: Arc::default(),
                commands: tokio::sync::Mutex::new(receiver),
                watchers: Mutex::default(),
                started: AtomicBool::new(false),
                uploads: Mutex::default(),
            }),
        }
    }

    /// The hub's worker: it holds the pub/sub connection and delivers, until `cancel` (then
    /// every watcher is told the hub stopped). One runs at a time. If one fails (a panic), a new
    /// one takes over where it left: it subscribes everything again and tells every watcher to
    /// resync, since messages may have been missed meanwhile.
    pub fn worker(
        &self,
        cancel: CancellationToken,
    ) -> impl Future<Output = ()> + Send + 'static + use<> {
        let shared = Arc::clone(&self.shared);
        async move {
            let mut commands = shared.commands.lock().await;
            let worker = Worker {
                shared: Arc::clone(&shared),
            };
            worker.serve(&mut commands, &cancel).await;
            if cancel.is_cancelled() {
                // Watchers waiting now would wait forever, and so would new subscriptions.
                commands.close();
                while let Ok(command) = commands.try_recv() {
                    if let Command::Subscribe { done, .. } = command {
                        let _ = done.send(Err(BusError::Unavailable("the hub has stopped".into())));
                    }
                }
                for mailbox in worker.watchers().values().flatten() {
                    mailbox.with(|inbox| inbox.stopped = true);
                }
            }
        }
    }

    /// The id of every image whose upload begins from now on (its `waiting_upload` stage), as
    /// far as messages arrive (see [`HubStats::resyncs`] for when some may not have).
    pub fn uploads(&self) -> mpsc::UnboundedReceiver<Uuid> {
        let (sender, receiver) = mpsc::unbounded_channel();
        *self
            .shared
            .uploads
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(sender);
        receiver
    }

    pub fn stats(&self) -> Arc<HubStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Registers for the progress of `ids`; returns once the hub holds its subscriptions, so
    /// anything published after this returns is delivered.
    pub async fn subscribe(&self, ids: &[Uuid]) -> Result<Subscription, BusError> {
        let mailbox = Arc::new(Mailbox {
            watcher: self.next_id.fetch_add(1, Ordering::Relaxed),
            ids: ids
                .iter()
                .copied()
                .collect::<HashSet<_>>()
                .into_iter()
                .collect(),
            inbox: Mutex::default(),
            wake: Notify::new(),
        });
        let subscription = Subscription {
            mailbox: Arc::clone(&mailbox),
            commands: self.commands.clone(),
        };
        let (done, confirmed) = oneshot::channel();
        let stopped = || BusError::Unavailable("the progress hub has stopped".into());
        self.commands
            .send(Command::Subscribe { mailbox, done })
            .map_err(|_| stopped())?;
        // Answered at once unless the hub is reconnecting to Valkey (or its worker restarting).
        tokio::time::timeout(SUBSCRIBE_WITHIN, confirmed)
            .await
            .map_err(|_| BusError::Unavailable("the progress hub did not answer in time".into()))?
            .map_err(|_| stopped())??;
        Ok(subscription)
    }
}

struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    /// The watchers by image. Locked only between awaits.
    fn watchers(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Vec<Arc<Mailbox>>>> {
        self.shared
            .watchers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn resync_all(&self) {
        for mailbox in self.watchers().values().flatten() {
            mailbox.with(|inbox| inbox.resync = true);
        }
    }

    async fn serve(
        &self,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        cancel: &CancellationToken,
    ) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut first = !self.shared.started.swap(true, Ordering::Relaxed);
        loop {
            let (pushes, mut received) = mpsc::unbounded_channel();
            let connected = async {
                let (mut subscriber, open) = self.shared.valkey.subscriber(pushes)?;
                // One channel at a time: on a cluster each may live on another shard.
                for channel in self.shared.valkey.partitions().all().map(|p| p.progress()) {
                    subscriber.subscribe(&[channel]).await?;
                }
                let topology = self.topology().await?;
                Ok::<_, BusError>((subscriber, open, topology))
            };
            let (_subscriber, _open, topology): (Subscriber, _, _) = tokio::select! {
                () = cancel.cancelled() => return,
                connected = connected => match connected {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "progress hub: cannot subscribe; retrying");
                        self.shared.stats.connected.store(false, Ordering::Relaxed);
                        if self.wait(backoff.delay(), commands, cancel).await {
                            return;
                        }
                        continue;
                    }
                },
            };
            backoff.reset();
            self.shared.stats.connected.store(true, Ordering::Relaxed);
            if !first {
                tracing::info!("progress hub: (re)subscribed; watchers resync");
                self.shared.stats.resynced();
                self.resync_all();
            }
            first = false;
            let mut check = tokio::time::interval(TOPOLOGY_EVERY);
            check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    push = received.recv() => match push {
                        Some(push) if self.receive(&push) => {}
                        _ => {
                            tracing::warn!("progress hub: subscription lost");
                            self.shared.stats.connected.store(false, Ordering::Relaxed);
                            break;
                        }
                    },
                    command = commands.recv() => match command {
                        Some(command) => self.apply(command),
                        None => return,
                    },
                    _ = check.tick(), if topology.is_some() => {
                        match self.topology().await {
                            Ok(now) if now != topology => {
                                tracing::info!("progress hub: the cluster's topology changed; subscribing afresh");
                                break;
                            }
                            Ok(_) => {}
                            Err(e) => tracing::debug!(error = %e, "progress hub: topology unknown"),
                        }
                    }
                }
            }
        }
    }

    /// Who serves which slots (`CLUSTER SLOTS`, as a sorted list of ranges and primaries) on a
    /// cluster: when it changes, a subscription may sit on a node that no longer serves its
    /// channel. `None` on a single Valkey.
    async fn topology(&self) -> Result<Option<Vec<(i64, i64, String)>>, BusError> {
        if !self.shared.valkey.is_cluster() {
            return Ok(None);
        }
        let mut conn = self.shared.valkey.connection()?;
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        let mut topology: Vec<(i64, i64, String)> = ranges
            .into_iter()
            .filter_map(|range| {
                let redis::Value::Array(parts) = range else {
                    return None;
                };
                let (Some(redis::Value::Int(start)), Some(redis::Value::Int(end))) =
                    (parts.first(), parts.get(1))
                else {
                    return None;
                };
                Some((*start, *end, format!("{:?}", parts.get(2))))
            })
            .collect();
        topology.sort_unstable();
        Ok(Some(topology))
    }

    /// Handles one push; `false` when the subscription is lost (the connection dropped, or the
    /// server took a channel away because its slot moved).
    fn receive(&self, push: &PushInfo) -> bool {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                if let [_, redis::Value::BulkString(payload)] = push.data.as_slice() {
                    self.dispatch(payload);
                }
                true
            }
            PushKind::Disconnection | PushKind::SUnsubscribe | PushKind::Unsubscribe => false,
            _ => true,
        }
    }

    /// Waits `delay` while refusing subscriptions (Valkey is down); `true` when cancelled.
    async fn wait(
        &self,
        delay: Duration,
        commands: &mut mpsc::UnboundedReceiver<Command>,
        cancel: &CancellationToken,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            tokio::select! {
                () = cancel.cancelled() => return true,
                () = tokio::time::sleep_until(deadline) => return false,
                command = commands.recv() => match command {
                    Some(Command::Subscribe { done, .. }) => {
                        let _ = done.send(Err(BusError::Unavailable("Valkey is unavailable".into())));
                    }
                    Some(Command::Unsubscribe { watcher, ids }) => {
                        self.remove(watcher, &ids);
                    }
                    None => return true,
                },
            }
        }
    }

    fn apply(&self, command: Command) {
        match command {
            Command::Subscribe { mailbox, done } => {
                {
                    let mut watchers = self.watchers();
                    for id in &mailbox.ids {
                        watchers.entry(*id).or_default().push(Arc::clone(&mailbox));
                    }
                }
                self.count_channels();
                let _ = done.send(Ok(()));
            }
            Command::Unsubscribe { watcher, ids } => self.remove(watcher, &ids),
        }
    }

    /// Drops `watcher` from `ids`.
    fn remove(&self, watcher: u64, ids: &[Uuid]) {
        {
            let mut watchers = self.watchers();
            for id in ids {
                if let Some(watching) = watchers.get_mut(id) {
                    watching.retain(|m| m.watcher != watcher);
                    if watching.is_empty() {
                        watchers.remove(id);
                    }
                }
            }
        }
        self.count_channels();
    }

    fn count_channels(&self) {
        let channels = u64::try_from(self.watchers().len()).unwrap_or(u64::MAX);
        self.shared
            .stats
            .channels
            .store(channels, Ordering::Relaxed);
    }

    fn dispatch(&self, payload: &[u8]) {
        let notice = match Notice::decode(payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "undecodable progress message ignored");
                return;
            }
        };
        let image_id = notice.image_id();
        if let Notice::Progress(p) = &notice
            && p.stage() == crate::Stage::WaitingUpload
            && let Some(uploads) = &*self
                .shared
                .uploads
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        {
            let _ = uploads.send(image_id);
        }
        let mut watchers = self.watchers();
        if !watchers.contains_key(&image_id) {
            return;
        }
        let max_lag = self.shared.max_lag;
        let mut lagged = Vec::new();
        for mailbox in watchers.get(&image_id).into_iter().flatten() {
            let behind = mailbox.with(|inbox| {
                if inbox.since.is_some_and(|t| t.elapsed() > max_lag) {
                    inbox.lagged = true;
                    inbox.pending = Vec::new();
                    return true;
                }
                inbox.put(notice.clone());
                false
            });
            if behind {
                lagged.push(Arc::clone(mailbox));
            }
        }
        // Nothing more is delivered to it; its `Subscription`, dropped, unregisters the rest.
        for mailbox in lagged {
            self.shared.stats.lagged.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                watcher = mailbox.watcher,
                "progress hub: watcher lagged; dropped"
            );
            for id in &mailbox.ids {
                if let Some(watching) = watchers.get_mut(id) {
                    watching.retain(|m| m.watcher != mailbox.watcher);
                }
            }
        }
    }
}
