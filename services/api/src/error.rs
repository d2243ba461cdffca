//! The API's one error type and its one mapping to `tonic::Status`.
//!
//! Client-facing messages say what the caller can act on; database, bus and storage details are
//! logged here and never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// A field of the request and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    pub field: String,
    pub description: String,
}

impl FieldViolation {
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid user token: {0}")]
    Unauthenticated(String),
    /// Unknown, or another user's: the two are indistinguishable on purpose.
    #[error("{0} not found")]
    NotFound(&'static str),
    #[error("invalid request")]
    InvalidArgument(Vec<FieldViolation>),
    /// The operation does not apply in the resource's state; `subjects` says which parts block it.
    #[error("{message}")]
    FailedPrecondition {
        message: String,
        subjects: Vec<(String, String)>,
    },
    /// The caller was issued as many upload tokens as it may for now (across every instance).
    #[error("too many upload tokens issued to you; retry in {} s", .0.as_secs().max(1))]
    RateLimited(std::time::Duration),
    /// The caller has as many streams open as it may.
    #[error("{0}")]
    TooManyStreams(String),
    /// Valkey cannot be written (or the circuit breaker is open): nothing was changed.
    #[error("the event bus is unavailable")]
    BusUnavailable(#[source] Option<follow_bus::BusError>),
    #[error("database error")]
    Database(#[from] sqlx::Error),
    #[error("bus error")]
    Bus(#[from] follow_bus::BusError),
    #[error("could not sign an upload token")]
    Token(#[source] follow_token::TokenError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC code, also the `code` label of the error metric.
    pub fn code(&self) -> Code {
        match self {
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::NotFound(_) => Code::NotFound,
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::RateLimited(_) | Self::TooManyStreams(_) => Code::ResourceExhausted,
            Self::BusUnavailable(_) => Code::Unavailable,
            Self::Database(e) if is_transient(e) => Code::Unavailable,
            Self::Bus(e) if e.is_unavailable() => Code::Unavailable,
            Self::Database(_) | Self::Bus(_) | Self::Token(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

/// Failures that pass: the database is down, overloaded or shutting down (connection classes
/// 08 and 57P), or it broke a tie between transactions (40001, 40P01) — not our statement
/// being wrong. Worth retrying; the reason for `UNAVAILABLE`.
pub fn is_transient(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    ) || matches!(e, sqlx::Error::Database(db) if db.code().is_some_and(|c| {
        c.starts_with("57P") || c.starts_with("08") || c == "40001" || c == "40P01"
    }))
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let code = e.code();
        let said = e.to_string();
        match e {
            ApiError::Unauthenticated(reason) => Status::unauthenticated(reason),
            ApiError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ApiError::InvalidArgument(violations) => {
                let message = violations
                    .iter()
                    .map(|v| format!("{}: {}", v.field, v.description))
                    .collect::<Vec<_>>()
                    .join("; ");
                let mut details = ErrorDetails::new();
                for v in violations {
                    details.add_bad_request_violation(v.field, v.description);
                }
                Status::with_error_details(code, message, details)
            }
            ApiError::FailedPrecondition { message, subjects } => {
                let mut details = ErrorDetails::new();
                for (subject, description) in subjects {
                    details.add_precondition_failure_violation("STATE", subject, description);
                }
                Status::with_error_details(code, message, details)
            }
            ApiError::RateLimited(wait) => {
                let mut status = Status::with_error_details(
                    code,
                    said,
                    ErrorDetails::with_retry_info(Some(wait)),
                );
                // Also as a header, for clients that read no details (grpc-web, curl).
                if let Ok(secs) = wait.as_secs().max(1).to_string().parse() {
                    status.metadata_mut().insert("retry-after", secs);
                }
                status
            }
            ApiError::TooManyStreams(_) => Status::resource_exhausted(said),
            ApiError::BusUnavailable(source) => {
                if let Some(source) = source {
                    tracing::warn!(error = %source, "event bus unavailable");
                }
                Status::unavailable("the event bus is unavailable; retry later")
            }
            ApiError::Database(e) => {
                tracing::error!(error = %e, "database error");
                if code == Code::Unavailable {
                    Status::unavailable("the database is unavailable; retry later")
                } else {
                    Status::internal("internal error")
                }
            }
            ApiError::Bus(e) => {
                tracing::error!(error = %e, "bus error");
                if code == Code::Unavailable {
                    Status::unavailable("the event bus is unavailable; retry later")
                } else {
                    Status::internal("internal error")
                }
            }
            ApiError::Token(e) => {
                tracing::error!(error = %e, "signing an upload token failed");
                Status::internal("internal error")
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error")
            }
        }
    }
}
