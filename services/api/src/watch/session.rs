//! One `WatchImageStatus` stream: resolve and authorize the target, subscribe, then send the
//! state and every change until the watched images are final.
//!
//! Each image has a *level*: the seq of the last stage sent (1 `queued` … 9 `failed`) or
//! [`FINAL`] once its committed outcome was sent. Events go out only when they raise a level,
//! so nothing is ever sent twice, and the cursor of every event is the vector of levels after
//! it: a client resuming with it is sent exactly what raises a level from there.
//!
//! The outcome of an image arrives as the API's commit notice. Should that notice be lost (the
//! instance that committed died before announcing, or `PUBLISH` failed), a watch whose images
//! the gateway is done with re-reads just those images from the database after
//! `FOLLOW_WATCH_RECHECK_SECS`, then after twice that, and so on up to 30 s, until they are
//! final.
//!
//! A watch is the response stream itself: it works only when the client takes an event (no task
//! and no queue per stream). An idle watch costs its state and its hub registration; events for
//! a client that reads slowly wait in the hub, one per image (the latest); a client that leaves
//! drops the stream, and with it the watch.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use follow_bus::Stage;
use follow_proto::api::v1 as api;
use sqlx::{Postgres, pool::PoolConnection};
use time::OffsetDateTime;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use uuid::Uuid;

use super::cursor::{decode_cursor, encode_cursor};
use crate::{
    auth::User,
    error::ApiError,
    state::Shared,
    store::{self, ImageStatus, RouteStatus},
    views,
};
use follow_bus::{Committed, HubEvent, Notice, Subscription};
use follow_proto::time::timestamp;
use follow_service::limits::Slot;

/// The level of an image whose committed outcome was sent: above every stage's seq.
pub(super) const FINAL: u8 = Stage::LAST_SEQ as u8 + 1;
/// The levels of an image the gateway is done with (`done` or `failed`), whose committed
/// outcome is due.
const SETTLING: std::ops::RangeInclusive<u8> = Stage::Done.seq() as u8..=Stage::Failed.seq() as u8;
/// The longest wait between two re-reads of images whose outcome is due.
const RECHECK_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Images one stream may watch (a route has at most 100 waypoints too).
pub const MAX_IMAGES: usize = 100;

/// What a `WatchImageStatus` call returns.
pub type WatchStream = follow_service::stream::ResponseStream<api::WatchImageStatusResponse>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Images(Vec<Uuid>),
    Route(Uuid),
}

/// A resolved, authorized, subscribed watch, ready to run.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<Shared>,
    owner: User,
    route: Option<Uuid>,
    images: Vec<Uuid>,
    routes_of: Vec<Uuid>,
    levels: Vec<u8>,
    route_ready_sent: bool,
    subscription: Subscription,
    /// Events made but not yet taken by the client; empty while the watch idles.
    outbox: VecDeque<api::WatchImageStatusResponse>,
}

impl Watch {
    /// Checks the target is the caller's and subscribes (before any state is read, so nothing
    /// falls between the snapshot and the live events).
    pub async fn prepare(
        shared: Arc<Shared>,
        owner: User,
        target: Target,
        cursor: &str,
    ) -> Result<Self, ApiError> {
        let owner_id = &owner.0;
        let (route, images) = shared
            .watch_db(|mut conn| async move {
                let conn = &mut *conn;
                match target {
                    Target::Route(id) => {
                        let route = store::route(conn, owner_id, id)
                            .await?
                            .ok_or(ApiError::NotFound("route"))?;
                        let images = route.waypoints.iter().map(|w| w.image.id).collect();
                        Ok((Some(id), images))
                    }
                    Target::Images(mut ids) => {
                        let mut seen = std::collections::HashSet::new();
                        ids.retain(|id| seen.insert(*id));
                        let found = store::images(conn, owner_id, &ids).await?;
                        if found.len() != ids.len() {
                            return Err(ApiError::NotFound("image"));
                        }
                        Ok((None, ids))
                    }
                }
            })
            .await?;
        let (levels, route_ready_sent) = decode_cursor(cursor, images.len())?;
        let subscription = shared
            .hub
            .subscribe(&images)
            .await
            .map_err(|e| ApiError::BusUnavailable(Some(e)))?;
        Ok(Self {
            shared,
            owner,
            route,
            routes_of: Vec::new(),
            levels,
            route_ready_sent,
            images,
            subscription,
            outbox: VecDeque::new(),
        })
    }

