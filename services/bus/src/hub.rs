//! The progress hub: one pub/sub connection per process, shared by every watcher in it.
//!
//! A watcher registers the images it follows; the hub `SUBSCRIBE`s `image:progress:{id}` on the
//! first registration of an id and `UNSUBSCRIBE`s after the last (reference counting), and
//! hands each message to the mailboxes of that id's watchers.
//!
//! Invariants: the hub never waits for a watcher. A mailbox is bounded; when it is full the
//! message is dropped and the watcher is told to *resync* (re-read the state; progress is
//! monotonic, so state-based catch-up loses nothing). After the connection drops, the hub
//! reconnects, resubscribes everything and tells every watcher to resync, since messages
//! published meanwhile are gone.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use crate::{BusError, Progress, Valkey, keys};
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Messages a watcher may have waiting before it is switched to resync.
const MAILBOX: usize = 32;

#[derive(Debug)]
pub struct Hub {
    commands: mpsc::UnboundedSender<Command>,
    next_id: AtomicU64,
}

#[derive(Debug)]
enum Command {
    Subscribe {
        ids: Vec<Uuid>,
        mailbox: Arc<Mailbox>,
        done: oneshot::Sender<Result<(), BusError>>,
    },
    Unsubscribe {
        watcher: u64,
        ids: Vec<Uuid>,
    },
}

#[derive(Debug)]
struct Mailbox {
    watcher: u64,
    messages: mpsc::Sender<Progress>,
    resync: AtomicBool,
    wake: Notify,
}

impl Mailbox {
    fn resync(&self) {
        self.resync.store(true, Ordering::Release);
        self.wake.notify_one();
    }
}

/// What a watcher is told.
#[derive(Debug)]
pub enum HubEvent {
    Progress(Progress),
    /// Messages may have been missed: re-read the state.
    Resync,
}

/// A watcher's registration; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    ids: Vec<Uuid>,
    mailbox: Arc<Mailbox>,
    messages: mpsc::Receiver<Progress>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next event; `None` once the hub has stopped.
    pub async fn recv(&mut self) -> Option<HubEvent> {
        loop {
            if self.mailbox.resync.swap(false, Ordering::AcqRel) {
                // Whatever is queued is older than the state about to be read.
                while self.messages.try_recv().is_ok() {}
                return Some(HubEvent::Resync);
            }
            tokio::select! {
                message = self.messages.recv() => return message.map(HubEvent::Progress),
                () = self.mailbox.wake.notified() => {}
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The hub may be gone already (shutdown); then there is nothing to undo.
        let _ = self.commands.send(Command::Unsubscribe {
            watcher: self.mailbox.watcher,
            ids: std::mem::take(&mut self.ids),
        });
    }
}

impl Hub {
    /// The hub and its worker, which runs until `cancel`.
    pub fn new(valkey: Valkey, cancel: CancellationToken) -> (Self, impl Future<Output = ()>) {
        let (commands, receiver) = mpsc::unbounded_channel();
        let hub = Self {
            commands,
            next_id: AtomicU64::new(1),
        };
        (hub, Worker::default().run(valkey, receiver, cancel))
    }

    /// Registers for the progress of `ids`; returns once Valkey confirmed the subscriptions, so
    /// anything published after this returns is delivered.
    pub async fn subscribe(&self, ids: &[Uuid]) -> Result<Subscription, BusError> {
        let (tx, messages) = mpsc::channel(MAILBOX);
        let mailbox = Arc::new(Mailbox {
            watcher: self.next_id.fetch_add(1, Ordering::Relaxed),
            messages: tx,
            resync: AtomicBool::new(false),
            wake: Notify::new(),
        });
        let subscription = Subscription {
            ids: ids.to_vec(),
            mailbox: Arc::clone(&mailbox),
            messages,
            commands: self.commands.clone(),
        };
        let (done, confirmed) = oneshot::channel();
        let stopped = || BusError::Unavailable("the progress hub has stopped".into());
        self.commands
            .send(Command::Subscribe {
                ids: ids.to_vec(),
                mailbox,
                done,
            })
            .map_err(|_| stopped())?;
        confirmed.await.map_err(|_| stopped())??;
        Ok(subscription)
    }
}

#[derive(Default)]
struct Worker {
    watchers: HashMap<Uuid, Vec<Arc<Mailbox>>>,
}

impl Worker {
    async fn run(
        mut self,
        valkey: Valkey,
        mut commands: mpsc::UnboundedReceiver<Command>,
        cancel: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(50);
        let mut first = true;
        loop {
            let connected = async {
                let (mut sink, stream) = valkey.pubsub().await?.split();
                let channels: Vec<String> = self.watchers.keys().map(keys::progress).collect();
                if !channels.is_empty() {
                    sink.subscribe(&channels).await?;
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
                self.watchers.values().flatten().for_each(|m| m.resync());
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
            Command::Subscribe { ids, mailbox, done } => {
                let mut new = Vec::new();
                for id in ids.iter().collect::<HashSet<_>>() {
                    let watchers = self.watchers.entry(*id).or_default();
                    if watchers.is_empty() {
                        new.push(keys::progress(id));
                    }
                    watchers.push(Arc::clone(&mailbox));
                }
                let result = if new.is_empty() {
                    Ok(())
                } else {
                    sink.subscribe(&new).await.map_err(BusError::from)
                };
                let failed = result.as_ref().err().map(ToString::to_string);
                if failed.is_some() {
                    self.remove(mailbox.watcher, &ids);
                }
                let _ = done.send(result);
                match failed {
                    Some(e) => Err(BusError::Unavailable(e)),
                    None => Ok(()),
                }
            }
            Command::Unsubscribe { watcher, ids } => {
                let gone = self.remove(watcher, &ids);
                if gone.is_empty() {
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
        gone
    }

    fn dispatch(&self, channel: &str, payload: &[u8]) {
        let progress = match Progress::decode(payload) {
            Ok(p) if keys::progress(p.image_id) == channel => p,
            Ok(_) => {
                tracing::warn!(channel, "progress message for another image ignored");
                return;
            }
            Err(e) => {
                tracing::warn!(channel, error = %e, "undecodable progress message ignored");
                return;
            }
        };
        for mailbox in self.watchers.get(&progress.image_id).into_iter().flatten() {
            if mailbox.messages.try_send(progress.clone()).is_err() {
                mailbox.resync();
            }
        }
    }
}
