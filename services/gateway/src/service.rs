//! `follow.gateway.v1.GatewayService`: an upload's status and its live stages (authorized by
//! the upload's own token), and the pipeline's counters.

use std::{sync::Arc, time::Duration};

use follow_bus::{ConsumerStats, HealthChecker, Hub, HubEvent, Notice, Progress, keys};
use follow_proto::{
    events::v1 as events,
    gateway::v1::{self as pb, gateway_service_server::GatewayService as GatewayServiceApi},
    prost_types,
    time::timestamp,
};
use follow_service::{
    auth::bearer_of,
    config::{ExposeSecret as _, SecretString},
    limits::Tally,
    stream::{ResponseStream, Source, respond_until},
};
use subtle::ConstantTimeEq as _;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use follow_token::UploadClaims;

use crate::{
    error::UploadError,
    upload::{Gateway, verify},
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    pub gateway: Arc<Gateway>,
    pub hub: Arc<Hub>,
    pub queue: HealthChecker,
    pub consumers: Arc<ConsumerStats>,
    /// `WatchUpload` streams open per upload (`FOLLOW_MAX_WATCHES_PER_UPLOAD`).
    pub watches: Tally,
    /// What `GetPipelineStats` asks for (`FOLLOW_OPS_TOKEN`); `None`: nobody may.
    pub ops_token: Option<SecretString>,
    pub cancel: CancellationToken,
}

impl GatewayService {
    /// The claims of the caller's upload token.
    fn claims_of(&self, metadata: &MetadataMap) -> Result<UploadClaims, Status> {
        let token = bearer_of(metadata.as_ref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?
            .ok_or_else(|| {
                Status::unauthenticated("expected `authorization: Bearer <upload token>`")
            })?;
        verify(&self.gateway.verifier, token).map_err(Status::from)
    }

    /// The caller presented the operators' token.
    fn check_ops(&self, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(expected) = &self.ops_token else {
            return Err(Status::permission_denied(
                "pipeline stats are for operators: set FOLLOW_OPS_TOKEN and present it",
            ));
        };
        let token = bearer_of(metadata.as_ref())
            .map_err(|e| Status::unauthenticated(e.to_string()))?
            .unwrap_or_default();
        let same: bool = token
            .as_bytes()
            .ct_eq(expected.expose_secret().as_bytes())
            .into();
        if same {
            Ok(())
        } else {
            Err(Status::unauthenticated(
                "expected `authorization: Bearer <FOLLOW_OPS_TOKEN>`",
            ))
        }
    }
}

fn upload_status(p: &Progress) -> pb::UploadStatus {
    let (code, message) = p
        .failure()
        .map_or((events::ErrorCode::Unspecified, String::new()), |f| {
            (events::ErrorCode::from(f.code), f.message.clone())
        });
    pb::UploadStatus {
        image_id: p.image_id().to_string(),
        stage: events::Stage::from(p.stage()).into(),
        seq: p.seq(),
        update_time: Some(timestamp(p.at())),
        error_code: code.into(),
        error_message: message,
    }
}

fn bus_unavailable(e: &follow_bus::BusError) -> Status {
    tracing::warn!(error = %e, "the event bus is unavailable");
    Status::from(UploadError::BusUnavailable)
}

type WatchStream = ResponseStream<pb::WatchUploadResponse>;

#[tonic::async_trait]
impl GatewayServiceApi for GatewayService {
    type WatchUploadStream = WatchStream;

    async fn get_upload_status(
        &self,
        request: Request<pb::GetUploadStatusRequest>,
    ) -> Result<Response<pb::GetUploadStatusResponse>, Status> {
        let image_id = self.claims_of(request.metadata())?.image_id;
        let asked = &request.get_ref().image_id;
        if !asked.is_empty() && Uuid::try_parse(asked).ok() != Some(image_id) {
            return Err(Status::not_found("upload not found"));
        }
        let progress = self
            .gateway
            .progress
            .clone()
            .current(image_id)
            .await
            .map_err(|e| bus_unavailable(&e))?
            .ok_or_else(|| {
                Status::not_found("no status for this upload (not started, or expired)")
            })?;
        Ok(Response::new(pb::GetUploadStatusResponse {
            status: Some(upload_status(&progress)),
        }))
    }

