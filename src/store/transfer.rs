//! Bulk reads and idempotent bulk writes for moving a deployment's data from one store
//! to another (`twins migrate`). Everything else a copy needs (a twin's states page by
//! page, its documents) goes through the ordinary repositories.

use async_trait::async_trait;

use super::StoreResult;
use crate::domain::state::State;
use crate::domain::twin::Twin;

/// The ingestion log of a store: each group's position, each twin's last applied stream
/// sequence.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestLog {
    pub groups: Vec<(String, u64)>,
    pub cursors: Vec<(String, u64)>,
}

/// How many rows a store holds of each kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub twins: u64,
    pub states: u64,
    pub documents: u64,
    /// Kept document revisions, each document's current version included.
    pub revisions: u64,
    pub groups: u64,
    pub cursors: u64,
}

#[async_trait]
pub trait Transfer: Send + Sync {
    /// Up to `limit` twins of every owner in id order, after `after` (from the first when
    /// None).
    async fn twins_after(&self, after: Option<&str>, limit: usize) -> StoreResult<Vec<Twin>>;
    /// Inserts states, leaving any (twin, id) that exists already as it is.
    async fn put_states(&self, states: &[State]) -> StoreResult<()>;
    async fn ingest_log(&self) -> StoreResult<IngestLog>;
    /// Sets the groups' positions (with no lease held) and the twins' sequences.
    async fn put_ingest_log(&self, log: &IngestLog) -> StoreResult<()>;
    async fn counts(&self) -> StoreResult<Counts>;
}
