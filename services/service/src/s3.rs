//! The one S3 client set-up and the bucket operations follow uses: path-style addressing, static
//! credentials from config, the SDK's own timeouts (connect, per attempt, per operation) and
//! standard retries (bounded attempts with backoff). Nothing here waits forever on a storage
//! server that stopped answering; every failure is a typed [`S3Error`].

use std::{path::Path, time::Duration};

use aws_sdk_s3::{
    Client,
    config::{
        BehaviorVersion, Credentials, Region, RequestChecksumCalculation, http::HttpResponse,
        retry::RetryConfig, timeout::TimeoutConfig,
    },
    error::{ProvideErrorMetadata, SdkError},
    presigning::PresigningConfig,
    primitives::ByteStream,
};
use secrecy::ExposeSecret as _;

use crate::{
    config::S3Config,
    metrics::{Counter, EncodeLabelSet, Family, Registry},
};

mod multipart;
mod streamed;
pub use multipart::{Range, StoredPart};
pub use streamed::StreamedPut;

/// Bytes per read when a file is sent to S3.
const FILE_READ_BLOCK: usize = 256 << 10;

/// Why a bucket operation did not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum S3Error {
    /// A create-if-absent found the object there.
    #[error("the object already exists")]
    Exists,
    #[error("no such object")]
    NotFound,
    /// The object is larger than the caller accepts.
    #[error("the object is larger than {0} bytes")]
    TooLarge(u64),
    /// Storage stored other bytes than those sent: the object must go.
    #[error("storage stored other bytes: {0}")]
    Corrupted(String),
    /// Storage did not answer, answered an error, or timed out: worth retrying later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
}

/// The bucket of images.
#[derive(Debug, Clone)]
pub struct Bucket {
    client: Client,
    /// Signs download URLs for the address clients reach S3 at (the same client when that is
    /// the service's own).
    presigner: Client,
    name: String,
    /// Requests made, by operation (an SDK retry counts once).
    requests: Family<OpLabel, Counter>,
    timeouts: Timeouts,
}

/// The configured timeouts, for requests that set their own.
#[derive(Debug, Clone, Copy)]
struct Timeouts {
    connect: Duration,
    attempt: Duration,
}

/// An S3 operation, for [`Bucket::register`].
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

impl Bucket {
    pub fn new(config: &S3Config) -> Self {
        let client = Self::client(config, &config.endpoint);
        let presigner = if config.public_endpoint == config.endpoint {
            client.clone()
        } else {
            Self::client(config, &config.public_endpoint)
        };
        Self {
            client,
            presigner,
            name: config.bucket.clone(),
            requests: Family::default(),
            timeouts: Timeouts {
                connect: config.connect_timeout,
                attempt: config.attempt_timeout,
            },
        }
    }

