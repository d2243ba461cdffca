//! `PUT /upload`: verify the token, take the one-time guard, receive the body while checking it
//! (spooled; a large one stored in S3 in parts as it arrives, so that only its last part is left
//! after its last byte), store it as the image's original, queue the job, answer `202`.
//! Resumable uploads ([`resumable`]) share the guard, the checks and the commit ([`commit`]).
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
    time::{Duration, Instant},
};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{RawQuery, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::{Producer, ProgressTracker, Stage, UploadGuard};
use follow_service::{
    auth::bearer_of,
    limits::Tally,
    objects::{original_key, parse_storage_key},
    s3::{Bucket, StreamedPut},
};
use follow_token::{TokenError, UploadClaims, Verifier};
use tokio::sync::Semaphore;
use uuid::Uuid;

use crate::{
    config::Config,
    error::UploadError,
    metrics::{Metrics, UploadStep},
    report::Reporter,
    sniff::{self, Format},
    spool::Spool,
};

mod check;
mod commit;
mod parts;
mod resumable;
mod stream;

use check::BodyCheck;
use commit::Original;
use parts::{Pace, Parts, Pending, Stored};
pub use resumable::{
    Sweeper, delete_upload, head_upload, options_upload, patch_upload, post_upload,
};

/// Beyond the body idle timeout, how long a receiving guard outlives its last renewal.
const RENEW_SLACK: Duration = Duration::from_secs(5);

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

/// A body received in full, checked as far as it can be before decoding.
struct Received {
    arrived: Arrived,
    sha256: [u8; 32],
    bytes: u64,
}

/// Where a received body is before the commit.
enum Arrived {
    /// Whole in its spool file.
    Spooled(Pending),
    /// In the parts stored while it arrived (a large body without a declared length).
    Parts(Stored),
    /// Sent on to its `PUT` as it arrived, all but its last byte ([`stream`]).
    Streamed(StreamedPut, Bytes),
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
        let format = Format::of_content_type(&claims.content_type).ok_or_else(|| {
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
        let started = Instant::now();
        let timer = self.metrics.time(UploadStep::Guard);
        self.take_guard(&claims, &holder, self.lease()).await?;
        drop(timer);
        let outcome = self
            .store(&claims, &holder, format, limit, body, declared)
            .await;
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

    /// From the guard to the `202`: the durable check, the body, the original, the job. A body
    /// of a declared length goes on to S3 as it arrives; one without is spooled (in parts when
    /// large).
    async fn store(
        &self,
        claims: &UploadClaims,
        holder: &str,
        format: Format,
        limit: u64,
        body: Body,
        declared: Option<u64>,
    ) -> Result<Receipt, Refused> {
        let reporter = Reporter::start(&self.progress, &self.metrics, claims.image_id);
        self.metrics.receiving.inc();
        let timer = self.metrics.time(UploadStep::Body);
        let received = match declared {
            Some(length) if length > 0 => {
                Box::pin(self.receive_streamed(claims, holder, format, length, body, &reporter))
                    .await
            }
            _ => match self.unused(&claims.storage_key).await {
                Ok(()) => {
                    reporter.stage(Stage::WaitingUpload);
                    Box::pin(self.receive(claims, holder, format, limit, body)).await
                }
                Err(refused) => Err(refused),
            },
        };
        self.metrics.receiving.dec();
        drop(timer);
        let Received {
            arrived,
            sha256,
            bytes,
        } = match received {
            Ok(received) => received,
            Err(refused) => {
                reporter.finish().await;
                return Err(refused);
            }
        };
        reporter.stage(Stage::Validating);
        let commit = self.commit_arrived(claims, holder, arrived, &sha256);
        // Its stages written before the job's (the worker's must not be overtaken).
        let (committed, ()) = tokio::join!(commit, reporter.finish());
        committed?;
        self.enqueue(claims, &sha256).await;
        Ok(Receipt {
            image_id: claims.image_id,
            sha256: hex::encode(sha256),
            bytes,
            status: "accepted",
        })
    }

    /// The commit point for a body wherever it arrived; parts of one refused there go.
    async fn commit_arrived(
        &self,
        claims: &UploadClaims,
        holder: &str,
        arrived: Arrived,
        sha256: &[u8; 32],
    ) -> Result<(), Refused> {
        let lease = self.lease();
        match arrived {
            Arrived::Spooled(file) => {
                let path = file.file.path();
                let original = Original::File { path, sha256 };
                self.commit(claims, holder, lease, original).await
            }
            Arrived::Parts(stored) => {
                let upload = stored.upload.as_deref().unwrap_or_default();
                let original = Original::Parts {
                    upload,
                    parts: &stored.parts,
                };
                let committed = self.commit(claims, holder, lease, original).await;
                if committed.is_err() {
                    let key = original_key(&claims.storage_key);
                    stored.abort(&self.bucket, &key).await;
                }
                committed
            }
            Arrived::Streamed(put, last) => {
                let original = Original::Streamed { put, last };
                self.commit(claims, holder, lease, original).await
            }
        }
    }

    /// Streams the body through its [`BodyCheck`] into spool files, storing each full part in
    /// S3 while the rest arrives, keeping the guard and the body's pace: a body too slow, cut off
    /// or no longer holding the guard spends nothing.
    async fn receive(
        &self,
        claims: &UploadClaims,
        holder: &str,
        expected: Format,
        limit: u64,
        body: Body,
    ) -> Result<Received, Refused> {
        let max_pixels = self.config.pipeline.max_pixels;
        let mut check = BodyCheck::new(expected, limit, max_pixels);
        let mut pending = Pending::new(&self.spool).map_err(Refused::Transfer)?;
        let mut parts: Option<Parts> = None;
        let received = self
            .receive_into(claims, holder, body, &mut check, &mut pending, &mut parts)
            .await;
        let stored = match parts {
            Some(parts) => {
                if received.is_ok() && pending.bytes > 0 {
                    let last = std::mem::replace(
                        &mut pending,
                        Pending::new(&self.spool).map_err(Refused::Transfer)?,
                    );
                    parts.push(last).await.ok();
                }
                Some(parts.finish().await)
            }
            None => None,
        };
        let checked = match (received, &stored) {
            (Err(refused), _) => Err(refused),
            (Ok(()), Some(Stored { error: Some(e), .. })) => {
                tracing::warn!(error = %e, "upload refused: a part could not be stored");
                Err(Refused::Transfer(UploadError::StorageUnavailable))
            }
            (Ok(()), Some(_)) => self.whole_checks(check, None).await,
            (Ok(()), None) => self.whole_checks(check, Some(&pending)).await,
        };
        let (sha256, bytes) = match checked {
            Ok(checked) => checked,
            Err(refused) => {
                if let Some(stored) = &stored {
                    stored
                        .abort(&self.bucket, &original_key(&claims.storage_key))
                        .await;
                }
                return Err(refused);
            }
        };
        Ok(Received {
            arrived: match stored {
                Some(stored) => Arrived::Parts(stored),
                None => Arrived::Spooled(pending),
            },
            sha256,
            bytes,
        })
    }

    /// The body's pieces, checked, into `pending`; each full part handed to `parts` (started at
    /// the first).
    async fn receive_into(
        &self,
        claims: &UploadClaims,
        holder: &str,
        body: Body,
        check: &mut BodyCheck,
        pending: &mut Pending,
        parts: &mut Option<Parts>,
    ) -> Result<(), Refused> {
        let part_bytes = self.config.receive.part_bytes;
        let mut stream = body.into_data_stream();
        let pace = Pace::new(&self.config.receive);
        let mut renewed = Instant::now();
        while let Some(piece) = pace
            .next(&mut stream, check.bytes())
            .await
            .map_err(Refused::Transfer)?
        {
            let mut rest = piece;
            while !rest.is_empty() {
                pending.fill(&mut rest, part_bytes, check).await?;
                if pending.bytes == part_bytes {
                    let next = Pending::new(&self.spool).map_err(Refused::Transfer)?;
                    let full = std::mem::replace(pending, next);
                    let parts = parts.get_or_insert_with(|| {
                        Parts::start(
                            self.bucket.clone(),
                            original_key(&claims.storage_key),
                            claims.content_type.clone(),
                        )
                    });
                    parts.push(full).await.map_err(Refused::Transfer)?;
                }
            }
            follow_service::failpoint("gateway-receiving");
            self.keep_guard(claims.image_id, holder, &mut renewed)
                .await?;
        }
        Ok(())
    }

    /// The checks of a whole body: its type if shorter than the magic bytes, its header's
    /// dimensions (read from its spool file when they were past the prefix kept in memory; a body
    /// not spooled whole leaves that to the pipeline, which checks it before decoding), a JPEG's
    /// end; then its SHA-256 and size.
    async fn whole_checks(
        &self,
        mut check: BodyCheck,
        spooled: Option<&Pending>,
    ) -> Result<([u8; 32], u64), Refused> {
        if !check.ended().map_err(Refused::Body)?
            && let Some(spooled) = spooled
        {
            let max_pixels = self.config.pipeline.max_pixels;
            let file = spooled
                .file
                .reopen()
                .map_err(|_| Refused::Transfer(UploadError::Internal))?;
            let header =
                tokio::task::spawn_blocking(move || sniff::check_header_of(&file, max_pixels))
                    .await
                    .map_err(|_| Refused::Transfer(UploadError::Internal))?;
            check::whole_header(header).map_err(Refused::Body)?;
        }
        check.finish().map_err(Refused::Body)
    }

    /// Renews the guard when a third of its lease has passed since `renewed`.
    async fn keep_guard(
        &self,
        image_id: Uuid,
        holder: &str,
        renewed: &mut Instant,
    ) -> Result<(), Refused> {
        if renewed.elapsed() > self.lease() / 3 {
            *renewed = Instant::now();
            self.renew_guard(image_id, holder).await?;
        }
        Ok(())
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
