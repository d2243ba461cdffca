//! `PUT /upload`: verify the token, take the one-time guard, stream and check the body, answer
//! 202, then run the pipeline in the background and publish the result.
//!
//! Order matters. Refusals *before* the guard (bad token, overloaded, Valkey down) leave the
//! token usable and publish nothing. From the guard on the token is spent, so every refusal or
//! failure also ends in a `failed` status and a `failed` result: the API always learns.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::Body,
    extract::{Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::{
    Failure, GuardOutcome, ImageResult, Processed, Progress, ProgressTracker, ResultOutcome, Stage,
    UploadGuard,
};
use follow_token::{TokenError, UploadClaims, Verifier};
use futures_util::StreamExt;
use image::ImageFormat;
use serde_json::json;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::{
    config::Config,
    error::UploadError,
    metrics::Metrics,
    outbox::Outbox,
    pipeline,
    sniff::{self, Header},
    storage::{Storage, preview_key},
};

/// After this long a body must keep up `FOLLOW_MIN_UPLOAD_RATE` on average.
const RATE_GRACE: Duration = Duration::from_secs(10);

/// Everything an upload and its pipeline need.
#[derive(Debug)]
pub struct Gateway {
    pub verifier: Verifier<UploadClaims>,
    pub guard: UploadGuard,
    pub progress: ProgressTracker,
    pub storage: Storage,
    pub outbox: Arc<Outbox>,
    /// Uploads being received or processed: bounds memory (each holds at most one body).
    pub admission: Arc<Semaphore>,
    /// Images being processed on the blocking pool at once.
    pub workers: Arc<Semaphore>,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub tasks: TaskTracker,
    /// This instance's name in the guard (who took an upload).
    pub holder: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct UploadQuery {
    token: Option<String>,
}

pub async fn put_upload(
    State(gateway): State<Arc<Gateway>>,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match gateway.accept(query.token, &headers, body).await {
        Ok(image_id) => (
            StatusCode::ACCEPTED,
            Json(json!({"image_id": image_id, "status": "accepted"})),
        )
            .into_response(),
        Err(e) => e.into_response(),
    };
    gateway.metrics.upload(response.status().as_u16());
    response
}

/// The bearer token from `?token=` or `Authorization: Bearer`.
pub fn token_of(query: Option<String>, headers: &HeaderMap) -> Result<String, UploadError> {
    if let Some(token) = query.filter(|t| !t.is_empty()) {
        return Ok(token);
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned())
        .ok_or_else(|| {
            UploadError::InvalidToken(
                "no upload token (`?token=` or `Authorization: Bearer`)".into(),
            )
        })
}

pub fn verify(verifier: &Verifier<UploadClaims>, token: &str) -> Result<UploadClaims, UploadError> {
    verifier.verify(token).map_err(|e| match e {
        TokenError::Expired => UploadError::TokenExpired,
        other => UploadError::InvalidToken(other.to_string()),
    })
}

/// A checked body, ready for the pipeline.
struct Received {
    bytes: Vec<u8>,
    format: ImageFormat,
    sha256: String,
}

impl Gateway {
    async fn accept(
        self: &Arc<Self>,
        token: Option<String>,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Uuid, UploadError> {
        let claims = verify(&self.verifier, &token_of(token, headers)?)?;
        let image_id = claims.image_id;
        let span = tracing::info_span!("upload", %image_id);
        let _entered = span.enter();
        let permit = Arc::clone(&self.admission)
            .try_acquire_owned()
            .map_err(|_| {
                tracing::warn!("upload refused: at capacity");
                UploadError::Overloaded
            })?;
        match self.guard.clone().acquire(image_id, &self.holder).await {
            Ok(GuardOutcome::Acquired) => {}
            Ok(GuardOutcome::Taken) => return Err(UploadError::Duplicate),
            Err(e) => {
                tracing::warn!(error = %e, "upload refused: the guard cannot be taken");
                return Err(UploadError::BusUnavailable);
            }
        }
        drop(_entered);
        self.metrics.in_flight.inc();
        let started = Instant::now();
        let reporter = Reporter::start(self, image_id);
        reporter.stage(Stage::WaitingUpload);
        match self.receive(&claims, headers, body, &reporter).await {
            Ok(body) => {
                let gateway = Arc::clone(self);
                self.tasks.spawn(async move {
                    Box::pin(gateway.process(claims, body, reporter, permit, started)).await;
                });
                Ok(image_id)
            }
            Err(e) => {
                self.fail(image_id, &e, reporter, started);
                drop(permit);
                Err(e)
            }
        }
    }

    /// Streams the body in with every check that can be made before decoding.
    async fn receive(
        &self,
        claims: &UploadClaims,
        headers: &HeaderMap,
        body: Body,
        reporter: &Reporter,
    ) -> Result<Received, UploadError> {
        let expected = sniff::format_of_content_type(&claims.content_type).ok_or_else(|| {
            UploadError::InvalidToken("the token's content type is not accepted".into())
        })?;
        let got = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .unwrap_or_default();
        if got != claims.content_type {
            return Err(UploadError::ContentTypeMismatch {
                expected: claims.content_type.clone(),
                got,
            });
        }
        let limit = claims.max_file_size.min(self.config.max_upload_bytes);
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(UploadError::TooLarge(limit));
        }
        let capacity = declared.unwrap_or(64 * 1024).min(limit);
        let mut bytes = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
        let mut hasher = Sha256::new();
        let mut stream = body.into_data_stream();
        let (started, deadline) = (Instant::now(), Instant::now() + self.config.body_timeout);
        let mut format = None;
        let mut dimensions = false;
        loop {
            let wait = self
                .config
                .body_idle_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let chunk = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => return Err(UploadError::TooSlow),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    return Err(UploadError::Malformed(format!(
                        "the body could not be read: {e}"
                    )));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            if (bytes.len() + chunk.len()) as u64 > limit {
                return Err(UploadError::TooLarge(limit));
            }
            hasher.update(&chunk);
            bytes.extend_from_slice(&chunk);
            let elapsed = started.elapsed();
            if elapsed > RATE_GRACE
                && (bytes.len() as f64) < self.config.min_upload_rate as f64 * elapsed.as_secs_f64()
            {
                return Err(UploadError::TooSlow);
            }
            if format.is_none() && bytes.len() >= sniff::MAGIC_LEN {
                format = Some(self.check_format(&bytes, expected)?);
            }
            if format.is_some() && !dimensions {
                dimensions = matches!(
                    sniff::check_header(&bytes, self.config.pipeline.max_pixels)?,
                    Header::Dimensions { .. }
                );
            }
        }
        reporter.stage(Stage::Validating);
        let format = match format {
            Some(f) => f,
            None => self.check_format(&bytes, expected)?,
        };
        if !dimensions
            && sniff::check_header(&bytes, self.config.pipeline.max_pixels)? == Header::Incomplete
        {
            return Err(UploadError::InvalidImage(
                "the image header is truncated".into(),
            ));
        }
        sniff::check_complete(&bytes, format)?;
        Ok(Received {
            bytes,
            format,
            sha256: hex(&hasher.finalize()),
        })
    }

    fn check_format(
        &self,
        prefix: &[u8],
        expected: ImageFormat,
    ) -> Result<ImageFormat, UploadError> {
        let found = sniff::sniff(prefix)?;
        if found != expected {
            return Err(UploadError::InvalidImage(format!(
                "the bytes are {found:?}, not the declared type"
            )));
        }
        Ok(found)
    }

    async fn process(
        self: Arc<Self>,
        claims: UploadClaims,
        body: Received,
        reporter: Reporter,
        permit: OwnedSemaphorePermit,
        started: Instant,
    ) {
        let image_id = claims.image_id;
        self.metrics.queued.inc();
        let worker = Arc::clone(&self.workers).acquire_owned().await;
        self.metrics.queued.dec();
        let Ok(worker) = worker else {
            return self.fail(image_id, &UploadError::Internal, reporter, started);
        };
        let config = self.config.pipeline;
        let stages = reporter.sender();
        let Received {
            bytes,
            format,
            sha256,
        } = body;
        let original_bytes = bytes.len();
        let output = tokio::task::spawn_blocking(move || {
            let _worker = worker;
            pipeline::run(&bytes, format, &config, |stage| {
                let _ = stages.send(stage);
            })
        })
        .await
        .unwrap_or_else(|e| {
            tracing::error!(%image_id, error = %e, "the pipeline panicked");
            Err(UploadError::Internal)
        });
        let output = match output {
            Ok(output) => output,
            Err(e) => return self.fail(image_id, &e, reporter, started),
        };
        reporter.stage(Stage::UploadingToStorage);
        let preview = preview_key(&claims.storage_key);
        let byte_size = output.image.bytes.len() as u64;
        let (image_type, preview_type) = (output.image.content_type, output.preview.content_type);
        let stored = tokio::try_join!(
            self.storage
                .put(&claims.storage_key, output.image.bytes, image_type),
            self.storage
                .put(&preview, output.preview.bytes, preview_type),
        );
        if let Err(e) = stored {
            tracing::error!(%image_id, error = %e, "storing the image failed");
            return self.fail(image_id, &UploadError::Storage, reporter, started);
        }
        reporter.stage(Stage::Done);
        reporter.finish().await;
        self.outbox.push(ImageResult {
            image_id,
            outcome: ResultOutcome::Processed(Processed {
                storage_key: claims.storage_key.clone(),
                preview_key: preview,
                sha256,
                content_type: image_type.to_owned(),
                width: output.width,
                height: output.height,
                processed_width: output.image.width,
                processed_height: output.image.height,
                byte_size,
            }),
            produced_at: OffsetDateTime::now_utc(),
            processing_ms: started.elapsed().as_millis() as u64,
        });
        self.metrics.outbox.set(self.outbox.len() as i64);
        self.metrics
            .processed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.metrics.in_flight.dec();
        tracing::info!(%image_id, original_bytes, byte_size, ms = started.elapsed().as_millis() as u64, "image processed");
        drop(permit);
    }

    /// Records a failure after the guard: status, result, metrics.
    fn fail(&self, image_id: Uuid, error: &UploadError, reporter: Reporter, started: Instant) {
        let failure = Failure {
            code: error.code(),
            message: error.to_string(),
        };
        tracing::info!(%image_id, code = failure.code.as_str(), message = %failure.message, "image failed");
        self.metrics.failed(failure.code);
        self.metrics.in_flight.dec();
        reporter.failed(failure.clone());
        self.outbox.push(ImageResult {
            image_id,
            outcome: ResultOutcome::Failed(failure),
            produced_at: OffsetDateTime::now_utc(),
            processing_ms: started.elapsed().as_millis() as u64,
        });
        self.metrics.outbox.set(self.outbox.len() as i64);
    }
}

/// Reports one image's stages in order, without ever holding the pipeline up: a background task
/// writes them one after the other; a Valkey error is logged and the image goes on.
#[derive(Debug)]
struct Reporter {
    tx: mpsc::UnboundedSender<Report>,
    done: tokio::task::JoinHandle<()>,
}

enum Report {
    Stage(Stage),
    Failed(Failure),
}

impl Reporter {
    fn start(gateway: &Arc<Gateway>, image_id: Uuid) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
        let mut progress = gateway.progress.clone();
        let metrics = Arc::clone(&gateway.metrics);
        let done = gateway.tasks.spawn(async move {
            let mut last: Option<(Stage, Instant)> = None;
            while let Some(report) = rx.recv().await {
                let p = match report {
                    Report::Stage(stage) => Progress::stage(image_id, stage),
                    Report::Failed(failure) => Progress::failed(image_id, failure),
                };
                if let Some((stage, since)) = last.replace((p.stage, Instant::now())) {
                    metrics.stage(stage, since.elapsed().as_secs_f64());
                }
                if let Err(e) = progress.record(&p).await {
                    tracing::debug!(%image_id, stage = p.stage.as_str(), error = %e, "progress not recorded");
                }
            }
        });
        Self { tx, done }
    }

    fn stage(&self, stage: Stage) {
        let _ = self.tx.send(Report::Stage(stage));
    }

    fn sender(&self) -> StageSender {
        StageSender(self.tx.clone())
    }

    fn failed(self, failure: Failure) {
        let _ = self.tx.send(Report::Failed(failure));
    }

    /// Waits until every report so far is written (or given up on).
    async fn finish(self) {
        drop(self.tx);
        let _ = self.done.await;
    }
}

/// The pipeline's side of a [`Reporter`] (usable from the blocking pool).
struct StageSender(mpsc::UnboundedSender<Report>);

impl StageSender {
    fn send(&self, stage: Stage) -> Result<(), ()> {
        self.0.send(Report::Stage(stage)).map_err(|_| ())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