    /// Registers the count of requests made, by operation (`…_s3_requests_total{op}`): what
    /// each photo costs in S3 calls.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "s3_requests",
            "S3 requests made, by operation (an SDK retry counts once)",
            self.requests.clone(),
        );
    }

    fn count(&self, op: &'static str) {
        self.requests.get_or_create(&OpLabel { op }).inc();
    }

    fn client(config: &S3Config, endpoint: &str) -> Client {
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .read_timeout(config.attempt_timeout)
            .operation_attempt_timeout(config.attempt_timeout)
            .operation_timeout(config.operation_timeout)
            .build();
        let s3 = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new(config.region.clone()))
            .credentials_provider(Credentials::new(
                &config.access_key_id,
                config.secret_access_key.expose_secret(),
                None,
                None,
                "follow-config",
            ))
            .force_path_style(true)
            // Checksums only where S3 requires them: a streamed body (a spooled original) would
            // otherwise go as aws-chunked with a trailer, which not every S3 server takes.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .timeout_config(timeouts)
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts))
            .build();
        Client::from_conf(s3)
    }

    /// Stores `bytes` at `key` unless an object is there already ([`S3Error::Exists`]): every
    /// object of an image is written once, so a second writer loses instead of overwriting.
    /// `If-None-Match: *` where the server supports conditional writes (MinIO, AWS); on a server
    /// that ignores it (Garage) the caller's check before the write is what protects.
    pub async fn put_new(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), S3Error> {
        self.count("put");
        self.client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_type(content_type)
            .if_none_match("*")
            .body(ByteStream::from(bytes))
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// Stores the file at `path` at `key` unless an object is there already, as
    /// [`Bucket::put_new`]. `sha256` is the one computed while the
    /// body arrived: the server checks what it receives against it (`x-amz-checksum-sha256`),
    /// so a spool file that changed on disk is refused, not stored; the payload is not signed
    /// again (that hash would be of what was read back, proving less).
    pub async fn put_new_file(
        &self,
        key: &str,
        path: &Path,
        content_type: &str,
        sha256: &[u8; 32],
    ) -> Result<(), S3Error> {
        self.count("put");
        let body = Self::file_body(path).await?;
        self.client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .content_type(content_type)
            .checksum_sha256(base64_of(sha256))
            .if_none_match("*")
            .body(body)
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// The file at `path` as a request body, read in large blocks: each read of a file is a trip
    /// to tokio's blocking pool (at the default 4 KiB, 5,000 trips for a 20 MB original).
    async fn file_body(path: &Path) -> Result<ByteStream, S3Error> {
        ByteStream::read_from()
            .path(path)
            .buffer_size(FILE_READ_BLOCK)
            .build()
            .await
            .map_err(|e| S3Error::Unavailable(format!("reading {}: {e}", path.display())))
    }

    /// The object at `key`, refused past `max_bytes`.
    pub async fn get(&self, key: &str, max_bytes: u64) -> Result<Vec<u8>, S3Error> {
        self.count("get");
        let object = self
            .client
            .get_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(classify)?;
        let length = object.content_length().and_then(|n| u64::try_from(n).ok());
        if length.is_some_and(|n| n > max_bytes) {
            return Err(S3Error::TooLarge(max_bytes));
        }
        let bytes = object
            .body
            .collect()
            .await
            .map_err(|e| S3Error::Unavailable(format!("reading {key}: {e}")))?
            .into_bytes();
        if bytes.len() as u64 > max_bytes {
            return Err(S3Error::TooLarge(max_bytes));
        }
        Ok(bytes.to_vec())
    }

    /// Whether an object is at `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, S3Error> {
        self.count("head");
        match self
            .client
            .head_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map_err(classify)
        {
            Ok(_) => Ok(true),
            Err(S3Error::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Deletes `key` (nothing there is fine).
    pub async fn delete(&self, key: &str) -> Result<(), S3Error> {
        self.count("delete");
        self.client
            .delete_object()
            .bucket(&self.name)
            .key(key)
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// Whether the bucket answers (for `/health`).
    pub async fn healthy(&self) -> bool {
        self.client
            .head_bucket()
            .bucket(&self.name)
            .send()
            .await
            .is_ok()
    }

    /// A URL that GETs `key` for `ttl`, at `FOLLOW_S3_PUBLIC_ENDPOINT`. Signing is local: no
    /// network.
    pub async fn presigned_get(&self, key: &str, ttl: Duration) -> Option<String> {
        let presigning = PresigningConfig::expires_in(ttl).ok()?;
        match self
            .presigner
            .get_object()
            .bucket(&self.name)
            .key(key)
            .presigned(presigning)
            .await
        {
            Ok(request) => Some(request.uri().to_owned()),
            Err(e) => {
                tracing::error!(error = %describe(e), key, "presigning failed");
                None
            }
        }
    }
}

/// A SHA-256 as S3's checksum headers carry it.
pub fn base64_of(sha256: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(sha256)
}

/// An SDK error as one line with its causes, for logs (never for clients).
fn describe<E: std::error::Error>(error: E) -> String {
    aws_sdk_s3::error::DisplayErrorContext(error).to_string()
}

fn classify<E>(error: SdkError<E, HttpResponse>) -> S3Error
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(service) = &error {
        let status = service.raw().status().as_u16();
        match (service.err().code(), Some(status)) {
            (Some("PreconditionFailed"), _) | (_, Some(412)) => return S3Error::Exists,
            (Some("NoSuchKey" | "NotFound"), _) | (_, Some(404)) => return S3Error::NotFound,
            _ => {}
        }
    }
    S3Error::Unavailable(describe(error))
}
