//! An object stored by one `PUT` whose body is sent while it still arrives from a client: the
//! bytes go on to S3 as they come, so that when the client's last byte is in, S3 has nearly all
//! of them. The caller holds back the last byte until it has decided to keep the object; an
//! object whose body never completes is never stored (S3 stores a `PUT` whole or not at all).
//!
//! What S3 stored is checked against what was sent by the MD5 S3 computes of a single `PUT`'s
//! bytes (its ETag). Not a trailing SHA-256: the SDK signs a trailer over plain HTTP, and Garage
//! checks trailer signatures with the payload's scope, refusing every such request.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use aws_sdk_s3::{
    config::{StalledStreamProtectionConfig, retry::RetryConfig, timeout::TimeoutConfig},
    primitives::ByteStream,
};
use axum::body::Bytes;
use http_body::{Frame, SizeHint};
use md5::{Digest as _, Md5};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{Bucket, S3Error, classify};

/// Pieces queued for S3 at most: the rest waits in the client's connection.
const QUEUED: usize = 2;

/// A `PUT` in progress, fed piece by piece; dropped before [`StreamedPut::finish`], the request
/// is cut and nothing is stored.
#[derive(Debug)]
pub struct StreamedPut {
    pieces: mpsc::Sender<Bytes>,
    /// Of the pieces sent.
    md5: Md5,
    /// S3's answer: the object's ETag.
    request: JoinHandle<Result<String, S3Error>>,
    /// How long S3 may take to make room for a piece or to answer.
    patience: Duration,
}

impl Bucket {
    /// Starts storing `length` bytes at `key` unless an object is there already (as
    /// [`Bucket::put_new`]). The request may last `within` (the body's own time limit) plus the
    /// usual attempt timeout; a streamed body is not retried. The SDK's stalled-stream check is
    /// off: it would take a client's pause for a stalled S3; the caller keeps the client's pace,
    /// and each piece and the answer have the attempt timeout.
    pub fn put_new_streamed(
        &self,
        key: &str,
        content_type: &str,
        length: u64,
        within: Duration,
    ) -> StreamedPut {
        self.count("put");
        let (pieces, queued) = mpsc::channel(QUEUED);
        let patience = self.timeouts.attempt;
        let limit = within + patience;
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.timeouts.connect)
            .read_timeout(limit)
            .operation_attempt_timeout(limit)
            .operation_timeout(limit)
            .build();
        let request = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_type(content_type)
            .content_length(i64::try_from(length).unwrap_or(i64::MAX))
            .if_none_match("*")
            .body(ByteStream::from_body_1_x(Feed {
                queued,
                left: length,
            }))
            .customize()
            .disable_payload_signing()
            .config_override(
                aws_sdk_s3::Config::builder()
                    .timeout_config(timeouts)
                    .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
                    .retry_config(RetryConfig::disabled()),
            )
            .send();
        let request = tokio::spawn(async move {
            let stored = request.await.map_err(classify)?;
            Ok(stored.e_tag().unwrap_or_default().to_owned())
        });
        StreamedPut {
            pieces,
            md5: Md5::new(),
            request,
            patience,
        }
    }
}

impl StreamedPut {
    /// Queues `piece`, waiting while S3 catches up (at most the attempt timeout).
    pub async fn send(&mut self, piece: Bytes) -> Result<(), S3Error> {
        self.md5.update(&piece);
        match tokio::time::timeout(self.patience, self.pieces.send(piece)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(S3Error::Unavailable("the streamed PUT ended early".into())),
            Err(_) => Err(S3Error::Unavailable(
                "S3 took no more of a streamed PUT".into(),
            )),
        }
    }

    /// Sends the `last` piece and waits for S3's answer. Stored, but not the bytes sent (an
    /// ETag that is an MD5, of other bytes): [`S3Error::Corrupted`], the object left for the
    /// caller to remove. S3 servers whose ETags are not MD5s (encrypted with a customer's or a
    /// KMS key) are trusted.
    pub async fn finish(mut self, last: Bytes) -> Result<(), S3Error> {
        self.send(last).await?;
        let answered = tokio::time::timeout(self.patience, &mut self.request).await;
        let etag = match answered {
            Ok(Ok(etag)) => etag?,
            Ok(Err(e)) => return Err(S3Error::Unavailable(format!("the PUT task failed: {e}"))),
            Err(_) => {
                return Err(S3Error::Unavailable(
                    "S3 did not answer a streamed PUT".into(),
                ));
            }
        };
        let etag = etag.trim_matches('"').to_ascii_lowercase();
        let sent = hex::encode(std::mem::take(&mut self.md5).finalize());
        let is_md5 = etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit());
        if is_md5 && etag != sent {
            return Err(S3Error::Corrupted(format!(
                "S3 stored bytes with MD5 {etag}, sent {sent}"
            )));
        }
        Ok(())
    }
}

impl Drop for StreamedPut {
    fn drop(&mut self) {
        // Finished, this is a no-op; otherwise the request is cut mid-body.
        self.request.abort();
    }
}

/// The body of a streamed `PUT`: the queued pieces, exactly `left` bytes more. A queue closed
/// before them is an error, so that the request fails instead of ending short.
struct Feed {
    queued: mpsc::Receiver<Bytes>,
    left: u64,
}

/// The pieces of a streamed `PUT` stopped before its length.
#[derive(Debug, thiserror::Error)]
#[error("the body of a streamed PUT stopped {0} bytes short")]
struct Cut(u64);

impl http_body::Body for Feed {
    type Data = Bytes;
    type Error = Cut;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Cut>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        match self.queued.poll_recv(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(piece)) if piece.len() as u64 <= self.left => {
                self.left -= piece.len() as u64;
                Poll::Ready(Some(Ok(Frame::data(piece))))
            }
            Poll::Ready(_) => Poll::Ready(Some(Err(Cut(self.left)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.left == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}
