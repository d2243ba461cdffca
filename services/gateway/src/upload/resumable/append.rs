//! One append to a resumable upload, under its lock: the bytes after the last stored part (the
//! tail, read back from S3) and the body go through the upload's [`BodyCheck`] into a spool
//! file; each time it holds a part (`FOLLOW_UPLOAD_PART_BYTES`) the part is stored and the
//! record saved. When the body ends, what is left is stored too (as a part if S3 takes one that
//! small, else as a new tail object) before the offset is saved and answered: an acknowledged
//! offset is durable. The last byte commits the upload as a single `PUT` does (the original
//! complete in S3, then the job).
//!
//! A body cut off or too slow keeps what arrived (the client resumes from there); a bad body
//! fails the image as a bad `PUT` does, and the upload's parts go.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::body::Body;
use follow_bus::{Part as RecordedPart, Resumable, Stage};
use follow_service::{
    objects::{original_key, partial_key},
    s3::StoredPart,
};
use uuid::Uuid;

use super::{Gateway, claims_of, guard_holder};
use crate::{
    error::UploadError,
    report::Reporter,
    sniff::Format,
    upload::{
        BodyCheck, Original, Refused,
        parts::{MIN_PART, Pace, Pending},
    },
};

fn internal(e: impl std::fmt::Display) -> UploadError {
    tracing::error!(error = %e, "spooling failed");
    UploadError::Internal
}

/// What an append did: where the upload is now, and when it expires (if unfinished).
pub(in crate::upload) struct Appended {
    pub offset: u64,
    pub expires: Option<i64>,
}

impl Gateway {
    /// Appends `body` to `record`, whose lock `holder` holds, then lets the lock go.
    pub(super) async fn append_locked(
        self: &Arc<Self>,
        record: Resumable,
        holder: &str,
        body: Body,
    ) -> Result<Appended, UploadError> {
        let image_id = record.image_id;
        let appended = self.append(record, holder, body).await;
        if let Err(e) = self.resumables.unlock(image_id, holder).await {
            tracing::warn!(error = %e, "an upload's lock could not be released; it expires");
        }
        appended
    }

    async fn append(
        &self,
        mut record: Resumable,
        holder: &str,
        body: Body,
    ) -> Result<Appended, UploadError> {
        let _mine = self.uploads_per_user.take(&record.owner).ok_or_else(|| {
            tracing::warn!("append refused: the user's share of receiving is in use");
            UploadError::RateLimited(self.uploads_per_user.max())
        })?;
        let _receiving = Arc::clone(&self.receiving)
            .try_acquire_owned()
            .map_err(|_| UploadError::Overloaded)?;
        let format = Format::of_content_type(&record.content_type).ok_or(UploadError::Internal)?;
        let max_pixels = self.config.pipeline.max_pixels;
        let mut check = BodyCheck::resume(&record.check, format, record.length, max_pixels)
            .ok_or_else(|| internal("an upload record's checks do not read back"))?;
        let mut pending = self.pending_of(&record).await?;
        let reporter = Reporter::start(&self.progress, &self.metrics, record.image_id);
        reporter.stage(Stage::WaitingUpload);
        self.metrics.receiving.inc();
        let started = Instant::now();
        let received = self
            .receive_parts(&mut record, holder, &mut check, &mut pending, body)
            .await;
        self.metrics.receiving.dec();
        let complete = check.bytes() == record.length;
        if complete && received.is_ok() {
            reporter.stage(Stage::Validating);
        }
        reporter.finish().await;
        match received {
            Err(Refused::Body(e)) => return Err(self.refuse_body(&record, e, started).await),
            Err(Refused::Used) => return Err(UploadError::Duplicate),
            Err(Refused::Transfer(UploadError::Locked)) => return Err(UploadError::Locked),
            // What arrived is kept: the client resumes from there.
            Err(Refused::Transfer(e)) => {
                self.keep(&mut record, holder, &check, &mut pending).await?;
                return Err(e);
            }
            Ok(()) => {}
        }
        if !complete {
            self.keep(&mut record, holder, &check, &mut pending).await?;
            return Ok(Appended {
                offset: record.offset,
                expires: Some(record.expires),
            });
        }
        self.complete(record, check, pending, started).await
    }

    /// The spool of an append: the upload's tail, read back from S3.
    async fn pending_of(&self, record: &Resumable) -> Result<Pending, UploadError> {
        let mut pending = Pending::new(&self.spool)?;
        if let Some(tail) = record.tail_key.as_deref().filter(|_| record.tail > 0) {
            let unavailable = |e: follow_service::s3::S3Error| {
                tracing::warn!(error = %e, "an upload's tail could not be read");
                UploadError::StorageUnavailable
            };
            let mut range = self
                .bucket
                .read_range(tail, record.tail)
                .await
                .map_err(unavailable)?;
            while let Some(piece) = range.next().await.map_err(unavailable)? {
                pending.write(piece).await?;
            }
        }
        Ok(pending)
    }

