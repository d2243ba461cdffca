//! The progress hub: one pub/sub connection per process, shared by every watcher in it.
//!
//! A watcher registers the images it follows; the hub `SUBSCRIBE`s `image:progress:{id}` on the
//! first registration of an id and `UNSUBSCRIBE`s after the last (reference counting), and
//! hands each message to the mailboxes of that id's watchers — or, by default
//! ([`Channels::Pattern`]), takes every image's messages through one `PSUBSCRIBE` and drops
//! those nobody here watches. `cargo bench -p follow-bus --bench hub` compares the two.
//!
//! Invariants: the hub never waits for a watcher. A watcher that keeps up gets every message.
//! Past [`QUEUE`] untaken messages, a message for an image that already has one waiting replaces
//! it (coalescing: progress is monotonic, so the newer stage supersedes the older). So a slow
//! watcher costs at most `QUEUE` + one message per image, however far behind it is, and an idle
//! one costs no buffer at all. A watcher that
//! has left messages untaken for longer than the hub's `max_lag` while more keep coming is
//! *lagged*: the hub drops its registration and tells it so, and it should end its stream with
//! a status saying to reconnect (with its cursor). After the connection to Valkey drops, the hub
//! reconnects, resubscribes everything and tells every watcher to *resync* (re-read the state),
//! since messages published meanwhile are gone.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{Backoff, BusError, Notice, Valkey, keys};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Untaken messages a watcher may have before new ones coalesce (see the module doc).
pub const QUEUE: usize = 32;

/// The longest a subscription waits for the hub to confirm it.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(5);

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
    channels: Channels,
    max_lag: Duration,
    stats: Arc<HubStats>,
    commands: tokio::sync::Mutex<mpsc::UnboundedReceiver<Command>>,
    watchers: Mutex<HashMap<Uuid, Vec<Arc<Mailbox>>>>,
    /// A worker has run before: the next one starts by telling every watcher to resync.
    started: AtomicBool,
}

/// How the hub subscribes in Valkey.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Channels {
    /// One `SUBSCRIBE` per watched image, reference-counted: this process receives only the
    /// messages of images watched here, and opening or closing a watch on a new image costs a
    /// round trip through the hub's one connection.
    PerImage,
    /// One `PSUBSCRIBE image:progress:*`: watches open and close without a round trip, and this
    /// process receives (and drops) the messages of every image. The default: measured, it
    /// opens watches ~100× faster and closes them at once, with the same latency, for ~12 ms
    /// more CPU per 1,000 published events when only a tenth of them are watched here.
    #[default]
    Pattern,
}

impl std::str::FromStr for Channels {
    type Err = String;

    /// `pattern` or `per-image`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pattern" => Ok(Self::Pattern),
            "per-image" => Ok(Self::PerImage),
            other => Err(format!("`{other}` is not `pattern` or `per-image`")),
        }
    }
}

/// What the hub has done, for metrics.
#[derive(Debug, Default)]
pub struct HubStats {
    /// Channels subscribed now (images someone in this process watches).
    pub channels: AtomicU64,
    /// Watchers dropped as [`HubEvent::Lagged`].
    pub lagged: AtomicU64,
    /// The worker holds a working pub/sub connection (for health: without one, watches are
    /// refused while Valkey itself may answer).
    pub connected: AtomicBool,
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

