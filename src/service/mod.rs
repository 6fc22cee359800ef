//! Use cases of the service over the store, cache, auth and broker abstractions.

pub mod documents;
pub mod inband;
pub mod ingest;
pub mod lookup;
pub mod twins;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::ValidationError;
use crate::store::StoreError;

/// Body of a version conflict: what the client expected and what is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct VersionMismatch {
    pub error: &'static str,
    pub twin_id: String,
    pub document_name: String,
    pub expected_version: i64,
    /// Absent when the document does not exist.
    pub actual_version: Option<i64>,
}

/// Why a use case failed. The HTTP layer maps each kind to exactly one status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The input was refused; the message is shown to the client.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// No such entity for this caller (missing or owned by someone else).
    #[error("entity not found")]
    NotFound,
    /// A version-checked write found another version stored.
    #[error("document version mismatch")]
    VersionMismatch(Box<VersionMismatch>),
    /// The entity would exceed its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// A dependency cannot be reached; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data: logged, never shown to clients.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        Self::from(&e)
    }
}

impl From<&StoreError> for ServiceError {
    fn from(e: &StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m.clone()),
            StoreError::Conflict(m) | StoreError::Internal(m) => Self::Internal(m.clone()),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    /// The message safe to show to a client: causes of internal and availability
    /// errors are logged, never shown.
    pub fn public_message(&self) -> String {
        match self {
            Self::Unavailable(_) => "service temporarily unavailable".into(),
            Self::Internal(_) => "internal server error".into(),
            other => other.to_string(),
        }
    }

    /// The JSON error body of this error (`{"error": ...}`, with the versions for a
    /// version mismatch), as served over HTTP and over the broker.
    pub fn public_body(&self) -> Value {
        match self {
            Self::VersionMismatch(m) => serde_json::to_value(m.as_ref())
                .unwrap_or_else(|_| serde_json::json!({ "error": m.error })),
            other => serde_json::json!({ "error": other.public_message() }),
        }
    }
}
