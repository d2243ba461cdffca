//! The one-time guard and the commit point, shared by the single `PUT` and resumable uploads:
//! the guard taken, renewed, spent or released; the check that the image has no upload yet; the
//! original stored (from a spool file or completed from its parts) only while the image is still
//! this upload's; the job queued; a bad body's failure recorded and published.

use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use follow_bus::{Failure, GuardOutcome, GuardState, ImageResult, Job, ResultOutcome};
use follow_service::{
    objects::{self, original_key, record_key},
    s3::{S3Error, StreamedPut},
};
use follow_token::UploadClaims;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Gateway, RENEW_SLACK, Refused};
use crate::{error::UploadError, metrics::UploadStep, report::Reporter};

/// Where the bytes of an original are before the commit.
pub(super) enum Original<'a> {
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
    /// In a `PUT` still open, all but its `last` piece sent.
    Streamed { put: StreamedPut, last: Bytes },
}

impl Gateway {
    /// The one-time guard: a short lease while the body arrives (renewed as bytes come), so a
    /// gateway that dies mid-body lets go of it on its own.
    pub(super) async fn take_guard(
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
                    // A resumable upload of this token is open, or another upload is arriving,
                    // or one whose answer was lost (its gateway died, or could not hear from
                    // Valkey): it may fail.
                    Ok(GuardState::Receiving) => {
                        return Err(match self.resumables.load(claims.image_id).await {
                            Ok(Some(_)) => UploadError::ResumableOpen,
                            _ => UploadError::InProgress(self.lease()),
                        });
                    }
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
    pub(super) fn lease(&self) -> Duration {
        self.config.receive.body_idle_timeout + RENEW_SLACK
    }

    /// How long a used token's guard lives: until the token expires, plus the longest a body
    /// may take and the clock leeway (a slow upload started just before expiry is covered).
    pub(super) fn spent_for(&self, claims: &UploadClaims) -> Duration {
        let remaining = claims
            .expires_at()
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        remaining + self.config.receive.body_timeout + self.config.token_leeway
    }

    /// Marks the token used until it expires, so later replays are refused by the guard.
    pub(super) async fn spend_guard(&self, claims: &UploadClaims) {
        if let Err(e) = self
            .guard
            .clone()
            .spend(claims.image_id, self.spent_for(claims))
            .await
        {
            tracing::warn!(error = %e, "the spent token could not be marked");
        }
    }

    pub(super) async fn release_guard(&self, image_id: Uuid, holder: &str) {
        if let Err(e) = self.guard.clone().release(image_id, holder).await {
            // It expires on its own; until then a retry gets 409.
            tracing::warn!(error = %e, "could not release the upload guard");
        }
    }

    /// After Valkey lost its data the guard is no proof: S3 is. An original or a result record
    /// means this token was used.
    pub(super) async fn unused(&self, storage_key: &str) -> Result<(), Refused> {
        let (original, record) = (original_key(storage_key), record_key(storage_key));
        let found = {
            let _timer = self.metrics.time(UploadStep::Checks);
            tokio::try_join!(self.bucket.exists(&original), self.bucket.exists(&record))
        };
        match found {
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
    pub(super) async fn commit(
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
        let timer = self.metrics.time(UploadStep::Store);
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
            Original::Streamed { put, last } => put.finish(last).await,
        };
        drop(timer);
        match stored {
            Ok(()) => {}
            Err(S3Error::Exists) => return Err(Refused::Used),
            Err(e @ S3Error::Corrupted(_)) => {
                tracing::error!(error = %e, "upload refused: the original was stored wrong");
                self.remove(&original).await;
                return Err(Refused::Transfer(UploadError::StorageUnavailable));
            }
            Err(e) => {
                tracing::warn!(error = %e, "upload refused: the original could not be stored");
                return Err(Refused::Transfer(UploadError::StorageUnavailable));
            }
        }
        // Another upload of this token may have been stored, processed and its original
        // removed while this body arrived (or a bad one may have failed the image): its record
        // is the image's outcome, and this original goes.
        let timer = self.metrics.time(UploadStep::RecordCheck);
        let recorded = self.bucket.exists(&record).await;
        drop(timer);
        match recorded {
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

    /// Queues the job of an accepted upload whose bytes have `sha256` (and marks its guard
    /// `queued`).
    pub(super) async fn enqueue(&self, claims: &UploadClaims, sha256: &[u8; 32]) {
        let job = Job {
            image_id: claims.image_id,
            storage_key: claims.storage_key.clone(),
            content_type: claims.content_type.clone(),
            owner: claims.sub.clone(),
            accepted_at: OffsetDateTime::now_utc(),
            sha256: Some(hex::encode(sha256)),
        };
        follow_service::failpoint("gateway-before-enqueue");
        let timer = self.metrics.time(UploadStep::Enqueue);
        let queued = self
            .producer
            .clone()
            .enqueue(&job, self.spent_for(claims))
            .await;
        drop(timer);
        if let Err(e) = queued {
            // The original is durable: the API's reconciler queues its job once Valkey is back.
            tracing::warn!(error = %e, "the job could not be queued; the reconciler will");
        }
    }

    /// The guard still this upload's, renewed (Valkey away: the lease outlasts a short outage).
    pub(super) async fn renew_guard(&self, image_id: Uuid, holder: &str) -> Result<(), Refused> {
        match self
            .guard
            .clone()
            .renew(image_id, holder, self.lease())
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => Err(Refused::Transfer(UploadError::Duplicate)),
            Err(e) => {
                tracing::warn!(error = %e, "the upload guard could not be renewed");
                Ok(())
            }
        }
    }

    /// A bad body spent the token: the image fails, its `failed` result recorded in S3 first
    /// and then published, and its status says why; the client gets `error`. Unless the image
    /// has its upload (another upload of this token, after the guard was lost, stored its
    /// original): that one wins, and the client gets `409` with nothing changed. Storage that
    /// does not answer cannot have taken another upload's original either: the result is then
    /// published without its record (with S3 and Valkey both down the image is left to expire).
    pub(super) async fn fail(
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
    pub(super) async fn remove(&self, key: &str) {
        if let Err(e) = self.bucket.delete(key).await {
            tracing::warn!(error = %e, key, "an object of a refused upload could not be removed");
        }
    }
}