    /// The watch as a response stream: the state first, then every change, a heartbeat after
    /// each quiet `heartbeat`; it ends when the watch is complete, and with an error status
    /// (reconnect with the last cursor) when the service shuts down, the client fell too far
    /// behind or its token expired (at `until`). It holds `slot` (one of the user's watches).
    pub fn into_stream(
        self,
        cancel: CancellationToken,
        until: tokio::time::Instant,
        slot: Slot,
    ) -> WatchStream {
        let heartbeat = self.shared.limits.heartbeat;
        self.shared.metrics.watchers.inc();
        let live = Live {
            beat: tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat),
            recheck_after: self.shared.limits.recheck,
            watch: self,
            cancelled: Box::pin(cancel.cancelled_owned()),
            started: false,
            recheck: None,
        };
        follow_service::stream::respond_until(live, until, slot)
    }

    /// Every image final (for a route: READY sent, or nothing left pending that could make it
    /// READY; the client re-watches after a reissue).
    fn is_complete(&self) -> bool {
        let all_final = self.levels.iter().all(|l| *l == FINAL);
        match self.route {
            Some(_) => self.route_ready_sent || all_final,
            None => all_final,
        }
    }

    /// Queues what the hub said as events; says what must be read from the database.
    async fn apply(&mut self, event: Option<HubEvent>) -> Result<Read, Status> {
        match event {
            Some(HubEvent::Notices(batch)) => {
                let mut read = Read::Nothing;
                for notice in batch {
                    match notice {
                        Notice::Progress(p) => self.progress(p.image_id(), p.stage(), p.seq()),
                        // Boxed: its future (presigning a download) is kilobytes, and a
                        // stream would otherwise carry that much idle for its whole life.
                        Notice::Committed(c) => {
                            if Box::pin(self.committed(*c)).await {
                                read = Read::Route;
                            }
                        }
                    }
                }
                Ok(read)
            }
            Some(HubEvent::Resync) => Ok(Read::All),
            Some(HubEvent::Lagged) => Err(Status::resource_exhausted(
                "this watch fell too far behind; reconnect with your last cursor",
            )),
            None => Err(Status::unavailable(
                "live updates stopped; reconnect with your last cursor",
            )),
        }
    }

    /// Queues what raises a level from the current state in the database (and Valkey).
    async fn catch_up(&mut self) -> Result<(), ApiError> {
        let shared = Arc::clone(&self.shared);
        shared.watch_db(|conn| self.catch_up_on(conn)).await
    }

    async fn catch_up_on(&mut self, mut conn: PoolConnection<Postgres>) -> Result<(), ApiError> {
        let shared = Arc::clone(&self.shared);
        let images = store::images(&mut conn, &self.owner.0, &self.images).await?;
        let route = match self.route {
            Some(id) => store::route(&mut conn, &self.owner.0, id).await?,
            None => None,
        };
        drop(conn);
        self.routes_of = self
            .images
            .iter()
            .map(|id| {
                images
                    .iter()
                    .find(|i| i.id == *id)
                    .map_or(Uuid::nil(), |i| i.route_id)
            })
            .collect();
        let pending: Vec<Uuid> = images
            .iter()
            .filter(|i| i.status == ImageStatus::Pending)
            .map(|i| i.id)
            .collect();
        let live = shared.live_stages(&pending).await;
        for index in 0..self.images.len() {
            let Some(image) = images.iter().find(|i| i.id == self.images[index]) else {
                continue;
            };
            if image.status.is_final() {
                if self.levels[index] < FINAL {
                    self.levels[index] = FINAL;
                    let event = self.final_event(image).await;
                    self.push(event);
                }
            } else if let Some(stage) = live.of(image.id) {
                self.progress(image.id, stage, stage.seq());
            }
        }
        if let Some(route) = route {
            self.route_ready(&route).await;
        }
        Ok(())
    }

    /// Queues `route_ready` once, when the route is READY (or PUBLISHED), after the outcome
    /// of each of its images not sent yet (whose announcement was lost): a route watch tells
    /// every image's outcome before READY, which ends it.
    async fn route_ready(&mut self, route: &store::RouteRecord) {
        if matches!(route.status, RouteStatus::Ready | RouteStatus::Published)
            && !self.route_ready_sent
        {
            for image in route.waypoints.iter().map(|w| &w.image) {
                let Some(index) = self.images.iter().position(|id| *id == image.id) else {
                    continue;
                };
                if self.levels[index] < FINAL && image.status.is_final() {
                    self.levels[index] = FINAL;
                    let event = self.final_event(image).await;
                    self.push(event);
                }
            }
            self.route_ready_sent = true;
            let view = self.shared.route_view(route).await;
            self.push(api::watch_image_status_response::Event::RouteReady(
                api::RouteReadyEvent { route: Some(view) },
            ));
        }
    }

    /// The watched images the gateway is done with whose outcome was not sent yet.
    fn settling(&self) -> Vec<Uuid> {
        self.images
            .iter()
            .zip(&self.levels)
            .filter(|(_, level)| SETTLING.contains(level))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Re-reads the images of [`Watch::settling`] (one indexed read) and queues the outcome of
    /// those that are final, then `route_ready` if one of them made the route READY.
    async fn recheck(&mut self) -> Result<(), ApiError> {
        let ids = self.settling();
        if ids.is_empty() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let owner = self.owner.0.clone();
        let images = shared
            .watch_db(|mut conn| async move { Ok(store::images(&mut conn, &owner, &ids).await?) })
            .await?;
        let mut settled = false;
        for image in images.iter().filter(|i| i.status.is_final()) {
            if let Some(index) = self.images.iter().position(|id| *id == image.id) {
                self.levels[index] = FINAL;
                let event = self.final_event(image).await;
                self.push(event);
                settled = true;
            }
        }
        if settled {
            self.shared.metrics.watch_rechecks_settled.inc();
            self.read_route().await?;
        }
        Ok(())
    }

    /// Reads the watched route and queues `route_ready` if it is.
    async fn read_route(&mut self) -> Result<(), ApiError> {
        let Some(id) = self.route else {
            return Ok(());
        };
        let shared = Arc::clone(&self.shared);
        let owner = self.owner.0.clone();
        let route = shared
            .watch_db(|mut conn| async move { Ok(store::route(&mut conn, &owner, id).await?) })
            .await?;
        if let Some(route) = route {
            self.route_ready(&route).await;
        }
        Ok(())
    }

    /// Queues the final event of a committed image from its announcement (no database read);
    /// `true` when it made the watched route READY and that is still to be sent.
    async fn committed(&mut self, c: Committed) -> bool {
        let Some(index) = self.images.iter().position(|i| *i == c.image_id) else {
            return false;
        };
        if self.levels[index] < FINAL {
            self.levels[index] = FINAL;
            let event = self.final_event_of(c.image).await;
            self.push(event);
        }
        c.route_ready && self.route.is_some() && !self.route_ready_sent
    }

    async fn final_event(
        &self,
        image: &store::ImageRecord,
    ) -> api::watch_image_status_response::Event {
        self.final_event_of(views::image(image, None)).await
    }

    /// The final event of an image from its view (its URLs presigned here when missing: an
    /// announcement carries none).
    async fn final_event_of(
        &self,
        mut view: api::Image,
    ) -> api::watch_image_status_response::Event {
        use api::watch_image_status_response::Event;
        if view.status() == api::ImageStatus::Processed {
            self.shared.sign(&mut view).await;
            Event::ImageProcessed(api::ImageProcessedEvent {
                preview_url: view.preview_url.clone(),
                image: Some(view),
            })
        } else {
            Event::ImageFailed(api::ImageFailedEvent {
                image_id: view.id,
                route_id: view.route_id,
                error_code: view.error_code,
                error_message: view.error_message,
            })
        }
    }

    /// Queues a live stage when it is above what the client has.
    fn progress(&mut self, image_id: Uuid, stage: Stage, seq: u64) {
        let Some(index) = self.images.iter().position(|i| *i == image_id) else {
            return;
        };
        let Ok(level) = u8::try_from(seq) else {
            return;
        };
        if level >= FINAL || level <= self.levels[index] {
            return;
        }
        self.levels[index] = level;
        let route_id = self.routes_of.get(index).copied().unwrap_or_default();
        self.push(api::watch_image_status_response::Event::ImageProgress(
            api::ImageProgressEvent {
                image_id: image_id.to_string(),
                route_id: route_id.to_string(),
                stage: follow_proto::events::v1::Stage::from(stage).into(),
                seq,
            },
        ));
    }

    /// Queues `event` with the cursor of the levels as they are now (after it).
    fn push(&mut self, event: api::watch_image_status_response::Event) {
        self.outbox.push_back(api::WatchImageStatusResponse {
            cursor: encode_cursor(&self.levels, self.route_ready_sent),
            time: Some(timestamp(OffsetDateTime::now_utc())),
            event: Some(event),
        });
    }
}

