//! Finds the twins a message is for, without a store read per message.
//!
//! (channel, subtopic) -> twin ids comes from the cache (Redis, shared by instances),
//! falling back to the store on a miss or when the cache is down. Twins themselves are
//! kept in memory: this instance drops an entry when it updates or deletes the twin,
//! and entries expire after [`TWIN_TTL`] so changes made by other instances are seen.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cache::TwinCache;
use crate::domain::twin::Twin;
use crate::store::{Store, StoreResult};

/// How long a twin read from the store is trusted without re-reading it.
pub const TWIN_TTL: Duration = Duration::from_secs(5);
/// Entries beyond which the in-memory twins are dropped wholesale (bounded memory).
const MAX_TWINS: usize = 100_000;

/// The ingestion-side view of twins.
#[derive(Clone)]
pub struct TwinLookup {
    store: Store,
    cache: Arc<dyn TwinCache>,
    twins: Arc<Mutex<TwinMap>>,
}

/// Twin id -> the twin and when it was read from the store.
type TwinMap = HashMap<String, (Arc<Twin>, Instant)>;

impl TwinLookup {
    pub fn new(store: Store, cache: Arc<dyn TwinCache>) -> Self {
        Self {
            store,
            cache,
            twins: Arc::default(),
        }
    }

    pub fn cache(&self) -> &Arc<dyn TwinCache> {
        &self.cache
    }

    /// Ids of twins listening on (channel, subtopic), through the cache when it answers.
    pub async fn ids(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        match self.cache.ids(channel, subtopic).await {
            Ok(ids) if !ids.is_empty() => Ok(ids),
            Ok(_) => {
                let ids = self.store.twins.ids_by_attribute(channel, subtopic).await?;
                if !ids.is_empty()
                    && let Err(e) = self.cache.save_ids(channel, subtopic, &ids).await
                {
                    tracing::warn!(error = %e, "cache not refilled after a miss");
                }
                Ok(ids)
            }
            Err(e) => {
                tracing::debug!(error = %e, "cache down: looking twins up in the store");
                self.store.twins.ids_by_attribute(channel, subtopic).await
            }
        }
    }

    /// The twin, from memory when fresh; None when it no longer exists.
    pub async fn twin(&self, id: &str) -> StoreResult<Option<Arc<Twin>>> {
        if let Some((twin, at)) = self.lock().get(id)
            && at.elapsed() < TWIN_TTL
        {
            return Ok(Some(twin.clone()));
        }
        let twin = self.store.twins.retrieve_any(id).await?.map(Arc::new);
        let mut map = self.lock();
        match &twin {
            Some(t) => {
                if map.len() >= MAX_TWINS {
                    map.clear();
                }
                map.insert(id.to_owned(), (t.clone(), Instant::now()));
            }
            None => {
                map.remove(id);
            }
        }
        Ok(twin)
    }

    /// Forgets the in-memory copy after this instance changed or deleted the twin.
    pub fn invalidate(&self, id: &str) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TwinMap> {
        self.twins.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
