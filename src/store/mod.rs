//! Persistence of twins and states behind backend-neutral traits.
//!
//! Every twin query made on behalf of a client takes the owner, so a foreign twin is
//! indistinguishable from a missing one at this level already. Backends: `sqlite`
//! (embedded default) and `mongo` (the Go service's database); PostgreSQL will implement
//! the same traits. `tests/store_conformance.rs` runs one suite against each.

pub mod mongo;
pub mod sqlite;
pub mod traced;

use std::sync::Arc;

use async_trait::async_trait;

use crate::domain::document::{Document, DocumentSummary};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::twin::{Metadata, Twin};
use crate::domain::{Page, PageRequest};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached or is overloaded; the client may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write collided with an existing key.
    #[error("duplicate key: {0}")]
    Conflict(String),
    /// Anything else: a bug or corrupt data, logged and never shown to clients.
    #[error("store failure: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Filters of a twin listing besides the owner.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinFilter {
    /// Exact name.
    pub name: Option<String>,
    /// Every top-level key must be present with an equal value.
    pub metadata: Option<Metadata>,
}

#[async_trait]
pub trait TwinRepository: Send + Sync {
    /// Inserts a new twin.
    async fn save(&self, twin: &Twin) -> StoreResult<()>;
    /// Replaces the twin with the same id and owner if its stored revision is still
    /// `expected_revision`; false when there is no such twin (missing, foreign or
    /// changed meanwhile).
    async fn update(&self, twin: &Twin, expected_revision: i64) -> StoreResult<bool>;
    /// The twin with this id if `owner` owns it.
    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>>;
    /// A page of the owner's twins in creation order, with the number of twins matching.
    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>>;
    /// Deletes the twin with its states (and documents) if `owner` owns it; false
    /// when nothing was deleted.
    async fn remove(&self, owner: &str, id: &str) -> StoreResult<bool>;
    /// Ids of twins whose current definition has an attribute on `channel` with this
    /// subtopic or the wildcard subtopic. Used by ingestion, which acts for every owner.
    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>>;
    /// The twin with this id whoever owns it. Used by ingestion only.
    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>>;
}

#[async_trait]
pub trait StateRepository: Send + Sync {
    /// Inserts a state; its (twin_id, id) must be new.
    async fn save(&self, state: &State) -> StoreResult<()>;
    /// Replaces the state with the same (twin_id, id).
    async fn update(&self, state: &State) -> StoreResult<()>;
    /// The state with the highest id of the twin, found through the (twin_id, id) index.
    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>>;
    /// A page of the twin's states ordered by id ascending.
    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>>;
    /// The twin's latest state with the stream sequence of the last message applied
    /// to it: where ingestion resumes.
    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor>;
    /// Applies the state writes of several twins in one durable step. A twin whose
    /// stored sequence is no longer `expected_seq` (another instance got there first)
    /// is left untouched and its id returned, for the caller to redo from a fresh
    /// cursor.
    async fn apply(&self, batch: &[TwinWrites]) -> StoreResult<Vec<String>>;
}

/// Outcome of a version-checked document write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Versioned {
    /// The write happened.
    Done,
    /// The stored version was not the expected one: this is what it is (None when the
    /// document does not exist).
    Stale { actual: Option<i64> },
}

/// Named, versioned documents of a twin. Each write is one atomic compare-and-set on the
/// version, so concurrent conditional writes never both succeed.
#[async_trait]
pub trait DocumentRepository: Send + Sync {
    /// The twin's documents by name.
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>>;
    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>>;
    /// Stores `doc` if the stored version is `expected` (None: the document must not
    /// exist yet). `doc.version` is the new version.
    async fn write(&self, doc: &Document, expected: Option<i64>) -> StoreResult<Versioned>;
    /// Deletes the document if its version is `expected` (any version when None).
    async fn delete(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<Versioned>;
}

/// Where ingestion stands for one twin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestCursor {
    pub last: Option<State>,
    /// Stream sequence of the last message applied; 0 before the first.
    pub seq: u64,
}

/// State writes of one twin from a run of messages, with the sequence guard.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinWrites {
    pub twin_id: String,
    pub expected_seq: u64,
    pub new_seq: u64,
    /// At most one write per state id, in id order.
    pub writes: Vec<Write>,
}

/// The repositories of one backend, shared by the services.
#[derive(Clone)]
pub struct Store {
    pub twins: Arc<dyn TwinRepository>,
    pub states: Arc<dyn StateRepository>,
    pub documents: Arc<dyn DocumentRepository>,
    health: Arc<dyn HealthCheck>,
}

/// A cheap round trip that tells whether the backend answers.
#[async_trait]
pub trait HealthCheck: Send + Sync {
    async fn ping(&self) -> StoreResult<()>;
}

impl Store {
    /// The store of a backend's repositories; every call made through it runs in a span
    /// (see [`traced`]).
    pub fn new(
        twins: Arc<dyn TwinRepository>,
        states: Arc<dyn StateRepository>,
        documents: Arc<dyn DocumentRepository>,
        health: Arc<dyn HealthCheck>,
    ) -> Self {
        Self {
            twins: Arc::new(traced::Traced(twins)),
            states: Arc::new(traced::Traced(states)),
            documents: Arc::new(traced::Traced(documents)),
            health: Arc::new(traced::Traced(health)),
        }
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.health.ping().await
    }

    /// Opens the backend named by the URL scheme.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let s = Arc::new(sqlite::SqliteStore::open(path).await?);
            return Ok(Self::new(s.clone(), s.clone(), s.clone(), s));
        }
        if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
            let s = Arc::new(mongo::MongoStore::connect(url).await?);
            return Ok(Self::new(s.clone(), s.clone(), s.clone(), s));
        }
        Err(StoreError::Internal(format!(
            "unsupported database URL scheme in {url:?} (expected sqlite:// or mongodb://)"
        )))
    }
}
