//! In-process cache, used when `MG_TWINS_CACHE_URL` is unset.
//!
//! It keeps the same two directions as the Redis layout (twins by channel and subtopic,
//! keys by twin) so that update and remove stay exact, but it lives in this process
//! only: with several instances each would see only its own writes, hence single
//! instance only. Keys are (channel, subtopic) pairs rather than joined strings, so a
//! `-` inside a channel cannot make two keys collide. A plain `std` lock is enough: no
//! operation awaits while holding it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;

use super::{CacheResult, TwinCache};
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};

/// Twin ids by channel and subtopic, and the (channel, subtopic) keys of each twin.
#[derive(Debug, Default)]
pub struct MemoryCache {
    index: RwLock<Index>,
}

#[derive(Debug, Default)]
struct Index {
    /// channel -> subtopic -> twin ids. Nested so a lookup by `&str` allocates nothing.
    twins: HashMap<String, HashMap<String, BTreeSet<String>>>,
    /// twin id -> the (channel, subtopic) keys it is listed under.
    keys: HashMap<String, HashSet<(String, String)>>,
}

impl Index {
    fn add(&mut self, twin_id: &str, channel: &str, subtopic: &str) {
        self.twins
            .entry(channel.to_owned())
            .or_default()
            .entry(subtopic.to_owned())
            .or_default()
            .insert(twin_id.to_owned());
        self.keys
            .entry(twin_id.to_owned())
            .or_default()
            .insert((channel.to_owned(), subtopic.to_owned()));
    }

    fn add_twin(&mut self, twin: &Twin) {
        for attribute in twin
            .current_definition()
            .into_iter()
            .flat_map(|d| &d.attributes)
        {
            self.add(&twin.id, &attribute.channel, &attribute.subtopic);
        }
    }

    fn forget(&mut self, twin_id: &str) {
        let Some(keys) = self.keys.remove(twin_id) else {
            return;
        };
        for (channel, subtopic) in keys {
            let Some(subtopics) = self.twins.get_mut(&channel) else {
                continue;
            };
            if let Some(ids) = subtopics.get_mut(&subtopic) {
                ids.remove(twin_id);
                if ids.is_empty() {
                    subtopics.remove(&subtopic);
                }
            }
            if subtopics.is_empty() {
                self.twins.remove(&channel);
            }
        }
    }

    fn ids(&self, channel: &str, subtopic: &str) -> Vec<String> {
        let Some(subtopics) = self.twins.get(channel) else {
            return Vec::new();
        };
        let exact = subtopics.get(subtopic).into_iter().flatten();
        let wildcard = subtopics.get(WILDCARD_SUBTOPIC).into_iter().flatten();
        let merged: BTreeSet<&String> = exact.chain(wildcard).collect();
        merged.into_iter().cloned().collect()
    }
}

impl MemoryCache {
    pub fn new() -> Self {
        Self::default()
    }

    // A panic while the lock is held cannot leave the index half-written in a way that
    // matters (every mutation is a set insert or remove), so a poisoned lock is reused.
    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl TwinCache for MemoryCache {
    async fn save(&self, twin: &Twin) -> CacheResult<()> {
        self.write().add_twin(twin);
        Ok(())
    }

    async fn update(&self, twin: &Twin) -> CacheResult<()> {
        let mut index = self.write();
        index.forget(&twin.id);
        index.add_twin(twin);
        Ok(())
    }

    async fn save_ids(&self, channel: &str, subtopic: &str, ids: &[String]) -> CacheResult<()> {
        let mut index = self.write();
        for id in ids {
            index.add(id, channel, subtopic);
        }
        Ok(())
    }

    async fn ids(&self, channel: &str, subtopic: &str) -> CacheResult<Vec<String>> {
        Ok(self.read().ids(channel, subtopic))
    }

    async fn remove(&self, twin_id: &str) -> CacheResult<()> {
        self.write().forget(twin_id);
        Ok(())
    }
}

#[cfg(test)]
#[path = "../../tests/support/cache_conformance.rs"]
#[macro_use]
mod conformance;

#[cfg(test)]
mod tests {
    use super::*;
    use conformance::{attr, twin};

    async fn fixture() -> Box<MemoryCache> {
        Box::new(MemoryCache::new())
    }

    twin_cache_conformance!(fixture);

    #[tokio::test]
    async fn forgetting_the_last_twin_of_a_key_drops_the_key() {
        let cache = MemoryCache::new();
        let t = twin("t1", vec![vec![attr("a", "A", "x", true)]]);
        cache.save(&t).await.unwrap();
        cache.remove("t1").await.unwrap();
        let index = cache.read();
        assert!(index.twins.is_empty(), "{:?}", index.twins);
        assert!(index.keys.is_empty(), "{:?}", index.keys);
    }

    #[tokio::test]
    async fn channel_containing_a_dash_does_not_collide_with_a_subtopic() {
        let cache = MemoryCache::new();
        cache
            .save(&twin("t1", vec![vec![attr("a", "A-x", "", true)]]))
            .await
            .unwrap();
        assert!(cache.ids("A", "x-").await.unwrap().is_empty());
        assert_eq!(cache.ids("A-x", "").await.unwrap(), vec!["t1".to_string()]);
    }
}