    /// Streams `body` through `check` into `pending`, storing a part each time it holds one.
    async fn receive_parts(
        &self,
        record: &mut Resumable,
        holder: &str,
        check: &mut BodyCheck,
        pending: &mut Pending,
        body: Body,
    ) -> Result<(), Refused> {
        let part_bytes = self.config.receive.part_bytes;
        let mut stream = body.into_data_stream();
        let pace = Pace::new(&self.config.receive);
        let (first, mut renewed) = (check.bytes(), Instant::now());
        while let Some(piece) = pace
            .next(&mut stream, check.bytes() - first)
            .await
            .map_err(Refused::Transfer)?
        {
            if check.bytes() + piece.len() as u64 > record.length {
                return Err(Refused::Transfer(UploadError::BadRequest(
                    "more bytes than `Upload-Length`".into(),
                )));
            }
            let mut rest = piece;
            while !rest.is_empty() {
                pending.fill(&mut rest, part_bytes, check).await?;
                if pending.bytes == part_bytes && check.bytes() < record.length {
                    self.store_part(record, holder, check, pending)
                        .await
                        .map_err(Refused::Transfer)?;
                    renewed = Instant::now();
                }
            }
            if renewed.elapsed() > self.lease() / 3 {
                renewed = Instant::now();
                match self
                    .resumables
                    .renew(record.image_id, holder, self.lease())
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => return Err(Refused::Transfer(UploadError::Locked)),
                    Err(e) => tracing::warn!(error = %e, "an upload's lock could not be renewed"),
                }
            }
        }
        Ok(())
    }

    /// Stores `pending` as the upload's next part and saves the record at its end.
    async fn store_part(
        &self,
        record: &mut Resumable,
        holder: &str,
        check: &BodyCheck,
        pending: &mut Pending,
    ) -> Result<(), UploadError> {
        let stored = self.upload_part(record, pending).await?;
        record.parts.push(RecordedPart {
            etag: stored.etag,
            bytes: pending.bytes,
            sha256: stored.sha256,
        });
        self.save_with_tail(record, holder, check, None).await?;
        *pending = Pending::new(&self.spool)?;
        Ok(())
    }

    /// Stores `pending` as part `parts + 1` of the upload's multipart upload (started if need be).
    async fn upload_part(
        &self,
        record: &mut Resumable,
        pending: &mut Pending,
    ) -> Result<StoredPart, UploadError> {
        let sha256 = pending.sha256();
        let original = original_key(&record.storage_key);
        let unavailable = |e: follow_service::s3::S3Error| {
            tracing::warn!(error = %e, "a part could not be stored");
            UploadError::StorageUnavailable
        };
        let upload = match &record.multipart {
            Some(upload) => upload.clone(),
            None => {
                let upload = self
                    .bucket
                    .start_multipart(&original, &record.content_type)
                    .await
                    .map_err(unavailable)?;
                record.multipart = Some(upload.clone());
                upload
            }
        };
        let number = record.parts.len() + 1;
        self.bucket
            .upload_part(&original, &upload, number, pending.file.path(), &sha256)
            .await
            .map_err(unavailable)
    }

    /// Makes what arrived durable and saves the record at the new offset: a part if S3 takes
    /// one that small, else a new tail object (the old one removed once the record names it).
    async fn keep(
        &self,
        record: &mut Resumable,
        holder: &str,
        check: &BodyCheck,
        pending: &mut Pending,
    ) -> Result<(), UploadError> {
        if check.bytes() == record.offset {
            return Ok(());
        }
        if pending.bytes >= MIN_PART {
            return self.store_part(record, holder, check, pending).await;
        }
        let tail = partial_key(
            &record.storage_key,
            &format!("{}-{}", check.bytes(), Uuid::new_v4().simple()),
        );
        if let Err(e) = self.bucket.put_file(&tail, pending.file.path()).await {
            tracing::warn!(error = %e, "an upload's tail could not be stored");
            return Err(UploadError::StorageUnavailable);
        }
        self.save_with_tail(record, holder, check, Some((tail, pending.bytes)))
            .await
    }

    /// Saves the record with its new tail (`None`: the parts hold every byte), then removes the
    /// old tail; if the record could not be saved, the new tail goes instead.
    async fn save_with_tail(
        &self,
        record: &mut Resumable,
        holder: &str,
        check: &BodyCheck,
        tail: Option<(String, u64)>,
    ) -> Result<(), UploadError> {
        let (new_key, bytes) = tail.unzip();
        let old = std::mem::replace(&mut record.tail_key, new_key.clone());
        record.tail = bytes.unwrap_or(0);
        let (keep, drop) = match self.save(record, holder, check).await {
            Ok(()) => (Ok(()), old),
            Err(e) => (Err(e), new_key),
        };
        if let Some(key) = drop {
            self.remove(&key).await;
        }
        keep
    }

    /// Saves the record at `check`'s offset (and a later expiry, the guard's life with it),
    /// if this append still holds the upload's lock.
    async fn save(
        &self,
        record: &mut Resumable,
        holder: &str,
        check: &BodyCheck,
    ) -> Result<(), UploadError> {
        record.offset = check.bytes();
        record.check = check.save();
        record.expires = self.resumable_expiry(record.token_expires);
        match self.resumables.save(record, holder).await {
            Ok(true) => {}
            Ok(false) => return Err(UploadError::Locked),
            Err(e) => return Err(super::bus_unavailable(&e)),
        }
        let lease = Self::until(record.expires);
        let guard = guard_holder(&record.nonce);
        if let Err(e) = self
            .guard
            .clone()
            .renew(record.image_id, &guard, lease)
            .await
        {
            tracing::warn!(error = %e, "an upload's guard could not be renewed");
        }
        Ok(())
    }

    /// The last byte arrived: the last checks, the original complete in S3, the job queued.
    /// Nothing of this append is saved before: if the commit fails, the client sends its last
    /// bytes again.
    async fn complete(
        &self,
        record: Resumable,
        check: BodyCheck,
        mut pending: Pending,
        started: Instant,
    ) -> Result<Appended, UploadError> {
        let claims = claims_of(&record);
        let mut check = check;
        // A header that did not fit in the checked prefix is left to the pipeline, which
        // checks it before decoding anyway.
        if let Err(e) = check.ended() {
            return Err(self.refuse_body(&record, e, started).await);
        }
        let (sha256, bytes) = match check.finish() {
            Ok(done) => done,
            Err(e) => return Err(self.refuse_body(&record, e, started).await),
        };
        let mut record = record;
        let last = match record.multipart {
            Some(_) => Some(self.upload_part(&mut record, &mut pending).await?),
            None => None,
        };
        let mut parts: Vec<StoredPart> = record
            .parts
            .iter()
            .map(|p| StoredPart {
                etag: p.etag.clone(),
                sha256: p.sha256.clone(),
            })
            .collect();
        parts.extend(last);
        let original = match &record.multipart {
            Some(upload) => Original::Parts {
                upload,
                parts: &parts,
            },
            None => Original::File {
                path: pending.file.path(),
                sha256: &sha256,
            },
        };
        let guard = guard_holder(&record.nonce);
        match self
            .commit(&claims, &guard, Self::until(record.expires), original)
            .await
        {
            Ok(()) => {}
            Err(Refused::Used) => {
                self.spend_guard(&claims).await;
                self.abandon(&record).await.ok();
                return Err(UploadError::Duplicate);
            }
            Err(Refused::Transfer(e) | Refused::Body(e)) => return Err(e),
        }
        self.enqueue(&claims, &sha256).await;
        let kept = self.spent_for(&claims);
        if let Err(e) = self.forget(&record, Some(kept)).await {
            tracing::warn!(error = %e, "a finished upload's record stays until it expires");
        }
        tracing::info!(
            bytes,
            sha256 = %hex::encode(sha256),
            parts = parts.len(),
            "resumable upload accepted"
        );
        Ok(Appended {
            offset: bytes,
            expires: None,
        })
    }

    /// A bad body spent the token: the image fails as a bad `PUT`'s does, and the upload's
    /// parts go.
    async fn refuse_body(
        &self,
        record: &Resumable,
        error: UploadError,
        started: Instant,
    ) -> UploadError {
        let error = self.fail(&claims_of(record), error, started).await;
        if let Err(e) = self.abandon(record).await {
            tracing::warn!(error = %e, "a refused upload's parts stay for the sweeper");
        }
        error
    }

    /// Forgets an upload that ended: its tail, its place among its owner's, its record (or,
    /// when it completed, all of it but that it did, `kept` as long).
    pub(super) async fn forget(
        &self,
        record: &Resumable,
        completed: Option<Duration>,
    ) -> Result<(), follow_bus::BusError> {
        if let Some(tail) = &record.tail_key {
            self.remove(tail).await;
        }
        self.resumables
            .close(&record.owner, record.image_id)
            .await?;
        match completed {
            None => self.resumables.remove(record.image_id).await,
            Some(kept) => {
                let done = Resumable {
                    offset: record.length,
                    multipart: None,
                    parts: Vec::new(),
                    tail: 0,
                    tail_key: None,
                    check: String::new(),
                    completed: true,
                    ..record.clone()
                };
                self.resumables.finish(&done, kept).await
            }
        }
    }
}
