//! The domain types that travel over the bus, free of protobuf `Option`s and wire strings.

use std::{fmt, str::FromStr};

use crate::{MetadataKind, OutputFile};
use follow_proto::events::v1 as pb;
use time::OffsetDateTime;
use uuid::Uuid;

/// A pipeline stage (docs/architecture.md, "Stages"). Ordered: a later stage compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    Queued,
    WaitingUpload,
    Validating,
    Decoding,
    Processing,
    Encoding,
    UploadingToStorage,
    Done,
    Failed,
}

impl Stage {
    pub const ALL: [Stage; 9] = [
        Stage::Queued,
        Stage::WaitingUpload,
        Stage::Validating,
        Stage::Decoding,
        Stage::Processing,
        Stage::Encoding,
        Stage::UploadingToStorage,
        Stage::Done,
        Stage::Failed,
    ];

    /// The name on the bus (`waiting_upload`).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::WaitingUpload => "waiting_upload",
            Stage::Validating => "validating",
            Stage::Decoding => "decoding",
            Stage::Processing => "processing",
            Stage::Encoding => "encoding",
            Stage::UploadingToStorage => "uploading_to_storage",
            Stage::Done => "done",
            Stage::Failed => "failed",
        }
    }

    /// The stage's `seq`: 1 for `queued` up to [`Stage::LAST_SEQ`] for `failed`, so it grows
    /// with every stage an image goes through, whichever process reports it.
    pub const fn seq(self) -> u64 {
        self as u64 + 1
    }

    /// The highest seq of any stage.
    pub const LAST_SEQ: u64 = Stage::Failed.seq();

    pub fn is_final(self) -> bool {
        matches!(self, Stage::Done | Stage::Failed)
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL.into_iter().find(|st| st.as_str() == s).ok_or(())
    }
}

impl From<Stage> for pb::Stage {
    fn from(s: Stage) -> Self {
        match s {
            Stage::Queued => pb::Stage::Queued,
            Stage::WaitingUpload => pb::Stage::WaitingUpload,
            Stage::Validating => pb::Stage::Validating,
            Stage::Decoding => pb::Stage::Decoding,
            Stage::Processing => pb::Stage::Processing,
            Stage::Encoding => pb::Stage::Encoding,
            Stage::UploadingToStorage => pb::Stage::UploadingToStorage,
            Stage::Done => pb::Stage::Done,
            Stage::Failed => pb::Stage::Failed,
        }
    }
}

impl TryFrom<pb::Stage> for Stage {
    type Error = ();

    fn try_from(s: pb::Stage) -> Result<Self, Self::Error> {
        Ok(match s {
            pb::Stage::Unspecified => return Err(()),
            pb::Stage::Queued => Stage::Queued,
            pb::Stage::WaitingUpload => Stage::WaitingUpload,
            pb::Stage::Validating => Stage::Validating,
            pb::Stage::Decoding => Stage::Decoding,
            pb::Stage::Processing => Stage::Processing,
            pb::Stage::Encoding => Stage::Encoding,
            pb::Stage::UploadingToStorage => Stage::UploadingToStorage,
            pb::Stage::Done => Stage::Done,
            pb::Stage::Failed => Stage::Failed,
        })
    }
}

/// The image types follow accepts, as content types: a waypoint declares one, the gateway
/// checks the bytes are of it.
pub const CONTENT_TYPES: [&str; 5] = [
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/heic",
    "image/heif",
];

/// Why an upload or the pipeline failed (docs/architecture.md, "Error codes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    InvalidToken,
    TokenExpired,
    DuplicateUpload,
    PayloadTooLarge,
    ContentTypeMismatch,
    InvalidImage,
    ImageTooLarge,
    StorageError,
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidToken,
        ErrorCode::TokenExpired,
        ErrorCode::DuplicateUpload,
        ErrorCode::PayloadTooLarge,
        ErrorCode::ContentTypeMismatch,
        ErrorCode::InvalidImage,
        ErrorCode::ImageTooLarge,
        ErrorCode::StorageError,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidToken => "INVALID_TOKEN",
            ErrorCode::TokenExpired => "TOKEN_EXPIRED",
            ErrorCode::DuplicateUpload => "DUPLICATE_UPLOAD",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::ContentTypeMismatch => "CONTENT_TYPE_MISMATCH",
            ErrorCode::InvalidImage => "INVALID_IMAGE",
            ErrorCode::ImageTooLarge => "IMAGE_TOO_LARGE",
            ErrorCode::StorageError => "STORAGE_ERROR",
            ErrorCode::Internal => "INTERNAL",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ErrorCode::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

impl From<ErrorCode> for pb::ErrorCode {
    fn from(c: ErrorCode) -> Self {
        match c {
            ErrorCode::InvalidToken => pb::ErrorCode::InvalidToken,
            ErrorCode::TokenExpired => pb::ErrorCode::TokenExpired,
            ErrorCode::DuplicateUpload => pb::ErrorCode::DuplicateUpload,
            ErrorCode::PayloadTooLarge => pb::ErrorCode::PayloadTooLarge,
            ErrorCode::ContentTypeMismatch => pb::ErrorCode::ContentTypeMismatch,
            ErrorCode::InvalidImage => pb::ErrorCode::InvalidImage,
            ErrorCode::ImageTooLarge => pb::ErrorCode::ImageTooLarge,
            ErrorCode::StorageError => pb::ErrorCode::StorageError,
            ErrorCode::Internal => pb::ErrorCode::Internal,
        }
    }
}

