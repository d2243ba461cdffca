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
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{BusError, Progress, Valkey, keys};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Untaken messages a watcher may have before new ones coalesce (see the module doc).
pub const QUEUE: usize = 32;

#[derive(Debug)]
pub struct Hub {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
    stats: Arc<HubStats>,
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
    pending: Vec<Progress>,
    /// When the oldest untaken message arrived.
    since: Option<Instant>,
    resync: bool,
    lagged: bool,
    stopped: bool,
}

impl Inbox {
    /// Queues `message`; past [`QUEUE`] it only replaces its image's latest untaken message if
    /// it is newer. A `committed` announcement is never coalesced away.
    fn put(&mut self, message: Progress) {
        self.since.get_or_insert_with(Instant::now);
        if self.pending.len() >= QUEUE
            && let Some(held) = self
                .pending
                .iter_mut()
                .rev()
                .find(|p| p.image_id == message.image_id)
        {
            let committed = held.committed || message.committed;
            if message.seq >= held.seq {
                *held = message;
            }
            held.committed = committed;
            return;
        }
        self.pending.push(message);
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
    Progress(Vec<Progress>),
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
                    Some(Some(HubEvent::Progress(std::mem::take(&mut inbox.pending))))
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

    /// The hub and its worker, which runs until `cancel`. A watcher that leaves messages untaken
    /// for longer than `max_lag` is dropped as [`HubEvent::Lagged`].
    pub fn new(
        valkey: Valkey,
        max_lag: Duration,
        cancel: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        Self::with_channels(valkey, Channels::default(), max_lag, cancel)
    }

    /// [`Hub::new`] subscribing as `channels` says.
    pub fn with_channels(
        valkey: Valkey,
        channels: Channels,
        max_lag: Duration,
        cancel: CancellationToken,
    ) -> (Self, impl Future<Output = ()>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let stats = Arc::new(HubStats::default());
        let hub = Self {
            commands,
            next_id: AtomicU64::new(1),
            stats: Arc::clone(&stats),
        };
        let worker = Worker {
            watchers: HashMap::new(),
            channels,
            max_lag,
            stats,
        };
        (hub, worker.run(valkey, receiver, cancel))
    }

    pub fn stats(&self) -> Arc<HubStats> {
        Arc::clone(&self.stats)
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
        confirmed.await.map_err(|_| stopped())??;
        Ok(subscription)
    }
}

struct Worker {
    watchers: HashMap<Uuid, Vec<Arc<Mailbox>>>,
    channels: Channels,
    max_lag: Duration,
    stats: Arc<HubStats>,
}

impl Worker {
    async fn run(
        mut self,
        valkey: Valkey,
        commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        self.serve(valkey, commands, cancel).await;
        // Watchers waiting now would wait forever.
        for mailbox in self.watchers.values().flatten() {
            mailbox.with(|inbox| inbox.stopped = true);
        }
    }

    async fn serve(
        &mut self,
        valkey: Valkey,
        mut commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            let connected = async {
                let (mut sink, stream) = valkey.pubsub().await?.split();
                match self.channels {
                    Channels::PerImage => {
                        let channels: Vec<String> =
                            self.watchers.keys().map(keys::progress).collect();
                        if !channels.is_empty() {
                            sink.subscribe(&channels).await?;
                        }
                    }
                    Channels::Pattern => sink.psubscribe(keys::PROGRESS_PATTERN).await?,
                }
                Ok::<_, BusError>((sink, stream))
            };
            let (mut sink, mut stream) = tokio::select! {
                () = cancel.cancelled() => return,
                connected = connected => match connected {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "progress hub: cannot subscribe; retrying");
                        if self.wait(backoff, &mut commands, &cancel).await {
                            return;
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(50);
            if !first {
                tracing::info!("progress hub: reconnected; watchers resync");
                for mailbox in self.watchers.values().flatten() {
                    mailbox.with(|inbox| inbox.resync = true);
                }
            }
            first = false;
            loop {
                tokio::select! {
                    () = cancel.cancelled() => return,
                    message = stream.next() => match message {
                        Some(message) => self.dispatch(message.get_channel_name(), message.get_payload_bytes()),
                        None => {
                            tracing::warn!("progress hub: connection lost");
                            break;
                        }
                    },
                    command = commands.recv() => match command {
                        Some(command) => {
                            if let Err(e) = self.apply(command, &mut sink).await {
                                tracing::warn!(error = %e, "progress hub: subscription change failed");
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
        &mut self,
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
        &mut self,
        command: Command,
        sink: &mut redis::aio::PubSubSink,
    ) -> Result<(), BusError> {
        match command {
            Command::Subscribe { mailbox, done } => {
                let mut new = Vec::new();
                for id in &mailbox.ids {
                    let watchers = self.watchers.entry(*id).or_default();
                    if watchers.is_empty() {
                        new.push(keys::progress(id));
                    }
                    watchers.push(Arc::clone(&mailbox));
                }
                self.count_channels();
                let result = if new.is_empty() || self.channels == Channels::Pattern {
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
                if gone.is_empty() || self.channels == Channels::Pattern {
                    return Ok(());
                }
                let channels: Vec<String> = gone.iter().map(keys::progress).collect();
                Ok(sink.unsubscribe(&channels).await?)
            }
        }
    }

    /// Drops `watcher` from `ids`; returns the ids nobody watches any more.
    fn remove(&mut self, watcher: u64, ids: &[Uuid]) -> Vec<Uuid> {
        let mut gone = Vec::new();
        for id in ids {
            if let Some(watchers) = self.watchers.get_mut(id) {
                watchers.retain(|m| m.watcher != watcher);
                if watchers.is_empty() {
                    self.watchers.remove(id);
                    gone.push(*id);
                }
            }
        }
        self.count_channels();
        gone
    }

    fn count_channels(&self) {
        let channels = u64::try_from(self.watchers.len()).unwrap_or(u64::MAX);
        self.stats.channels.store(channels, Ordering::Relaxed);
    }

    fn dispatch(&mut self, channel: &str, payload: &[u8]) {
        // With a pattern subscription most messages may be for images nobody here watches:
        // those are dropped by their channel name, before decoding.
        let Some(image_id) =
            keys::progress_image(channel).filter(|id| self.watchers.contains_key(id))
        else {
            return;
        };
        let progress = match Progress::decode(payload) {
            Ok(p) if p.image_id == image_id => p,
            Ok(_) => {
                tracing::warn!(channel, "progress message for another image ignored");
                return;
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "undecodable progress message ignored");
                return;
            }
        };
        let mut lagged = Vec::new();
        for mailbox in self.watchers.get(&progress.image_id).into_iter().flatten() {
            let behind = mailbox.with(|inbox| {
                if inbox.since.is_some_and(|t| t.elapsed() > self.max_lag) {
                    inbox.lagged = true;
                    inbox.pending = Vec::new();
                    return true;
                }
                inbox.put(progress.clone());
                false
            });
            if behind {
                lagged.push(Arc::clone(mailbox));
            }
        }
        // Nothing more is delivered to it. A channel it alone watched stays subscribed (with no
        // one to deliver to) until its `Subscription` is dropped, which unsubscribes it.
        for mailbox in lagged {
            self.stats.lagged.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                watcher = mailbox.watcher,
                "progress hub: watcher lagged; dropped"
            );
            for id in &mailbox.ids {
                if let Some(watchers) = self.watchers.get_mut(id) {
                    watchers.retain(|m| m.watcher != mailbox.watcher);
                }
            }
        }
    }
}
