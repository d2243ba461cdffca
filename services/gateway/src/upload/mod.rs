//! `PUT /upload`: verify the token, take the one-time guard, receive the body into a spool file
//! while checking it, store it as the image's original in S3, queue the job, answer `202`.
//!
//! The commit point is S3: a `202` is sent only once the original is stored, and from then on
//! the photo is safe whatever happens to this process (docs/architecture.md, "Failure handling").
//!
//! * Refusals before the guard (bad token, wrong `Content-Type`, declared size over the limit,
//!   too busy, Valkey down) leave the token usable and publish nothing.
//! * A transfer that fails before the body is complete (client gone, too slow), or storage that
//!   cannot take the original, releases the guard: the same token works again.
//! * A bad body (type, size, pixels, truncated) spends the token and ends in a `failed` result,
//!   recorded in S3 first and then published: the API always learns.

use std::{
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Json,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::{
    Failure, GuardOutcome, GuardState, ImageResult, Job, Producer, ProgressTracker, ResultOutcome,
    Stage, UploadGuard,
};
use follow_service::{
    auth::bearer_of,
    limits::Tally,
    objects::{self, original_key, parse_storage_key, record_key},
    s3::{Bucket, S3Error},
};
use follow_token::{TokenError, UploadClaims, Verifier};
use futures_util::StreamExt;
use image::ImageFormat;
use tempfile::NamedTempFile;
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::{
    config::Config, error::UploadError, metrics::Metrics, report::Reporter, sniff, spool::Spool,
};

mod check;
mod resumable;

use check::BodyCheck;
pub use resumable::{
    Sweeper, delete_upload, head_upload, options_upload, patch_upload, post_upload,
};

/// Beyond the body idle timeout, how long a receiving guard outlives its last renewal.
const RENEW_SLACK: Duration = Duration::from_secs(5);

/// After this long a body must keep up `FOLLOW_MIN_UPLOAD_RATE` on average.
const RATE_GRACE: Duration = Duration::from_secs(10);

/// Everything the upload handler needs.
#[derive(Debug)]
pub struct Gateway {
    pub verifier: Verifier<UploadClaims>,
    pub guard: UploadGuard,
    pub progress: ProgressTracker,
    pub producer: Producer,
    pub bucket: Bucket,
    /// Uploads being received at once (`FOLLOW_MAX_RECEIVING`).
    pub receiving: Arc<Semaphore>,
    /// Uploads being received at once per user (`FOLLOW_MAX_UPLOADS_PER_USER`): no one user
    /// holds more than its share of [`Gateway::receiving`].
    pub uploads_per_user: Tally,
    pub spool: Spool,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    /// This instance's name: the prefix of its uploads' names in the guard (who took one).
    pub holder: String,
    /// Resumable uploads' shared state.
    pub resumables: follow_bus::Resumables,
}

pub async fn put_upload(
    State(gateway): State<Arc<Gateway>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let response = match gateway.accept(query.as_deref(), &headers, body).await {
        Ok(receipt) => (StatusCode::ACCEPTED, Json(receipt)).into_response(),
        Err(e) => e.into_response(),
    };
    gateway.metrics.upload(response.status().as_u16());
    response
}

/// The upload token of a request: one `?token=` or `Authorization: Bearer`, not two different
/// ones.
pub fn token_of<'a>(query: Option<&'a str>, headers: &'a HeaderMap) -> Result<String, UploadError> {
    let mut from_query: Option<String> = None;
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        if name != "token" {
            continue;
        }
        if from_query.is_some() {
            return Err(UploadError::BadRequest(
                "more than one `token` parameter".into(),
            ));
        }
        from_query = Some(value.into_owned());
    }
    let from_header = bearer_of(headers).map_err(|e| UploadError::BadRequest(e.to_string()))?;
    match (from_query.filter(|t| !t.is_empty()), from_header) {
        (Some(q), Some(h)) if q != h => Err(UploadError::BadRequest(
            "`?token=` and `Authorization` carry different tokens".into(),
        )),
        (Some(token), _) => Ok(token),
        (None, Some(token)) => Ok(token.to_owned()),
        (None, None) => Err(UploadError::InvalidToken(
            "no upload token (`?token=` or `Authorization: Bearer`)".into(),
        )),
    }
}

