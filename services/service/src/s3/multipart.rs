//! An object stored in parts as its bytes arrive (an S3 multipart upload), and the small objects
//! a part-in-progress is kept in between: what a resumable upload makes durable chunk by chunk.

use std::path::Path;

use aws_sdk_s3::{
    primitives::ByteStream,
    types::{ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart},
};
use axum::body::Bytes;

use super::{Bucket, S3Error, base64_of, classify};

/// One part S3 has stored: what completing the upload names it by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredPart {
    pub etag: String,
    /// Its SHA-256, base64, as S3 checked it.
    pub sha256: String,
}

impl Bucket {
    /// Starts storing `key` in parts (each checked against its SHA-256); the upload's id.
    pub async fn start_multipart(&self, key: &str, content_type: &str) -> Result<String, S3Error> {
        self.count("start_multipart");
        let started = self
            .client
            .create_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .content_type(content_type)
            .checksum_algorithm(ChecksumAlgorithm::Sha256)
            .send()
            .await
            .map_err(classify)?;
        started
            .upload_id()
            .map(str::to_owned)
            .ok_or_else(|| S3Error::Unavailable("no upload id in S3's answer".into()))
    }

    /// Stores the file at `path` as part `number` (from 1) of `upload` (storing a part again
    /// replaces it). S3 checks it against `sha256`, computed as the bytes arrived.
    pub async fn upload_part(
        &self,
        key: &str,
        upload: &str,
        number: usize,
        path: &Path,
        sha256: &[u8; 32],
    ) -> Result<StoredPart, S3Error> {
        self.count("upload_part");
        let number = i32::try_from(number)
            .map_err(|_| S3Error::Unavailable(format!("part number {number}")))?;
        let sha256 = base64_of(sha256);
        let stored = self
            .client
            .upload_part()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload)
            .part_number(number)
            .checksum_sha256(&sha256)
            .body(Self::file_body(path).await?)
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(classify)?;
        let etag = stored
            .e_tag()
            .map(str::to_owned)
            .ok_or_else(|| S3Error::Unavailable("no ETag in S3's answer".into()))?;
        Ok(StoredPart { etag, sha256 })
    }

    /// Makes `key` of `parts`, in order, unless an object is there already (as
    /// [`Bucket::put_new`]).
    pub async fn complete_multipart(
        &self,
        key: &str,
        upload: &str,
        parts: &[StoredPart],
    ) -> Result<(), S3Error> {
        self.count("complete_multipart");
        let parts = parts
            .iter()
            .zip(1..)
            .map(|(part, number)| {
                CompletedPart::builder()
                    .part_number(number)
                    .e_tag(&part.etag)
                    .checksum_sha256(&part.sha256)
                    .build()
            })
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload)
            .if_none_match("*")
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// Drops `upload` and its parts (one already gone is fine).
    pub async fn abort_multipart(&self, key: &str, upload: &str) -> Result<(), S3Error> {
        self.count("abort_multipart");
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.name)
            .key(key)
            .upload_id(upload)
            .send()
            .await
            .map_err(classify)
        {
            Ok(_) | Err(S3Error::NotFound) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Stores the file at `path` at `key`, replacing what is there.
    pub async fn put_file(&self, key: &str, path: &Path) -> Result<(), S3Error> {
        self.count("put");
        self.client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .body(Self::file_body(path).await?)
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// The first `bytes` of the object at `key`, to be read piece by piece (never all in
    /// memory).
    pub async fn read_range(&self, key: &str, bytes: u64) -> Result<Range, S3Error> {
        self.count("get");
        let object = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .range(format!("bytes=0-{}", bytes.saturating_sub(1)))
            .send()
            .await
            .map_err(classify)?;
        Ok(Range {
            key: key.to_owned(),
            body: object.body,
            left: bytes,
        })
    }
}

/// The start of an object being read ([`Bucket::read_range`]).
#[derive(Debug)]
pub struct Range {
    key: String,
    body: ByteStream,
    left: u64,
}

impl Range {
    /// The next piece; `None` once every byte asked for has come (fewer is an error).
    pub async fn next(&mut self) -> Result<Option<Bytes>, S3Error> {
        if self.left == 0 {
            return Ok(None);
        }
        let unavailable = |e: String| S3Error::Unavailable(format!("reading {}: {e}", self.key));
        match self.body.try_next().await {
            Ok(Some(mut piece)) => {
                piece.truncate(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= piece.len() as u64;
                Ok(Some(piece))
            }
            Ok(None) => Err(unavailable(format!("{} bytes missing", self.left))),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }
}
