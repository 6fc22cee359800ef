//! Pure types and rules of the service: no I/O lives here.

pub mod document;
pub mod feed;
pub mod history;
pub mod json;
pub mod sampling;
pub mod senml;
pub mod state;
pub mod time;
pub mod twin;

use serde::Serialize;

/// Why a client's input was refused; always shown to the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValidationError(String);

impl ValidationError {
    pub fn new(msg: impl Into<String>) -> Self {
        Self(msg.into())
    }
}

/// Largest page size a client may ask for.
pub const MAX_LIMIT: u64 = 100;
/// Page size when a client gives none.
pub const DEFAULT_LIMIT: u64 = 10;

/// Where a page starts and how long it is, already validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRequest {
    pub offset: u64,
    pub limit: u64,
}

impl Default for PageRequest {
    fn default() -> Self {
        Self {
            offset: 0,
            limit: DEFAULT_LIMIT,
        }
    }
}

impl PageRequest {
    pub fn new(offset: u64, limit: u64) -> Result<Self, ValidationError> {
        if limit == 0 || limit > MAX_LIMIT {
            return Err(ValidationError::new(format!(
                "limit must be between 1 and {MAX_LIMIT}"
            )));
        }
        if offset > i64::MAX as u64 {
            return Err(ValidationError::new("offset is too large"));
        }
        Ok(Self { offset, limit })
    }
}

/// One page of a listing with the total number of items that match.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub items: Vec<T>,
}