    async fn get_pipeline_stats(
        &self,
        request: Request<pb::GetPipelineStatsRequest>,
    ) -> Result<Response<pb::GetPipelineStatsResponse>, Status> {
        self.check_ops(request.metadata())?;
        let queue = self
            .queue
            .clone()
            .queue_info(keys::JOBS)
            .await
            .map_err(|e| bus_unavailable(&e))?
            .unwrap_or(follow_bus::QueueInfo {
                pending: 0,
                lag: Some(0),
                oldest: None,
                dead: 0,
                oldest_dead: None,
            });
        let m = &self.gateway.metrics;
        let stat = |n: i64| u64::try_from(n).unwrap_or(0);
        let count = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let oldest = queue.oldest.unwrap_or(Duration::ZERO);
        Ok(Response::new(pb::GetPipelineStatsResponse {
            in_flight: stat(m.receiving.get()) + stat(m.processing.get()),
            queued: queue.lag.unwrap_or(0),
            processed: m.processed_count(),
            failed: m.failed_count(),
            failed_by_error_code: m
                .failures()
                .into_iter()
                .map(|(code, count)| pb::ErrorCount {
                    error_code: events::ErrorCode::from(code).into(),
                    count,
                })
                .collect(),
            jobs_in_progress: queue.pending,
            jobs_dead: queue.dead,
            oldest_job_age: Some(prost_types::Duration {
                seconds: i64::try_from(oldest.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(oldest.subsec_nanos()).unwrap_or(0),
            }),
            jobs_retried: count(&self.consumers.retried),
            jobs_reclaimed: count(&self.consumers.reclaimed),
        }))
    }

    async fn watch_upload(
        &self,
        request: Request<pb::WatchUploadRequest>,
    ) -> Result<Response<Self::WatchUploadStream>, Status> {
        let claims = self.claims_of(request.metadata())?;
        let image_id = claims.image_id;
        // The stream ends when the token that opened it does (with the clock leeway).
        let remaining = claims
            .expires_at()
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        let expires = tokio::time::Instant::now() + remaining + self.gateway.config.token_leeway;
        let slot = self.watches.take(&image_id.to_string()).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "this upload has {} watches open already; close one first",
                self.watches.max()
            ))
        })?;
        // Subscribed before the first read: nothing falls between.
        let subscription = self
            .hub
            .subscribe(&[image_id])
            .await
            .map_err(|e| bus_unavailable(&e))?;
        let watch = UploadWatch {
            image_id,
            progress: self.gateway.progress.clone(),
            subscription,
            last: 0,
            finished: false,
            started: false,
            outbox: Vec::new(),
            cancel: self.cancel.clone(),
        };
        Ok(Response::new(respond_until(watch, expires, slot)))
    }
}

/// One `WatchUpload` stream: the stored stage, then every later one until done or failed. It is
/// the response stream itself (no task, no queue): it works only when the client takes an event.
struct UploadWatch {
    image_id: Uuid,
    progress: follow_bus::ProgressTracker,
    subscription: follow_bus::Subscription,
    /// The seq of the last stage sent: only higher ones go out.
    last: u64,
    /// A final stage was queued: the stream ends after it.
    finished: bool,
    started: bool,
    /// Stages made but not taken yet, latest last.
    outbox: Vec<Progress>,
    cancel: CancellationToken,
}

impl Source for UploadWatch {
    type Item = pb::WatchUploadResponse;

    async fn next(&mut self) -> Option<Result<pb::WatchUploadResponse, Status>> {
        loop {
            if !self.outbox.is_empty() {
                let p = self.outbox.remove(0);
                return Some(Ok(pb::WatchUploadResponse {
                    status: Some(upload_status(&p)),
                }));
            }
            if !std::mem::replace(&mut self.started, true) {
                self.catch_up().await;
                continue;
            }
            if self.finished {
                return None;
            }
            let event = tokio::select! {
                () = self.cancel.cancelled() => {
                    return Some(Err(Status::unavailable("the gateway is shutting down; watch again")));
                }
                event = self.subscription.recv() => event,
            };
            match event {
                Some(HubEvent::Notices(notices)) => {
                    for notice in notices {
                        if let Notice::Progress(p) = notice {
                            self.offer(p);
                        }
                    }
                }
                Some(HubEvent::Resync) => self.catch_up().await,
                Some(HubEvent::Lagged) => {
                    return Some(Err(Status::resource_exhausted(
                        "this watch fell too far behind; watch again",
                    )));
                }
                None => {
                    return Some(Err(Status::unavailable(
                        "live updates stopped; watch again",
                    )));
                }
            }
        }
    }
}

impl UploadWatch {
    /// Queues the stored stage if it is news (Valkey unavailable: live updates will do).
    async fn catch_up(&mut self) {
        match self.progress.current(self.image_id).await {
            Ok(Some(p)) => self.offer(p),
            Ok(None) => {}
            Err(e) => tracing::debug!(error = %e, "status unavailable; waiting for live updates"),
        }
    }

    fn offer(&mut self, p: Progress) {
        if p.seq() > self.last {
            self.last = p.seq();
            self.finished = p.stage().is_final();
            self.outbox.push(p);
        }
    }
}
