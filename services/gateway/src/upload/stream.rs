//! A body of a declared length sent on to S3 as it arrives, in one `PUT` of its original: after
//! the client's last byte only what S3 has not yet taken is left. Its last byte is held back
//! until the commit ([`super::commit`]) has checked the whole body and the guard, so a refused
//! body never completes its `PUT` and leaves nothing in S3. Meanwhile the image is checked to
//! have no upload yet ([`Gateway::unused`]), as before any other body.

use std::{pin::pin, time::Instant};

use crate::sniff::Format;
use axum::body::{Body, Bytes};
use bytes::BytesMut;
use follow_bus::Stage;
use follow_service::{objects::original_key, s3::StreamedPut};
use follow_token::UploadClaims;
use futures_util::future::{self, Either};

use super::{Arrived, BodyCheck, Gateway, Pace, Received, Refused};
use crate::{error::UploadError, report::Reporter};

impl Gateway {
    /// Receives `length` bytes through their [`BodyCheck`] into the original's `PUT`, its last
    /// piece held back.
    pub(super) async fn receive_streamed(
        &self,
        claims: &UploadClaims,
        holder: &str,
        expected: Format,
        length: u64,
        body: Body,
        reporter: &Reporter,
    ) -> Result<Received, Refused> {
        let max_pixels = self.config.pipeline.max_pixels;
        let mut check = BodyCheck::new(expected, length, max_pixels);
        let mut put = self.bucket.put_new_streamed(
            &original_key(&claims.storage_key),
            &claims.content_type,
            length,
            self.config.receive.body_timeout,
        );
        let unused = async {
            self.unused(&claims.storage_key).await?;
            reporter.stage(Stage::WaitingUpload);
            Ok(())
        };
        let streamed = self.stream_into(claims, holder, body, &mut check, &mut put);
        // An image that has its upload answers so whatever the body: a bad one must not fail it.
        let last = match future::select(pin!(unused), pin!(streamed)).await {
            Either::Left((unused, streamed)) => {
                unused?;
                streamed.await?
            }
            Either::Right((streamed, unused)) => {
                unused.await?;
                streamed?
            }
        };
        let (sha256, bytes) = self.whole_checks(check, None).await?;
        Ok(Received {
            arrived: Arrived::Streamed(put, last),
            sha256,
            bytes,
        })
    }

    /// The body's pieces, checked, into `put` as they come, all but the body's last byte so far,
    /// which is returned at the end instead (the `PUT` cannot complete without it). That byte is
    /// copied, so that no piece keeps the connection's read buffer alive.
    async fn stream_into(
        &self,
        claims: &UploadClaims,
        holder: &str,
        body: Body,
        check: &mut BodyCheck,
        put: &mut StreamedPut,
    ) -> Result<Bytes, Refused> {
        let mut stream = body.into_data_stream();
        let pace = Pace::new(&self.config.receive);
        let mut renewed = Instant::now();
        let mut held: Option<u8> = None;
        while let Some(piece) = pace
            .next(&mut stream, check.bytes())
            .await
            .map_err(Refused::Transfer)?
        {
            check.feed(&piece).map_err(Refused::Body)?;
            let mut batch = BytesMut::with_capacity(piece.len() + 1);
            batch.extend_from_slice(held.as_slice());
            batch.extend_from_slice(&piece);
            held = batch.last().copied();
            batch.truncate(batch.len().saturating_sub(1));
            if !batch.is_empty() {
                put.send(batch.freeze()).await.map_err(|e| {
                    tracing::warn!(error = %e, "upload refused: storage took no more of the body");
                    Refused::Transfer(UploadError::StorageUnavailable)
                })?;
            }
            follow_service::failpoint("gateway-receiving");
            self.keep_guard(claims.image_id, holder, &mut renewed)
                .await?;
        }
        Ok(held.map_or_else(Bytes::new, |last| Bytes::copy_from_slice(&[last])))
    }
}