/// The claims of a valid upload token whose `storage_key` has the shape the architecture gives
/// and names the token's own image.
pub fn verify(verifier: &Verifier<UploadClaims>, token: &str) -> Result<UploadClaims, UploadError> {
    let claims = verifier.verify(token).map_err(|e| match e {
        TokenError::Expired => UploadError::TokenExpired,
        other => UploadError::InvalidToken(other.to_string()),
    })?;
    match parse_storage_key(&claims.storage_key) {
        Some((_, image)) if image == claims.image_id => Ok(claims),
        _ => Err(UploadError::InvalidToken(
            "the token's storage_key is not its image's".into(),
        )),
    }
}

/// What a `202` says: the photo is stored, with these bytes.
#[derive(Debug, serde::Serialize)]
pub struct Receipt {
    image_id: Uuid,
    sha256: String,
    bytes: u64,
    status: &'static str,
}

/// A body received in full, checked as far as it can be before decoding, in its spool file.
struct Received {
    file: NamedTempFile,
    sha256: [u8; 32],
    bytes: u64,
}

/// Where the bytes of an original are before the commit.
enum Original<'a> {
    /// In a local file, whole, with its SHA-256.
    File {
        path: &'a std::path::Path,
        sha256: &'a [u8; 32],
    },
    /// In the parts of an S3 multipart upload (each checked against its SHA-256).
    Parts {
        upload: &'a str,
        parts: &'a [follow_service::s3::StoredPart],
    },
}

/// Why receiving a body stopped.
enum Refused {
    /// Nothing was spent: the guard is released, the token may be used again.
    Transfer(UploadError),
    /// The body itself is bad: the token is spent and the image fails.
    Body(UploadError),
    /// The image has its upload already (its original or its result record is in S3: the
    /// guard was lost, as when Valkey loses its data): `409`, and nothing of the image changes.
    Used,
}

