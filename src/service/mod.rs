//! Use cases of the service over the store, cache, auth and broker abstractions.

pub mod ingest;
pub mod lookup;
pub mod twins;

use crate::domain::ValidationError;
use crate::store::StoreError;

/// Why a use case failed. The HTTP layer maps each kind to exactly one status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The input was refused; the message is shown to the client.
    #[error("{0}")]
    Invalid(#[from] ValidationError),
    /// No such entity for this caller (missing or owned by someone else).
    #[error("entity not found")]
    NotFound,
    /// A dependency cannot be reached; the client may retry.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or corrupt data: logged, never shown to clients.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => Self::Unavailable(m),
            StoreError::Conflict(m) | StoreError::Internal(m) => Self::Internal(m),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;
