//! `follow.gateway.v1.GatewayService`: an upload's status and its live stages (authorized by
//! the upload's own token), and this instance's pipeline counters.

use std::{pin::Pin, sync::Arc, sync::atomic::Ordering::Relaxed};

use follow_bus::{Hub, HubEvent, ProgressTracker, Stage, StatusSnapshot};
use follow_proto::{
    events::v1 as events,
    gateway::v1::{self as pb, gateway_service_server::GatewayService as GatewayServiceApi},
    prost_types::Timestamp,
};
use futures_util::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::{
    error::UploadError,
    metrics::Metrics,
    upload::{Gateway, verify},
};

#[derive(Debug, Clone)]
pub struct GatewayService {
    pub gateway: Arc<Gateway>,
    pub hub: Arc<Hub>,
    pub cancel: CancellationToken,
}

fn status_of(e: UploadError) -> Status {
    match e {
        UploadError::InvalidToken(m) => Status::unauthenticated(m),
        UploadError::TokenExpired => Status::unauthenticated("the upload token has expired"),
        other => Status::internal(other.to_string()),
    }
}

impl GatewayService {
    /// The image the caller's upload token is for.
    fn image_of(&self, metadata: &MetadataMap) -> Result<Uuid, Status> {
        let token = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .ok_or_else(|| {
                Status::unauthenticated("expected `authorization: Bearer <upload token>`")
            })?;
        Ok(verify(&self.gateway.verifier, token.trim())
            .map_err(status_of)?
            .image_id)
    }
}

fn upload_status(image_id: Uuid, s: &StatusSnapshot) -> pb::UploadStatus {
    let (code, message) = s
        .failure
        .as_ref()
        .map_or((events::ErrorCode::Unspecified, String::new()), |f| {
            (events::ErrorCode::from(f.code), f.message.clone())
        });
    pb::UploadStatus {
        image_id: image_id.to_string(),
        stage: events::Stage::from(s.stage).into(),
        seq: s.seq,
        update_time: Some(Timestamp {
            seconds: s.updated_at.unix_timestamp(),
            nanos: i32::try_from(s.updated_at.nanosecond()).unwrap_or(0),
        }),
        error_code: code.into(),
        error_message: message,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchUploadResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GatewayServiceApi for GatewayService {
    type WatchUploadStream = WatchStream;

    async fn get_upload_status(
        &self,
        request: Request<pb::GetUploadStatusRequest>,
    ) -> Result<Response<pb::GetUploadStatusResponse>, Status> {
        let image_id = self.image_of(request.metadata())?;
        let asked = &request.get_ref().image_id;
        if !asked.is_empty() && Uuid::try_parse(asked).ok() != Some(image_id) {
            return Err(Status::not_found("upload not found"));
        }
        let snapshot = self
            .gateway
            .progress
            .clone()
            .current(image_id)
            .await
            .map_err(|e| {
                tracing::warn!(error = %e, "status unavailable");
                Status::unavailable("the event bus is unavailable; retry later")
            })?;
        let snapshot = snapshot.ok_or_else(|| {
            Status::not_found("no status for this upload (not started, or expired)")
        })?;
        Ok(Response::new(pb::GetUploadStatusResponse {
            status: Some(upload_status(image_id, &snapshot)),
        }))
    }

    async fn get_pipeline_stats(
        &self,
        _request: Request<pb::GetPipelineStatsRequest>,
    ) -> Result<Response<pb::GetPipelineStatsResponse>, Status> {
        let m: &Metrics = &self.gateway.metrics;
        Ok(Response::new(pb::GetPipelineStatsResponse {
            in_flight: u64::try_from(m.in_flight.get()).unwrap_or(0),
            queued: u64::try_from(m.queued.get()).unwrap_or(0),
            processed: m.processed.load(Relaxed),
            failed: m.failed.load(Relaxed),
            failed_by_error_code: m
                .failures()
                .into_iter()
                .map(|(code, count)| pb::ErrorCount {
                    error_code: events::ErrorCode::from(code).into(),
                    count,
                })
                .collect(),
        }))
    }

    async fn watch_upload(
        &self,
        request: Request<pb::WatchUploadRequest>,
    ) -> Result<Response<Self::WatchUploadStream>, Status> {
        let image_id = self.image_of(request.metadata())?;
        // Subscribed before the first read: nothing falls between.
        let subscription = self.hub.subscribe(&[image_id]).await.map_err(|e| {
            tracing::warn!(error = %e, "cannot subscribe");
            Status::unavailable("the event bus is unavailable; retry later")
        })?;
        let (tx, rx) = mpsc::channel(16);
        let watch = UploadWatch {
            image_id,
            progress: self.gateway.progress.clone(),
            last: 0,
        };
        let cancel = self.cancel.clone();
        self.gateway
            .tasks
            .spawn(watch.run(subscription, tx, cancel));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct UploadWatch {
    image_id: Uuid,
    progress: ProgressTracker,
    /// The seq of the last stage sent: only higher ones go out.
    last: u64,
}

type Tx = mpsc::Sender<Result<pb::WatchUploadResponse, Status>>;

impl UploadWatch {
    async fn run(
        mut self,
        mut subscription: follow_bus::Subscription,
        tx: Tx,
        cancel: CancellationToken,
    ) {
        if !self.catch_up(&tx).await {
            return;
        }
        while !Stage::ALL
            .iter()
            .any(|s| s.is_final() && s.seq() == self.last)
        {
            let event = tokio::select! {
                () = cancel.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("the gateway is shutting down"))).await;
                    return;
                }
                () = tx.closed() => return,
                event = subscription.recv() => event,
            };
            let go_on = match event {
                Some(HubEvent::Progress(batch)) => {
                    let mut go_on = true;
                    for p in batch.into_iter().filter(|p| !p.committed) {
                        let snapshot = StatusSnapshot {
                            stage: p.stage,
                            seq: p.seq,
                            updated_at: p.at,
                            failure: p.failure,
                        };
                        go_on = self.send(&tx, &snapshot).await;
                        if !go_on {
                            break;
                        }
                    }
                    go_on
                }
                Some(HubEvent::Resync) => self.catch_up(&tx).await,
                Some(HubEvent::Lagged) => {
                    let _ = tx
                        .send(Err(Status::resource_exhausted(
                            "this watch fell too far behind; watch again",
                        )))
                        .await;
                    return;
                }
                None => {
                    let _ = tx
                        .send(Err(Status::unavailable(
                            "live updates stopped; watch again",
                        )))
                        .await;
                    return;
                }
            };
            if !go_on {
                return;
            }
        }
    }

    /// Sends the stored stage if it is news; `false` when the client is gone.
    async fn catch_up(&mut self, tx: &Tx) -> bool {
        match self.progress.current(self.image_id).await {
            Ok(Some(snapshot)) => self.send(tx, &snapshot).await,
            Ok(None) => true,
            Err(e) => {
                tracing::debug!(error = %e, "status unavailable; waiting for live updates");
                true
            }
        }
    }

    async fn send(&mut self, tx: &Tx, snapshot: &StatusSnapshot) -> bool {
        if snapshot.seq <= self.last {
            return true;
        }
        self.last = snapshot.seq;
        let status = upload_status(self.image_id, snapshot);
        tx.send(Ok(pb::WatchUploadResponse {
            status: Some(status),
        }))
        .await
        .is_ok()
    }
}