    /// A hub subscribing as `channels` says. A watcher that leaves messages untaken for longer
    /// than `max_lag` is dropped as [`HubEvent::Lagged`]. Nothing is delivered until
    /// [`Hub::worker`] runs.
    pub fn new(valkey: Valkey, channels: Channels, max_lag: Duration) -> Self {
        let (commands, receiver) = mpsc::unbounded_channel();
        Self {
            commands,
            next_id: AtomicU64::new(1),
            shared: Arc::new(Shared {
                valkey,
                channels,
                max_lag,
                stats: Arc::default(),
                commands: tokio::sync::Mutex::new(receiver),
                watchers: Mutex::default(),
                started: AtomicBool::new(false),
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

    pub fn stats(&self) -> Arc<HubStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Registers for the progress of `ids`; returns once Valkey confirmed the subscriptions, so
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
            let connected = async {
                let (pubsub, open) = self.shared.valkey.pubsub().await?;
                let (mut sink, stream) = pubsub.split();
                match self.shared.channels {
                    Channels::PerImage => {
                        let channels: Vec<String> =
                            self.watchers().keys().map(keys::progress).collect();
                        if !channels.is_empty() {
                            sink.subscribe(&channels).await?;
                        }
                    }
                    Channels::Pattern => sink.psubscribe(keys::PROGRESS_PATTERN).await?,
                }
                Ok::<_, BusError>((sink, stream, open))
            };
            let (mut sink, mut stream, _open) = tokio::select! {
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
                tracing::info!("progress hub: (re)connected; watchers resync");
                self.resync_all();
            }
            first = false;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    message = stream.next() => match message {
                        Some(message) => self.dispatch(message.get_channel_name(), message.get_payload_bytes()),
                        None => {
                            tracing::warn!("progress hub: connection lost");
                            self.shared.stats.connected.store(false, Ordering::Relaxed);
                            break;
                        }
                    },
                    command = commands.recv() => match command {
                        Some(command) => {
                            if let Err(e) = self.apply(command, &mut sink).await {
                                tracing::warn!(error = %e, "progress hub: subscription change failed");
                                self.shared.stats.connected.store(false, Ordering::Relaxed);
                                break;
                            }
                        }
                        None => return,
                    },
                }
            }
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

    async fn apply(
        &self,
        command: Command,
        sink: &mut redis::aio::PubSubSink,
    ) -> Result<(), BusError> {
        match command {
            Command::Subscribe { mailbox, done } => {
                let mut new = Vec::new();
                {
                    let mut watchers = self.watchers();
                    for id in &mailbox.ids {
                        let watching = watchers.entry(*id).or_default();
                        if watching.is_empty() {
                            new.push(keys::progress(id));
                        }
                        watching.push(Arc::clone(&mailbox));
                    }
                }
                self.count_channels();
                let result = if new.is_empty() || self.shared.channels == Channels::Pattern {
                    Ok(())
                } else {
                    sink.subscribe(&new).await.map_err(BusError::from)
                };
                let failed = result.as_ref().err().map(ToString::to_string);
                if failed.is_some() {
                    self.remove(mailbox.watcher, &mailbox.ids);
                }
                let _ = done.send(result);
                match failed {
                    Some(e) => Err(BusError::Unavailable(e)),
                    None => Ok(()),
                }
            }
            Command::Unsubscribe { watcher, ids } => {
                let gone = self.remove(watcher, &ids);
                if gone.is_empty() || self.shared.channels == Channels::Pattern {
                    return Ok(());
                }
                let channels: Vec<String> = gone.iter().map(keys::progress).collect();
                Ok(sink.unsubscribe(&channels).await?)
            }
        }
    }

    /// Drops `watcher` from `ids`; returns the ids nobody watches any more.
    fn remove(&self, watcher: u64, ids: &[Uuid]) -> Vec<Uuid> {
        let mut gone = Vec::new();
        {
            let mut watchers = self.watchers();
            for id in ids {
                if let Some(watching) = watchers.get_mut(id) {
                    watching.retain(|m| m.watcher != watcher);
                    if watching.is_empty() {
                        watchers.remove(id);
                        gone.push(*id);
                    }
                }
            }
        }
        self.count_channels();
        gone
    }

    fn count_channels(&self) {
        let channels = u64::try_from(self.watchers().len()).unwrap_or(u64::MAX);
        self.shared
            .stats
            .channels
            .store(channels, Ordering::Relaxed);
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let mut watchers = self.watchers();
        // With a pattern subscription most messages may be for images nobody here watches:
        // those are dropped by their channel name, before decoding.
        let Some(image_id) = keys::progress_image(channel).filter(|id| watchers.contains_key(id))
        else {
            return;
        };
        let notice = match Notice::decode(payload) {
            Ok(n) if n.image_id() == image_id => n,
            Ok(_) => {
                tracing::warn!(channel, "progress message for another image ignored");
                return;
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "undecodable progress message ignored");
                return;
            }
        };
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
        // Nothing more is delivered to it. A channel it alone watched stays subscribed (with no
        // one to deliver to) until its `Subscription` is dropped, which unsubscribes it.
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
