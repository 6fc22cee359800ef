//! A test double of the cache: the in-process cache that can be switched off like a
//! stopped Redis, can say its answers are incomplete like one under repair, and records
//! where store answers were written back; and twins to feed it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;

use super::memory::MemoryCache;
use super::{CacheError, CacheResult, TwinCache};
use crate::domain::twin::{Attribute, Definition, Twin};

/// A twin of revision `revision` whose current definition listens on each
/// (channel, subtopic) of `listens`.
pub fn twin(id: &str, revision: i64, listens: &[(&str, &str)]) -> Twin {
    let now = chrono::Utc::now();
    Twin {
        owner: "o".into(),
        id: id.into(),
        name: id.into(),
        revision,
        created: now,
        updated: now,
        definitions: vec![Definition {
            id: 0,
            created: now,
            delta: 0,
            attributes: listens
                .iter()
                .enumerate()
                .map(|(i, (channel, subtopic))| Attribute {
                    name: format!("a{i}"),
                    channel: (*channel).into(),
                    subtopic: (*subtopic).into(),
                    persist_state: true,
                    record: None,
                })
                .collect(),
        }],
        metadata: Default::default(),
    }
}

#[derive(Default)]
pub struct Flaky {
    cache: MemoryCache,
    pub down: AtomicBool,
    pub incomplete: AtomicBool,
    refilled: Mutex<Vec<(String, String)>>,
}

impl Flaky {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// The (channel, subtopic) keys `save_ids` wrote, in order.
    pub fn refilled(&self) -> Vec<(String, String)> {
        self.refilled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn check(&self, operation: &'static str) -> CacheResult<()> {
        if self.down.load(Ordering::SeqCst) {
            return Err(CacheError::Unavailable {
                operation,
                source: Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl TwinCache for Flaky {
    async fn save(&self, twin: &Twin) -> CacheResult<()> {
        self.check("save")?;
        self.cache.save(twin).await
    }

    async fn update(&self, twin: &Twin) -> CacheResult<()> {
        self.check("update")?;
        self.cache.update(twin).await
    }

    async fn save_ids(&self, channel: &str, subtopic: &str, ids: &[String]) -> CacheResult<()> {
        self.check("save_ids")?;
        self.refilled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((channel.to_owned(), subtopic.to_owned()));
        self.cache.save_ids(channel, subtopic, ids).await
    }

    async fn ids(&self, channel: &str, subtopic: &str) -> CacheResult<Vec<String>> {
        self.check("ids")?;
        self.cache.ids(channel, subtopic).await
    }

    async fn remove(&self, twin_id: &str) -> CacheResult<()> {
        self.check("remove")?;
        self.cache.remove(twin_id).await
    }

    async fn ping(&self) -> CacheResult<()> {
        self.check("ping")
    }

    fn is_complete(&self) -> bool {
        !self.incomplete.load(Ordering::SeqCst)
    }
}
