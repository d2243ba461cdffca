//! What both upload paths share on the way in: the pace a body must keep ([`Pace`]), the bytes
//! spooled since the last part ([`Pending`]), and parts stored in S3 in the background while the
//! body still arrives ([`Parts`]), so that little is left to store after its last byte.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::body::{BodyDataStream, Bytes};
use follow_service::s3::{Bucket, S3Error, StoredPart};
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tempfile::NamedTempFile;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{BodyCheck, Refused};
use crate::{config::ReceiveConfig, error::UploadError, spool::Spool};

/// S3's smallest part but the last.
pub(super) const MIN_PART: u64 = 5 << 20;

/// After this long a body must keep up `FOLLOW_MIN_UPLOAD_RATE` on average.
const RATE_GRACE: Duration = Duration::from_secs(10);

fn internal(e: impl std::fmt::Display) -> UploadError {
    tracing::error!(error = %e, "spooling failed");
    UploadError::Internal
}

/// The pace a body must keep: each piece within the idle timeout, the whole within the body
/// timeout, and past [`RATE_GRACE`] the minimum rate on average.
pub(super) struct Pace {
    started: Instant,
    deadline: Instant,
    idle: Duration,
    min_rate: u64,
}

impl Pace {
    pub(super) fn new(config: &ReceiveConfig) -> Self {
        let started = Instant::now();
        Self {
            started,
            deadline: started + config.body_timeout,
            idle: config.body_idle_timeout,
            min_rate: config.min_upload_rate,
        }
    }

    /// The next piece of `stream` (`None` at its end), `received` bytes having come so far:
    /// [`UploadError::TooSlow`] or [`UploadError::Incomplete`] when the body does not keep up.
    pub(super) async fn next(
        &self,
        stream: &mut BodyDataStream,
        received: u64,
    ) -> Result<Option<Bytes>, UploadError> {
        let elapsed = self.started.elapsed();
        if elapsed > RATE_GRACE && (received as f64) < self.min_rate as f64 * elapsed.as_secs_f64()
        {
            return Err(UploadError::TooSlow);
        }
        let wait = self
            .idle
            .min(self.deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) => Err(UploadError::TooSlow),
            Ok(None) => Ok(None),
            Ok(Some(Err(e))) => {
                tracing::info!(error = %e, received, "the body was cut off");
                Err(UploadError::Incomplete)
            }
            Ok(Some(Ok(piece))) => Ok(Some(piece)),
        }
    }
}

/// Bytes in a spool file with their SHA-256 so far. Each piece is written by the blocking pool
/// as it came (no buffer of its own kept between pieces: a slow upload holds none).
pub(super) struct Pending {
    pub(super) file: NamedTempFile,
    out: Arc<std::fs::File>,
    pub(super) bytes: u64,
    hasher: Sha256,
}

impl Pending {
    pub(super) fn new(spool: &Spool) -> Result<Self, UploadError> {
        let file = spool.file().map_err(internal)?;
        let out = Arc::new(file.reopen().map_err(internal)?);
        Ok(Self {
            file,
            out,
            bytes: 0,
            hasher: Sha256::new(),
        })
    }

    pub(super) async fn write(&mut self, piece: Bytes) -> Result<(), UploadError> {
        self.hasher.update(&piece);
        self.bytes += piece.len() as u64;
        let out = Arc::clone(&self.out);
        tokio::task::spawn_blocking(move || std::io::Write::write_all(&mut &*out, &piece))
            .await
            .map_err(internal)?
            .map_err(internal)
    }

    /// Takes from the front of `rest` what fits in this part (of `part_bytes`) through `check`
    /// into the file: a bad body is refused as soon as its bytes show it.
    pub(super) async fn fill(
        &mut self,
        rest: &mut Bytes,
        part_bytes: u64,
        check: &mut BodyCheck,
    ) -> Result<(), Refused> {
        let room = usize::try_from(part_bytes - self.bytes).unwrap_or(usize::MAX);
        let now = rest.split_to(room.min(rest.len()));
        check.feed(&now).map_err(Refused::Body)?;
        self.write(now).await.map_err(Refused::Transfer)
    }

    /// The SHA-256 of everything written (all of it in the file).
    pub(super) fn sha256(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }
}

/// A multipart upload of an original, its parts stored one after the other by a task of its
/// own while the body still arrives (a part waits for the one before: at most two on disk).
pub(super) struct Parts {
    queue: mpsc::Sender<(Pending, [u8; 32])>,
    task: JoinHandle<Stored>,
}

/// What [`Parts`] stored: the upload (once started) and its parts in order, or why it stopped.
pub(super) struct Stored {
    pub(super) upload: Option<String>,
    pub(super) parts: Vec<StoredPart>,
    pub(super) error: Option<S3Error>,
}

impl Parts {
    pub(super) fn start(bucket: Bucket, key: String, content_type: String) -> Self {
        let (queue, mut parts) = mpsc::channel::<(Pending, [u8; 32])>(1);
        let task = tokio::spawn(async move {
            let mut stored = Stored {
                upload: None,
                parts: Vec::new(),
                error: None,
            };
            while let Some((part, sha256)) = parts.recv().await {
                let upload = match &stored.upload {
                    Some(upload) => upload.clone(),
                    None => match bucket.start_multipart(&key, &content_type).await {
                        Ok(upload) => stored.upload.insert(upload).clone(),
                        Err(e) => {
                            stored.error = Some(e);
                            break;
                        }
                    },
                };
                let number = stored.parts.len() + 1;
                match bucket
                    .upload_part(&key, &upload, number, part.file.path(), &sha256)
                    .await
                {
                    Ok(done) => stored.parts.push(done),
                    Err(e) => {
                        stored.error = Some(e);
                        break;
                    }
                }
            }
            stored
        });
        Self { queue, task }
    }

    /// Queues `part` (waiting while the one before is being stored);
    /// [`UploadError::StorageUnavailable`] once storing failed.
    pub(super) async fn push(&self, part: Pending) -> Result<(), UploadError> {
        let sha256 = part.sha256();
        self.queue
            .send((part, sha256))
            .await
            .map_err(|_| UploadError::StorageUnavailable)
    }

    /// Waits until every queued part is stored (or storing failed).
    pub(super) async fn finish(self) -> Stored {
        drop(self.queue);
        self.task.await.unwrap_or_else(|e| Stored {
            upload: None,
            parts: Vec::new(),
            error: Some(S3Error::Unavailable(format!("the part task failed: {e}"))),
        })
    }
}

impl Stored {
    /// Drops the upload and its parts (after a refusal, or when storing failed).
    pub(super) async fn abort(&self, bucket: &Bucket, key: &str) {
        if let Some(upload) = &self.upload
            && let Err(e) = bucket.abort_multipart(key, upload).await
        {
            tracing::warn!(error = %e, "the parts of a refused upload could not be removed");
        }
    }
}
