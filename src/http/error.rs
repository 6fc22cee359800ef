//! The one place where errors become HTTP statuses and JSON error bodies.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::AuthError;
use crate::domain::ValidationError;
use crate::service::ServiceError;

/// Body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: String,
}

/// Everything a request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported content type: expected {0}")]
    UnsupportedMediaType(String),
    #[error("request body is larger than the limit")]
    PayloadTooLarge,
    #[error("no such route")]
    RouteNotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request outlived `MG_TWINS_HTTP_REQUEST_TIMEOUT`.
    #[error("the request did not complete in time; retry later")]
    Timeout,
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::Service(ServiceError::Invalid(e))
    }
}

impl ApiError {
    /// The status for this error and the message safe to show to the client.
    fn status_and_message(&self) -> (StatusCode, String) {
        match self {
            Self::Service(e) => {
                let status = match e {
                    ServiceError::Invalid(_) => StatusCode::BAD_REQUEST,
                    ServiceError::VersionMismatch(_) | ServiceError::Conflict(_) => {
                        StatusCode::CONFLICT
                    }
                    ServiceError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
                    ServiceError::NotFound | ServiceError::Absent(_) => StatusCode::NOT_FOUND,
                    ServiceError::CursorExpired { .. } => StatusCode::GONE,
                    ServiceError::Unavailable(cause) => {
                        tracing::warn!(%cause, "dependency unavailable");
                        StatusCode::SERVICE_UNAVAILABLE
                    }
                    ServiceError::Internal(cause) => {
                        tracing::error!(%cause, "request failed");
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                };
                (status, e.public_message())
            }
            Self::Auth(AuthError::Unauthenticated) => (
                StatusCode::UNAUTHORIZED,
                "missing or invalid bearer token".into(),
            ),
            Self::Auth(e @ AuthError::Unavailable(_)) => {
                tracing::warn!(error = %crate::error::chain(e), "authentication failed");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "authentication service unavailable".into(),
                )
            }
            // Only start-up builds auth clients, so a request never meets this; if one
            // does, it is a bug, not the client's fault.
            Self::Auth(e @ AuthError::Setup { .. }) => {
                tracing::error!(error = %crate::error::chain(e), "authentication failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal server error".into(),
                )
            }
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m.clone()),
            Self::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, self.to_string()),
            Self::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, self.to_string()),
            Self::RouteNotFound => (StatusCode::NOT_FOUND, self.to_string()),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, self.to_string()),
            // 503, not 408: the time ran out on the service's side (a slow store or auth
            // service, or a slow body upload, which the header timeout does not cover),
            // and 503 is what clients already retry.
            Self::Timeout => {
                tracing::warn!("request timed out");
                (StatusCode::SERVICE_UNAVAILABLE, self.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, error) = self.status_and_message();
        if let Self::Service(e) = &self {
            // The same body the broker's inband answers carry.
            return (status, Json(e.public_body())).into_response();
        }
        if status == StatusCode::UNAUTHORIZED {
            // RFC 6750: say which scheme the client should use.
            return (
                status,
                [(axum::http::header::WWW_AUTHENTICATE, BEARER_CHALLENGE)],
                Json(ErrorBody { error }),
            )
                .into_response();
        }
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// The challenge of every 401 answer.
pub const BEARER_CHALLENGE: &str = "Bearer realm=\"twins\"";

pub type ApiResult<T> = Result<T, ApiError>;
