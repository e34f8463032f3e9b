//! The one place errors become HTTP status codes and JSON bodies
//! (`{"error": "<code>", "message": "<what happened>"}`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::views::ErrorBody;
use crate::node::ClusterError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    BadRequest(String),
    /// The request body could not be read as JSON of the expected shape.
    #[error("{1}")]
    Payload(StatusCode, String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    /// No leader, no majority: retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Another node could not be reached or refused us.
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
            ApiError::Payload(status, _) => (*status, "bad_payload"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "peer_error"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if status.is_server_error() {
            tracing::warn!(%status, error = %self, "API request failed");
        }
        let body = ErrorBody {
            error: code.to_string(),
            message: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

impl From<ClusterError> for ApiError {
    fn from(e: ClusterError) -> Self {
        let message = e.to_string();
        match e {
            ClusterError::NoLeader(_) => ApiError::Unavailable(message),
            ClusterError::Rejected(_) | ClusterError::AlreadyInitialized => {
                ApiError::Conflict(message)
            }
            ClusterError::Invalid(_) => ApiError::BadRequest(message),
            ClusterError::Unreachable(_) | ClusterError::Authentication(_) => {
                ApiError::BadGateway(message)
            }
            ClusterError::Failed(_) => ApiError::Internal(message),
        }
    }
}
