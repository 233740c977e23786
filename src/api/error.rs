//! API errors: a status and a one-line message, sent as text/plain. Client mistakes are
//! 4xx; only the node's own failures are 5xx.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::error::Error;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::InvalidCid { .. } | Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::InUse(_) => StatusCode::CONFLICT,
            Error::QuotaExceeded { .. } => StatusCode::INSUFFICIENT_STORAGE,
            Error::Io(_) if e.is_out_of_space() => StatusCode::INSUFFICIENT_STORAGE,
            // Lost blocks beyond what the erasure code can rebuild: the data is unavailable.
            Error::DataDirLocked { .. } | Error::TooManyLosses { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Malformed { .. } => StatusCode::BAD_GATEWAY,
            Error::Corrupt(_) | Error::Db(_) | Error::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("task failed: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::warn!(status = %self.status, "{}", self.message);
        }
        (self.status, format!("{}\n", self.message)).into_response()
    }
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}
