//! Why an upload is refused or an image fails, with its one HTTP mapping. Every refusal is a
//! JSON body `{"error_code": "...", "message": "..."}` with a code of ARCHITECTURE.md.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use follow_bus::ErrorCode;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    InvalidToken(String),
    #[error("the upload token has expired")]
    TokenExpired,
    #[error("this upload token was already used")]
    Duplicate,
    #[error("the body is larger than the {0} bytes allowed")]
    TooLarge(u64),
    #[error("Content-Type must be {expected}, got {got:?}")]
    ContentTypeMismatch { expected: String, got: String },
    #[error("{0}")]
    InvalidImage(String),
    #[error("{0}")]
    ImageTooLarge(String),
    #[error("the client sent the body too slowly")]
    TooSlow,
    #[error("the gateway is busy; retry in a moment")]
    Overloaded,
    #[error("the event bus is unavailable; retry in a moment")]
    BusUnavailable,
    #[error("storing the image failed")]
    Storage,
    #[error("internal error")]
    Internal,
}

impl UploadError {
    /// The contract's error code (in bodies, the status hash and the result stream).
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) => ErrorCode::InvalidImage,
            Self::InvalidToken(_) => ErrorCode::InvalidToken,
            Self::TokenExpired => ErrorCode::TokenExpired,
            Self::Duplicate => ErrorCode::DuplicateUpload,
            Self::TooLarge(_) => ErrorCode::PayloadTooLarge,
            Self::ContentTypeMismatch { .. } => ErrorCode::ContentTypeMismatch,
            Self::InvalidImage(_) => ErrorCode::InvalidImage,
            Self::ImageTooLarge(_) => ErrorCode::ImageTooLarge,
            Self::TooSlow | Self::Overloaded | Self::BusUnavailable | Self::Internal => {
                ErrorCode::Internal
            }
            Self::Storage => ErrorCode::StorageError,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::InvalidToken(_) | Self::TokenExpired => StatusCode::UNAUTHORIZED,
            Self::Duplicate => StatusCode::CONFLICT,
            Self::TooLarge(_) | Self::ImageTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::ContentTypeMismatch { .. } | Self::InvalidImage(_) => {
                StatusCode::UNSUPPORTED_MEDIA_TYPE
            }
            Self::TooSlow => StatusCode::REQUEST_TIMEOUT,
            Self::Overloaded | Self::BusUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Storage | Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for UploadError {
    fn into_response(self) -> Response {
        let status = self.status();
        let body = Json(serde_json::json!({
            "error_code": self.code().as_str(),
            "message": self.to_string(),
        }));
        let mut response = (status, body).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        }
        // The body may be unread: the connection must not be reused for a next request.
        if matches!(
            self,
            Self::TooLarge(_) | Self::ImageTooLarge(_) | Self::TooSlow
        ) {
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