impl Gateway {
    async fn accept(
        self: &Arc<Self>,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Receipt, UploadError> {
        // A partial body (RFC 9110, 14.5: a PUT with `Content-Range` must be refused) is never
        // an image: refused before the token is looked at.
        if headers.contains_key(header::CONTENT_RANGE) {
            return Err(UploadError::Malformed(
                "`Content-Range` is not accepted: send the whole image in one PUT",
            ));
        }
        let claims = verify(&self.verifier, &token_of(query, headers)?)?;
        let image_id = claims.image_id;
        let span = tracing::info_span!("upload", %image_id);
        tracing::Instrument::instrument(self.accept_verified(claims, headers, body), span).await
    }

    async fn accept_verified(
        self: &Arc<Self>,
        claims: UploadClaims,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<Receipt, UploadError> {
        let image_id = claims.image_id;
        let format = sniff::format_of_content_type(&claims.content_type).ok_or_else(|| {
            UploadError::InvalidToken("the token's content type is not accepted".into())
        })?;
        let got = content_type(headers);
        if got != claims.content_type {
            return Err(UploadError::ContentTypeMismatch {
                expected: claims.content_type.clone(),
                got,
            });
        }
        let limit = claims
            .max_file_size
            .min(self.config.receive.max_upload_bytes);
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(UploadError::TooLarge(limit));
        }
        let _mine = self.uploads_per_user.take(&claims.sub).ok_or_else(|| {
            tracing::warn!("upload refused: the user's share of receiving is in use");
            UploadError::RateLimited(self.uploads_per_user.max())
        })?;
        let _receiving = Arc::clone(&self.receiving)
            .try_acquire_owned()
            .map_err(|_| {
                tracing::warn!("upload refused: receiving at capacity");
                UploadError::Overloaded
            })?;
        // This upload's own name in the guard: after the guard was lost (Valkey lost its data)
        // and taken again by a replay, this upload no longer holds it, even on this instance.
        let holder = format!("{}/{}", self.holder, Uuid::new_v4().simple());
        self.take_guard(&claims, &holder, self.lease()).await?;
        let started = Instant::now();
        let outcome = self.store(&claims, &holder, format, limit, body).await;
        match outcome {
            Ok(receipt) => {
                tracing::info!(
                    bytes = receipt.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "upload accepted"
                );
                Ok(receipt)
            }
            Err(Refused::Transfer(e)) => {
                self.release_guard(image_id, &holder).await;
                Err(e)
            }
            Err(Refused::Body(e)) => Err(self.fail(&claims, e, started).await),
            Err(Refused::Used) => {
                tracing::info!("upload refused: the image has its upload already");
                self.spend_guard(&claims).await;
                Err(UploadError::Duplicate)
            }
        }
    }

    /// The one-time guard: a short lease while the body arrives (renewed as bytes come), so a
    /// gateway that dies mid-body lets go of it on its own.
    async fn take_guard(
        &self,
        claims: &UploadClaims,
        holder: &str,
        lease: Duration,
    ) -> Result<(), UploadError> {
        let mut guard = self.guard.clone();
        let unavailable = |e: follow_bus::BusError| {
            tracing::warn!(error = %e, "upload refused: the guard cannot be taken");
            UploadError::BusUnavailable
        };
        // Twice at most: a guard whose lease runs out between the two reads is free again.
        for _ in 0..2 {
            match guard.acquire(claims.image_id, holder, lease).await {
                Ok(GuardOutcome::Acquired) => return Ok(()),
                Ok(GuardOutcome::Taken) => match guard.state(claims.image_id).await {
                    // Another upload of this token is arriving, or one whose answer was lost
                    // (its gateway died, or could not hear from Valkey): it may fail.
                    Ok(GuardState::Receiving) => return Err(UploadError::InProgress(self.lease())),
                    Ok(GuardState::Queued | GuardState::Spent) => {
                        return Err(UploadError::Duplicate);
                    }
                    Ok(GuardState::Free) => {}
                    Err(e) => return Err(unavailable(e)),
                },
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(UploadError::InProgress(self.lease()))
    }

    /// How long the guard of a body being received lives without news from its gateway.
    fn lease(&self) -> Duration {
        self.config.receive.body_idle_timeout + RENEW_SLACK
    }

    /// How long a used token's guard lives: until the token expires, plus the longest a body
    /// may take and the clock leeway (a slow upload started just before expiry is covered).
    fn spent_for(&self, claims: &UploadClaims) -> Duration {
        let remaining = claims
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        remaining + self.config.receive.body_timeout + self.config.token_leeway
    }

    /// Marks the token used until it expires, so later replays are refused by the guard.
    async fn spend_guard(&self, claims: &UploadClaims) {
        if let Err(e) = self
            .guard
            .clone()
            .spend(claims.image_id, self.spent_for(claims))
            .await
        {
            tracing::warn!(error = %e, "the spent token could not be marked");
        }
    }

    async fn release_guard(&self, image_id: Uuid, holder: &str) {
        if let Err(e) = self.guard.clone().release(image_id, holder).await {
            // It expires on its own; until then a retry gets 409.
            tracing::warn!(error = %e, "could not release the upload guard");
        }
    }

    /// From the guard to the `202`: the durable check, the body, the original, the job.
    async fn store(
        &self,
        claims: &UploadClaims,
        holder: &str,
        format: ImageFormat,
        limit: u64,
        body: Body,
    ) -> Result<Receipt, Refused> {
        self.unused(&claims.storage_key).await?;
        let reporter = Reporter::start(&self.progress, &self.metrics, claims.image_id);
        reporter.stage(Stage::WaitingUpload);
        self.metrics.receiving.inc();
        let received = self
            .receive(claims.image_id, holder, format, limit, body)
            .await;
        self.metrics.receiving.dec();
        if received.is_ok() {
            reporter.stage(Stage::Validating);
        }
        reporter.finish().await;
        let received = received?;
        let original = Original::File {
            path: received.file.path(),
            sha256: &received.sha256,
        };
        self.commit(claims, holder, self.lease(), original).await?;
        self.enqueue(claims).await;
        Ok(Receipt {
            image_id: claims.image_id,
            sha256: hex::encode(received.sha256),
            bytes: received.bytes,
            status: "accepted",
        })
    }

    /// After Valkey lost its data the guard is no proof: S3 is. An original or a result record
    /// means this token was used.
    async fn unused(&self, storage_key: &str) -> Result<(), Refused> {
        let (original, record) = (original_key(storage_key), record_key(storage_key));
        match tokio::try_join!(self.bucket.exists(&original), self.bucket.exists(&record)) {
            Ok((false, false)) => Ok(()),
            Ok(_) => Err(Refused::Used),
            Err(e) => {
                tracing::warn!(error = %e, "upload refused: storage unavailable");
                Err(Refused::Transfer(UploadError::StorageUnavailable))
            }
        }
    }

    /// The commit point: the received body stored as the image's original, if the image is
    /// still this upload's (`holder` still holds its guard, renewed for `lease`).
    async fn commit(
        &self,
        claims: &UploadClaims,
        holder: &str,
        lease: Duration,
        original_body: Original<'_>,
    ) -> Result<(), Refused> {
        let (original, record) = (
            original_key(&claims.storage_key),
            record_key(&claims.storage_key),
        );
        // Still this upload's? A replay that took the guard after it was lost has the image now
        // (S3 servers that ignore `If-None-Match` would let the second original overwrite the
        // first). Valkey away: the lease outlasts short outages, and S3 checks follow.
        match self
            .guard
            .clone()
            .renew(claims.image_id, holder, lease)
            .await
        {
            Ok(true) => {}
            Ok(false) => return Err(Refused::Transfer(UploadError::Duplicate)),
            Err(e) => tracing::warn!(error = %e, "the upload guard could not be checked"),
        }
        let stored = match original_body {
            Original::File { path, sha256 } => {
                self.bucket
                    .put_new_file(&original, path, &claims.content_type, sha256)
                    .await
            }
            Original::Parts { upload, parts } => {
                self.bucket
                    .complete_multipart(&original, upload, parts)
                    .await
            }
        };
        match stored {
            Ok(()) => {}
            Err(S3Error::Exists) => return Err(Refused::Used),
            Err(e) => {
                tracing::warn!(error = %e, "upload refused: the original could not be stored");
                return Err(Refused::Transfer(UploadError::StorageUnavailable));
            }
        }
        // Another upload of this token may have been stored, processed and its original
        // removed while this body arrived (or a bad one may have failed the image): its record
        // is the image's outcome, and this original goes.
        match self.bucket.exists(&record).await {
            Ok(false) => Ok(()),
            Ok(true) => {
                self.remove(&original).await;
                Err(Refused::Used)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upload refused: storage unavailable after the original was stored");
                self.remove(&original).await;
                Err(Refused::Transfer(UploadError::StorageUnavailable))
            }
        }
    }

    /// Queues the job of an accepted upload (and marks its guard `queued`).
    async fn enqueue(&self, claims: &UploadClaims) {
        let job = Job {
            image_id: claims.image_id,
            storage_key: claims.storage_key.clone(),
            content_type: claims.content_type.clone(),
            owner: claims.sub.clone(),
            accepted_at: OffsetDateTime::now_utc(),
        };
        follow_service::failpoint("gateway-before-enqueue");
        if let Err(e) = self
            .producer
            .clone()
            .enqueue(&job, self.spent_for(claims))
            .await
        {
            // The original is durable: the API's reconciler queues its job once Valkey is back.
            tracing::warn!(error = %e, "the job could not be queued; the reconciler will");
        }
    }

    /// Streams the body into a spool file through its [`BodyCheck`], keeping the guard and
    /// the body's pace: a body too slow, cut off or no longer holding the guard spends nothing.
    async fn receive(
        &self,
        image_id: Uuid,
        holder: &str,
        expected: ImageFormat,
        limit: u64,
        body: Body,
    ) -> Result<Received, Refused> {
        let config = &self.config.receive;
        let internal = |e: std::io::Error| {
            tracing::error!(error = %e, "spooling failed");
            Refused::Transfer(UploadError::Internal)
        };
        let file = self.spool.file().map_err(internal)?;
        let mut out = tokio::fs::File::from_std(file.reopen().map_err(internal)?);
        let max_pixels = self.config.pipeline.max_pixels;
        let mut check = BodyCheck::new(expected, limit, max_pixels);
        let mut stream = body.into_data_stream();
        let (started, deadline) = (Instant::now(), Instant::now() + config.body_timeout);
        let mut renewed = Instant::now();
        loop {
            let wait = config
                .body_idle_timeout
                .min(deadline.saturating_duration_since(Instant::now()));
            let chunk = match tokio::time::timeout(wait, stream.next()).await {
                Err(_) => return Err(Refused::Transfer(UploadError::TooSlow)),
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::info!(error = %e, bytes = check.bytes(), "the body was cut off");
                    return Err(Refused::Transfer(UploadError::Incomplete));
                }
                Ok(Some(Ok(chunk))) => chunk,
            };
            check.feed(&chunk).map_err(Refused::Body)?;
            tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                .await
                .map_err(internal)?;
            follow_service::failpoint("gateway-receiving");
            if renewed.elapsed() > self.lease() / 3 {
                renewed = Instant::now();
                match self
                    .guard
                    .clone()
                    .renew(image_id, holder, self.lease())
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return Err(Refused::Transfer(UploadError::Duplicate)),
                    // Valkey away: the lease is long enough to outlast a short outage.
                    Err(e) => tracing::warn!(error = %e, "the upload guard could not be renewed"),
                }
            }
            let elapsed = started.elapsed();
            if elapsed > RATE_GRACE
                && (check.bytes() as f64) < config.min_upload_rate as f64 * elapsed.as_secs_f64()
            {
                return Err(Refused::Transfer(UploadError::TooSlow));
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut out)
            .await
            .map_err(internal)?;
        drop(out);
        if !check.ended().map_err(Refused::Body)? {
            // The header did not fit in the prefix kept in memory: read it from the file.
            let header = {
                let file = file.reopen().map_err(internal)?;
                tokio::task::spawn_blocking(move || sniff::check_header_of(&file, max_pixels))
                    .await
                    .map_err(|_| Refused::Transfer(UploadError::Internal))?
            };
            check::whole_header(header).map_err(Refused::Body)?;
        }
        let (sha256, bytes) = check.finish().map_err(Refused::Body)?;
        Ok(Received {
            file,
            sha256,
            bytes,
        })
    }

    /// A bad body spent the token: the image fails, its `failed` result recorded in S3 first
    /// and then published, and its status says why; the client gets `error`. Unless the image
    /// has its upload (another upload of this token, after the guard was lost, stored its
    /// original): that one wins, and the client gets `409` with nothing changed. Storage that
    /// does not answer cannot have taken another upload's original either: the result is then
    /// published without its record (with S3 and Valkey both down the image is left to expire).
    async fn fail(
        &self,
        claims: &UploadClaims,
        error: UploadError,
        started: Instant,
    ) -> UploadError {
        let failure = Failure {
            code: match error.code() {
                crate::error::RefusalCode::Pipeline(code) => code,
                crate::error::RefusalCode::Unavailable
                | crate::error::RefusalCode::RateLimited
                | crate::error::RefusalCode::BadRequest
                | crate::error::RefusalCode::UploadNotFound
                | crate::error::RefusalCode::UploadExpired
                | crate::error::RefusalCode::OffsetMismatch
                | crate::error::RefusalCode::UploadLocked => follow_bus::ErrorCode::Internal,
            },
            message: error.to_string(),
        };
        tracing::info!(code = %failure.code, message = %failure.message, "upload refused: bad body");
        self.spend_guard(claims).await;
        let result = ImageResult {
            image_id: claims.image_id,
            outcome: ResultOutcome::Failed(failure.clone()),
            produced_at: OffsetDateTime::now_utc(),
            processing_ms: started.elapsed().as_millis() as u64,
        };
        // An upload that stored its original first wins: checked before the record is written,
        // and again after (an upload storing its original meanwhile checks for this record).
        let original = original_key(&claims.storage_key);
        if self.bucket.exists(&original).await.unwrap_or(false) {
            return UploadError::Duplicate;
        }
        match objects::write_record(&self.bucket, &claims.storage_key, &result).await {
            Ok(()) => {}
            Err(S3Error::Exists) => return UploadError::Duplicate,
            Err(e) => tracing::warn!(error = %e, "the failed result could not be recorded"),
        }
        if self.bucket.exists(&original).await.unwrap_or(false) {
            self.remove(&record_key(&claims.storage_key)).await;
            return UploadError::Duplicate;
        }
        self.metrics.failed(failure.code);
        let reporter = Reporter::start(&self.progress, &self.metrics, claims.image_id);
        reporter.failed(failure);
        if let Err(e) = self.producer.clone().publish(&result).await {
            tracing::warn!(error = %e, "the failed result could not be published; the reconciler will apply its record");
        }
        reporter.finish().await;
        error
    }

    /// Deletes an object this upload wrote and must not leave.
    async fn remove(&self, key: &str) {
        if let Err(e) = self.bucket.delete(key).await {
            tracing::warn!(error = %e, key, "an object of a refused upload could not be removed");
        }
    }
}

/// The request's media type, lower-case, parameters dropped.
fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}
