//! Finds the twins a message is for, without a store read per message, and keeps the
//! channel/subtopic cache exact as twins change.
//!
//! (channel, subtopic) -> twin ids comes from the cache (Redis, shared by instances),
//! falling back to the store on a miss or when the cache is down. Twins themselves are
//! kept in memory: this instance drops an entry when it updates or deletes the twin,
//! and entries expire after [`TWIN_TTL`] so changes made by other instances are seen.
//!
//! [`CacheMaintaining`] is the decorator of the twins repository that keeps both the
//! cache and that memory in step with every write, so the use cases never mention them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::cache::TwinCache;
use crate::domain::twin::{Twin, TwinFilter};
use crate::domain::{Page, PageRequest};
use crate::store::{StoreResult, TwinRepository};

/// How long a twin read from the store is trusted without re-reading it.
pub const TWIN_TTL: Duration = Duration::from_secs(5);
/// Entries beyond which the in-memory twins are dropped wholesale (bounded memory).
const MAX_TWINS: usize = 100_000;

/// The ingestion-side view of twins.
#[derive(Clone)]
pub struct TwinLookup {
    twins: Arc<dyn TwinRepository>,
    cache: Arc<dyn TwinCache>,
    memory: Arc<Mutex<TwinMap>>,
}

/// Twin id -> the twin and when it was read from the store.
type TwinMap = HashMap<String, (Arc<Twin>, Instant)>;

impl TwinLookup {
    /// A lookup reading `twins` (undecorated: reads only) through `cache`.
    pub fn new(twins: Arc<dyn TwinRepository>, cache: Arc<dyn TwinCache>) -> Self {
        Self {
            twins,
            cache,
            memory: Arc::default(),
        }
    }

    /// Ids of twins listening on (channel, subtopic), through the cache when it answers.
    pub async fn ids(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        match self.cache.ids(channel, subtopic).await {
            Ok(ids) if !ids.is_empty() => Ok(ids),
            Ok(_) => {
                let ids = self.twins.ids_by_attribute(channel, subtopic).await?;
                if !ids.is_empty()
                    && let Err(e) = self.cache.save_ids(channel, subtopic, &ids).await
                {
                    tracing::warn!(error = %e, "cache not refilled after a miss");
                }
                Ok(ids)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cache down: looking twins up in the store");
                self.twins.ids_by_attribute(channel, subtopic).await
            }
        }
    }

    /// The twin, from memory when fresh; None when it no longer exists, in which case
    /// the cache entries that named it are dropped too.
    pub async fn twin(&self, id: &str) -> StoreResult<Option<Arc<Twin>>> {
        if let Some((twin, at)) = self.lock().get(id)
            && at.elapsed() < TWIN_TTL
        {
            return Ok(Some(twin.clone()));
        }
        let twin = self.twins.retrieve_any(id).await?.map(Arc::new);
        match &twin {
            Some(t) => {
                let mut map = self.lock();
                if map.len() >= MAX_TWINS {
                    map.clear();
                }
                map.insert(id.to_owned(), (t.clone(), Instant::now()));
            }
            None => {
                self.invalidate(id);
                if let Err(e) = self.cache.remove(id).await {
                    tracing::debug!(error = %e, "stale cache entry not removed");
                }
            }
        }
        Ok(twin)
    }

    /// Forgets the in-memory copy after this instance changed or deleted the twin.
    pub fn invalidate(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TwinMap> {
        self.memory.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The twins repository decorated with cache maintenance: after every successful write,
/// the twin's (channel, subtopic) keys are updated and the lookup's memory of it is
/// dropped. A cache failure never fails the write (the lookup falls back to the store).
pub struct CacheMaintaining {
    inner: Arc<dyn TwinRepository>,
    lookup: TwinLookup,
}

impl CacheMaintaining {
    pub fn new(inner: Arc<dyn TwinRepository>, lookup: TwinLookup) -> Self {
        Self { inner, lookup }
    }
}

#[async_trait]
impl TwinRepository for CacheMaintaining {
    async fn save(&self, twin: &Twin) -> StoreResult<()> {
        self.inner.save(twin).await?;
        if let Err(e) = self.lookup.cache.save(twin).await {
            tracing::warn!(twin = %twin.id, error = %e, "cache not updated on create");
        }
        Ok(())
    }

    async fn update(&self, twin: &Twin, expected_revision: i64) -> StoreResult<bool> {
        let updated = self.inner.update(twin, expected_revision).await?;
        if updated {
            self.lookup.invalidate(&twin.id);
            if let Err(e) = self.lookup.cache.update(twin).await {
                tracing::warn!(twin = %twin.id, error = %e, "cache not updated on update");
            }
        }
        Ok(updated)
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        self.inner.retrieve(owner, id).await
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>> {
        self.inner.list(owner, filter, page).await
    }

    async fn remove(&self, owner: &str, id: &str) -> StoreResult<bool> {
        let removed = self.inner.remove(owner, id).await?;
        if removed {
            self.lookup.invalidate(id);
            if let Err(e) = self.lookup.cache.remove(id).await {
                tracing::warn!(twin = %id, error = %e, "cache not updated on remove");
            }
        }
        Ok(removed)
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        self.inner.ids_by_attribute(channel, subtopic).await
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        self.inner.retrieve_any(id).await
    }
}
