//! The gateway's errors, in layers: [`PipelineError`] (what is wrong with an image, from the pure
//! pipeline) and [`UploadError`] (why an upload or a watch is refused), with one exhaustive
//! mapping to HTTP (`{"error_code", "message"}` bodies) and one to `tonic::Status`. Internal
//! details are logged where they happen, never sent.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::ErrorCode;
use follow_service::serve::error_body;
use tonic::Status;

/// Why an image cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    /// The bytes are not a decodable image of the declared type.
    #[error("{0}")]
    InvalidImage(String),
    /// Pixel or dimension limits.
    #[error("{0}")]
    ImageTooLarge(String),
    /// A failure of the pipeline itself (logged where it happened; never the client's fault).
    #[error("internal error")]
    Internal,
}

impl PipelineError {
    /// The contract's error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::InvalidImage(_) => ErrorCode::InvalidImage,
            Self::ImageTooLarge(_) => ErrorCode::ImageTooLarge,
            Self::Internal => ErrorCode::Internal,
        }
    }
}

/// How long a refused client should wait before trying again (`Retry-After`).
const RETRY_AFTER_SECS: &str = "2";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Which token is meant is unclear (two different ones, a repeated parameter): 400.
    #[error("{0}")]
    BadRequest(String),
    /// The request is not one upload of a whole image (`Content-Range`): 400.
    #[error("{0}")]
    Malformed(&'static str),
    #[error("{0}")]
    InvalidToken(String),
    #[error("the upload token has expired")]
    TokenExpired,
    #[error("this upload token was already used")]
    Duplicate,
    /// A resumable upload of this token is open (until it ends, is abandoned or expires).
    #[error(
        "a resumable upload of this token is open: continue it at its URL (HEAD tells where), or DELETE it to start again"
    )]
    ResumableOpen,
    /// Another upload of this token is arriving; if it fails, the token is free again.
    #[error("an upload with this token is in progress; if it fails, retry after {} s", .0.as_secs())]
    InProgress(std::time::Duration),
    #[error("the body is larger than the {0} bytes allowed")]
    TooLarge(u64),
    #[error("Content-Type must be {expected}, got {got:?}")]
    ContentTypeMismatch { expected: String, got: String },
    /// The body is an image of another accepted type than the one declared.
    #[error("the body is {found}, not the declared {declared}")]
    BodyTypeMismatch {
        declared: &'static str,
        found: &'static str,
    },
    /// The bytes are not an acceptable image.
    #[error(transparent)]
    Image(#[from] PipelineError),
    /// The body stopped coming or came too slowly; nothing was spent.
    #[error("the body did not arrive in time; the token was not used, send it again")]
    TooSlow,
    /// The body could not be read (the client went away); nothing was spent.
    #[error("the body was cut off; the token was not used, send it again")]
    Incomplete,
    #[error("the gateway is busy; retry in a moment with the same token")]
    Overloaded,
    /// The caller (`sub`) has as many uploads arriving as it may.
    #[error("you have {0} uploads arriving already; retry when one is done, with the same token")]
    RateLimited(usize),
    #[error("the event bus is unavailable; retry in a moment with the same token")]
    BusUnavailable,
    #[error("storage is unavailable; retry in a moment with the same token")]
    StorageUnavailable,
    /// A resumable upload's request without `Tus-Resumable: 1.0.0`: 412.
    #[error("this server speaks tus 1.0.0 (`Tus-Resumable: 1.0.0`)")]
    TusVersion,
    /// No resumable upload at this URL (never, finished, or abandoned): 404.
    #[error("no such upload")]
    UnknownUpload,
    /// The resumable upload expired; its bytes are gone: 410.
    #[error("the upload expired; start again with a valid token")]
    UploadExpired,
    /// An append at another offset than the upload's: 409.
    #[error("the upload is at offset {0}; append there (HEAD tells the offset)")]
    OffsetMismatch(u64),
    /// Another append to this upload is running: 423.
    #[error("another request is appending to this upload; retry in a moment")]
    Locked,
    /// The caller (`sub`) has as many unfinished resumable uploads as it may.
    #[error("you have {0} unfinished uploads; finish or abandon one, or wait until one expires")]
    TooManyOpen(u32),
    #[error("internal error")]
    Internal,
}

/// The `error_code` of an HTTP refusal: a pipeline code (docs/architecture.md, "Error codes"), or
/// one of the refusals that spend nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalCode {
    Pipeline(ErrorCode),
    /// Retry with the same token (503, or a transfer that did not complete).
    Unavailable,
    /// Retry with the same token once one of the caller's other uploads is done (429).
    RateLimited,
    /// The request itself is malformed (400); nothing was spent.
    BadRequest,
    /// No such resumable upload (404), or no longer (410).
    UploadNotFound,
    UploadExpired,
    /// An append at the wrong offset (409): HEAD, then append there.
    OffsetMismatch,
    /// Another append runs (423): retry.
    UploadLocked,
}

