//! Use cases of the service over the ports below it (store, cache, and the ports this
//! layer defines for what the transports provide: notification publishing, dead
//! letters, dependency checks). No transport type appears here.
//!
//! Each use case is a trait ([`twins::Twins`], [`documents::Documents`],
//! [`ingest::Ingest`]) with one plain implementation; what cuts across them is a
//! decorator: [`traced::Traced`] opens each operation's span, [`notify::Notifying`]
//! publishes outcomes, [`metered::Metered`] counts ingestion,
//! [`lookup::CacheMaintaining`] keeps the channel cache exact.

mod contention;
pub mod documents;
pub mod events;
pub mod feed;
pub mod health;
pub mod history;
pub mod inband;
pub mod ingest;
pub mod lookup;
pub mod metered;
pub mod notify;
pub mod outbox;
pub mod retention;
pub mod traced;
pub mod twins;

#[cfg(test)]
pub(crate) mod fakes;
#[cfg(test)]
#[path = "tests/mod.rs"]
mod use_case_tests;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::ValidationError;
use crate::error::Cause;
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
    /// The entity exists but not what was asked of it (a revision pruned, or a time
    /// before it existed): a 404 whose reason is shown to the client.
    #[error("{0}")]
    Absent(&'static str),
    /// A change feed cursor whose next events have left the stream; `oldest` is the
    /// oldest cursor still resumable.
    #[error("cursor expired")]
    CursorExpired { oldest: u64 },
    /// A version-checked write found another version stored.
    #[error("document version mismatch")]
    VersionMismatch(Box<VersionMismatch>),
    /// The entity would exceed its size limit.
    #[error("{0}")]
    TooLarge(String),
    /// A write collided with an existing key (a twin id already taken).
    #[error("{0}")]
    Conflict(#[source] Cause),
    /// A dependency cannot be reached; the client may retry.
    #[error("{0}")]
    Unavailable(#[source] Cause),
    /// A bug or corrupt data: logged, never shown to clients.
    #[error("{0}")]
    Internal(#[source] Cause),
}

impl From<StoreError> for ServiceError {
    /// The store's error becomes the source, so the chain down to the driver survives.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => Self::Unavailable(Box::new(e)),
            StoreError::Conflict(_) => Self::Conflict(Box::new(e)),
            StoreError::Internal(_) => Self::Internal(Box::new(e)),
        }
    }
}

pub type ServiceResult<T> = Result<T, ServiceError>;

impl ServiceError {
    /// Whether the same call may succeed later (a dependency was away), as opposed to a
    /// refusal that will not change.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }

    /// The message safe to show to a client: causes of internal and availability
    /// errors are logged, never shown.
    pub fn public_message(&self) -> String {
        match self {
            Self::Conflict(_) => "conflict with the stored state; retry".into(),
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
            Self::CursorExpired { oldest } => {
                serde_json::json!({ "error": self.public_message(), "oldest": oldest })
            }
            other => serde_json::json!({ "error": other.public_message() }),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    fn io(text: &str) -> Cause {
        Box::new(std::io::Error::other(text.to_owned()))
    }

    #[test]
    fn store_errors_keep_their_cause_down_to_the_driver() {
        let e = ServiceError::from(StoreError::Unavailable(io("connection refused")));
        let store = e.source().expect("the store error is the source");
        assert!(store.to_string().contains("store unavailable"));
        let driver = store.source().expect("the driver error is kept");
        assert_eq!(driver.to_string(), "connection refused");
    }

    #[test]
    fn each_store_error_kind_maps_to_one_service_kind() {
        let kinds = [
            (
                StoreError::Unavailable(io("secret-cause")),
                true,
                "service temporarily unavailable",
            ),
            (
                StoreError::Conflict(io("secret-cause")),
                false,
                "conflict with the stored state; retry",
            ),
            (
                StoreError::Internal(io("secret-cause")),
                false,
                "internal server error",
            ),
        ];
        for (store, transient, public) in kinds {
            let e = ServiceError::from(store);
            assert_eq!(e.is_transient(), transient, "{e:?}");
            assert_eq!(e.public_message(), public);
            assert!(
                !e.public_body().to_string().contains('x'),
                "no cause in {e:?}"
            );
        }
    }
}