impl TryFrom<pb::ErrorCode> for ErrorCode {
    type Error = ();

    fn try_from(c: pb::ErrorCode) -> Result<Self, Self::Error> {
        Ok(match c {
            pb::ErrorCode::Unspecified => return Err(()),
            pb::ErrorCode::InvalidToken => ErrorCode::InvalidToken,
            pb::ErrorCode::TokenExpired => ErrorCode::TokenExpired,
            pb::ErrorCode::DuplicateUpload => ErrorCode::DuplicateUpload,
            pb::ErrorCode::PayloadTooLarge => ErrorCode::PayloadTooLarge,
            pb::ErrorCode::ContentTypeMismatch => ErrorCode::ContentTypeMismatch,
            pb::ErrorCode::InvalidImage => ErrorCode::InvalidImage,
            pb::ErrorCode::ImageTooLarge => ErrorCode::ImageTooLarge,
            pb::ErrorCode::StorageError => ErrorCode::StorageError,
            pb::ErrorCode::Internal => ErrorCode::Internal,
        })
    }
}

/// What processing produced, for a `processed` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Processed {
    pub storage_key: String,
    pub preview_key: String,
    /// Hex SHA-256 of the uploaded bytes.
    pub sha256: String,
    /// Content type of the stored processed image.
    pub content_type: String,
    pub width: u32,
    pub height: u32,
    pub processed_width: u32,
    pub processed_height: u32,
    pub byte_size: u64,
    /// A ThumbHash of the preview; empty when the result predates placeholders.
    pub thumbhash: Vec<u8>,
    /// Every stored file; empty when the result predates the list.
    pub files: Vec<OutputFile>,
    /// What the original carried and lost, in [`MetadataKind`] order, each once.
    pub stripped_metadata: Vec<MetadataKind>,
}

/// Why processing failed, for a `failed` result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultOutcome {
    Processed(Processed),
    Failed(Failure),
}

/// One entry of `image:result`: the outcome of one image's pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageResult {
    pub image_id: Uuid,
    pub outcome: ResultOutcome,
    /// UTC; carried with second-and-nanosecond precision as RFC 3339.
    pub produced_at: OffsetDateTime,
    pub processing_ms: u64,
}

/// One entry of `image:jobs`: an accepted upload whose original is stored in S3 at
/// `{storage_key}.original`, waiting for a gateway to process it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub image_id: Uuid,
    pub storage_key: String,
    /// The content type the upload was accepted as (the token's).
    pub content_type: String,
    /// The route owner (the token's `sub`).
    pub owner: String,
    pub accepted_at: OffsetDateTime,
    /// The SHA-256 of the original (hex), taken as it arrived; absent when queued again by the
    /// reconciler (the worker then takes it from the original).
    pub sha256: Option<String>,
}

/// One stage change of one image: what the status hash holds and what its progress channel
/// carries. The stage, its `seq` and the failure always agree: they are one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    image_id: Uuid,
    reached: Reached,
    at: OffsetDateTime,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Reached {
    /// Any stage but [`Stage::Failed`].
    Stage(Stage),
    Failed(Failure),
}

impl Progress {
    /// Progress to `stage`, now. A failure should come through [`Progress::failed`] with its
    /// reason; `Stage::Failed` here records an `INTERNAL` one, so a failure always has a code.
    pub fn reached(image_id: Uuid, stage: Stage) -> Self {
        if stage == Stage::Failed {
            return Self::failed(
                image_id,
                Failure {
                    code: ErrorCode::Internal,
                    message: "failed without a reason".into(),
                },
            );
        }
        Self {
            image_id,
            reached: Reached::Stage(stage),
            at: OffsetDateTime::now_utc(),
        }
    }

    pub fn failed(image_id: Uuid, failure: Failure) -> Self {
        Self {
            image_id,
            reached: Reached::Failed(failure),
            at: OffsetDateTime::now_utc(),
        }
    }

    /// The same progress, stamped `at` (as read back from the bus).
    pub(crate) fn at_time(self, at: OffsetDateTime) -> Self {
        Self { at, ..self }
    }

    pub fn image_id(&self) -> Uuid {
        self.image_id
    }

    pub fn stage(&self) -> Stage {
        match self.reached {
            Reached::Stage(stage) => stage,
            Reached::Failed(_) => Stage::Failed,
        }
    }

    /// The stage's seq: grows with every stage an image goes through.
    pub fn seq(&self) -> u64 {
        self.stage().seq()
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.reached {
            Reached::Failed(failure) => Some(failure),
            Reached::Stage(_) => None,
        }
    }

    pub fn at(&self) -> OffsetDateTime {
        self.at
    }
}

/// The API's announcement that an image's outcome is committed to the database: the image as
/// committed (the API's own view of it, `follow.api.v1.Image`, without a preview URL) and
/// whether that commit made its route READY. Watchers need not read the database back.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    pub image_id: Uuid,
    pub image: follow_proto::api::v1::Image,
    pub route_ready: bool,
}

/// What travels on an `image:progress:{id}` channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A stage change (gateway; the API's `queued`).
    Progress(Progress),
    /// The outcome is in the database (API only).
    Committed(Box<Committed>),
}

impl From<Progress> for Notice {
    fn from(progress: Progress) -> Self {
        Notice::Progress(progress)
    }
}

impl Notice {
    pub fn image_id(&self) -> Uuid {
        match self {
            Notice::Progress(p) => p.image_id,
            Notice::Committed(c) => c.image_id,
        }
    }
}