impl RefusalCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pipeline(code) => code.as_str(),
            Self::Unavailable => "UNAVAILABLE",
            Self::RateLimited => "RATE_LIMITED",
            Self::BadRequest => "BAD_REQUEST",
            Self::UploadNotFound => "UPLOAD_NOT_FOUND",
            Self::UploadExpired => "UPLOAD_EXPIRED",
            Self::OffsetMismatch => "OFFSET_MISMATCH",
            Self::UploadLocked => "UPLOAD_LOCKED",
        }
    }
}

impl UploadError {
    /// The contract's error code (in bodies, the status hash and the result stream).
    pub fn code(&self) -> RefusalCode {
        use RefusalCode::{BadRequest, Pipeline, RateLimited, Unavailable};
        match self {
            Self::BadRequest(_) | Self::InvalidToken(_) => Pipeline(ErrorCode::InvalidToken),
            Self::Malformed(_) | Self::TusVersion => BadRequest,
            Self::UnknownUpload => RefusalCode::UploadNotFound,
            Self::UploadExpired => RefusalCode::UploadExpired,
            Self::OffsetMismatch(_) => RefusalCode::OffsetMismatch,
            Self::Locked => RefusalCode::UploadLocked,
            Self::TooManyOpen(_) => RateLimited,
            Self::TokenExpired => Pipeline(ErrorCode::TokenExpired),
            Self::Duplicate | Self::InProgress(_) | Self::ResumableOpen => {
                Pipeline(ErrorCode::DuplicateUpload)
            }
            Self::TooLarge(_) => Pipeline(ErrorCode::PayloadTooLarge),
            Self::ContentTypeMismatch { .. } | Self::BodyTypeMismatch { .. } => {
                Pipeline(ErrorCode::ContentTypeMismatch)
            }
            Self::Image(e) => Pipeline(e.code()),
            Self::Internal => Pipeline(ErrorCode::Internal),
            Self::RateLimited(_) => RateLimited,
            Self::TooSlow
            | Self::Incomplete
            | Self::Overloaded
            | Self::BusUnavailable
            | Self::StorageUnavailable => Unavailable,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) | Self::Malformed(_) | Self::Incomplete => StatusCode::BAD_REQUEST,
            Self::InvalidToken(_) | Self::TokenExpired => StatusCode::UNAUTHORIZED,
            Self::Duplicate | Self::InProgress(_) | Self::ResumableOpen => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Image(PipelineError::ImageTooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ContentTypeMismatch { .. }
            | Self::BodyTypeMismatch { .. }
            | Self::Image(PipelineError::InvalidImage(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited(_) | Self::TooManyOpen(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::TusVersion => StatusCode::PRECONDITION_FAILED,
            Self::UnknownUpload => StatusCode::NOT_FOUND,
            Self::UploadExpired => StatusCode::GONE,
            Self::OffsetMismatch(_) => StatusCode::CONFLICT,
            Self::Locked => StatusCode::LOCKED,
            Self::Overloaded | Self::BusUnavailable | Self::StorageUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Image(PipelineError::Internal) | Self::Internal => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for UploadError {
    fn into_response(self) -> Response {
        let status = self.status();
        let mut response =
            (status, error_body(self.code().as_str(), &self.to_string())).into_response();
        let headers = response.headers_mut();
        if self == Self::TusVersion {
            headers.insert("tus-version", HeaderValue::from_static("1.0.0"));
        }
        if status == StatusCode::SERVICE_UNAVAILABLE
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::LOCKED
        {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        // The body may be unread: the connection must not be reused for a next request.
        if matches!(
            self,
            Self::OffsetMismatch(_)
                | Self::Locked
                | Self::TooLarge(_)
                | Self::Image(_)
                | Self::BodyTypeMismatch { .. }
                | Self::TooSlow
                | Self::Incomplete
        ) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<UploadError> for Status {
    fn from(e: UploadError) -> Self {
        let message = e.to_string();
        match e {
            UploadError::BadRequest(_)
            | UploadError::Malformed(_)
            | UploadError::TusVersion
            | UploadError::OffsetMismatch(_)
            | UploadError::ContentTypeMismatch { .. }
            | UploadError::BodyTypeMismatch { .. }
            | UploadError::TooLarge(_)
            | UploadError::Image(_)
            | UploadError::TooSlow
            | UploadError::Incomplete => Status::invalid_argument(message),
            UploadError::InvalidToken(_) | UploadError::TokenExpired => {
                Status::unauthenticated(message)
            }
            UploadError::Duplicate | UploadError::InProgress(_) | UploadError::ResumableOpen => {
                Status::already_exists(message)
            }
            UploadError::RateLimited(_) | UploadError::TooManyOpen(_) => {
                Status::resource_exhausted(message)
            }
            UploadError::UnknownUpload => Status::not_found(message),
            UploadError::UploadExpired => Status::failed_precondition(message),
            UploadError::Locked => Status::aborted(message),
            UploadError::Overloaded
            | UploadError::BusUnavailable
            | UploadError::StorageUnavailable => Status::unavailable(message),
            UploadError::Internal => Status::internal(message),
        }
    }
}