/// What a watch must read after a hub event.
enum Read {
    Nothing,
    /// The route, to send `route_ready` (a committed image made it READY).
    Route,
    /// Everything: messages may have been missed.
    All,
}

/// A watch being streamed.
struct Live {
    watch: Watch,
    beat: tokio::time::Interval,
    /// Registered once for the stream's life, not once per message.
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    started: bool,
    /// When images the gateway is done with are read again, while there are any (boxed: most
    /// watches never need it).
    recheck: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The wait before the next re-read (doubling up to [`RECHECK_MAX`]).
    recheck_after: std::time::Duration,
}

impl Live {
    /// Arms the re-read when images are settling and it is not armed; disarms it when none are.
    fn arm_recheck(&mut self) {
        if self.watch.levels.iter().any(|l| SETTLING.contains(l)) {
            if self.recheck.is_none() {
                self.recheck = Some(Box::pin(tokio::time::sleep(self.recheck_after)));
            }
        } else {
            self.recheck = None;
            self.recheck_after = self.watch.shared.limits.recheck;
        }
    }
}

impl follow_service::stream::Source for Live {
    type Item = api::WatchImageStatusResponse;

    /// The next response; `None` when the watch is complete.
    async fn next(&mut self) -> Option<Result<api::WatchImageStatusResponse, Status>> {
        loop {
            if let Some(response) = self.watch.outbox.pop_front() {
                self.beat.reset();
                return Some(Ok(response));
            }
            // Idle from here on: a burst's outbox is not kept.
            self.watch.outbox = VecDeque::new();
            if !std::mem::replace(&mut self.started, true) {
                if let Err(e) = self.watch.catch_up().await {
                    return Some(Err(e.into()));
                }
                continue;
            }
            if self.watch.is_complete() {
                return None;
            }
            self.arm_recheck();
            let Self {
                watch,
                beat,
                cancelled,
                recheck,
                recheck_after,
                ..
            } = self;
            let due = async {
                match recheck {
                    Some(sleep) => sleep.await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                () = cancelled => {
                    return Some(Err(Status::unavailable(
                        "the server is shutting down; reconnect with your last cursor",
                    )));
                }
                _ = beat.tick() => {
                    watch.push(api::watch_image_status_response::Event::Heartbeat(
                        api::HeartbeatEvent {},
                    ));
                    continue;
                }
                () = due => {
                    *recheck = None;
                    *recheck_after = (*recheck_after * 2).min(RECHECK_MAX);
                    // Boxed, as `committed`: rare, and kilobytes of future.
                    if let Err(e) = Box::pin(watch.recheck()).await {
                        return Some(Err(e.into()));
                    }
                    continue;
                }
                event = watch.subscription.recv() => event,
            };
            let read = match watch.apply(event).await {
                Ok(Read::Nothing) => Ok(()),
                // Boxed, as `committed`: rare, and kilobytes of future.
                Ok(Read::Route) => Box::pin(watch.read_route()).await,
                Ok(Read::All) => watch.catch_up().await,
                Err(status) => return Some(Err(status)),
            };
            if let Err(e) = read {
                return Some(Err(e.into()));
            }
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.watch.shared.metrics.watchers.dec();
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use follow_service::stream::Source as _;

    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<A, F: Future>(_f: impl FnOnce(A) -> F) -> usize {
        size_of::<F>()
    }

    /// Every open stream holds its `next()` future for as long as it is idle, so that future
    /// is per-stream memory: the rare, large steps (presigning a download, reading a route)
    /// are boxed when they happen instead of sized into every stream (8 KB before).
    #[test]
    fn an_idle_stream_holds_a_small_future() {
        let next = future_size(|mut live: Live| async move { live.next().await });
        assert!(
            next < 1024,
            "a watch stream's next() future is {next} bytes"
        );
    }
}
