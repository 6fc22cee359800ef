//! Which twins listen on a (channel, subtopic): the lookup ingestion does per message.
//!
//! Redis with the Go service's key layout (shared by every instance), or an in-process
//! map when no cache URL is configured (single instance only). Every attribute of a
//! twin's current definition is cached, persisted or not.

pub mod memory;
pub mod redis;

use async_trait::async_trait;

use crate::domain::twin::Twin;

/// The cache could not be reached or answered garbage; callers fall back to the store.
#[derive(Debug, thiserror::Error)]
#[error("cache unavailable: {0}")]
pub struct CacheError(pub String);

pub type CacheResult<T> = Result<T, CacheError>;

#[async_trait]
pub trait TwinCache: Send + Sync {
    /// Adds the twin under every (channel, subtopic) of its current definition.
    async fn save(&self, twin: &Twin) -> CacheResult<()>;
    /// Replaces whatever the twin was cached under by its current definition's keys.
    async fn update(&self, twin: &Twin) -> CacheResult<()>;
    /// Adds twin ids found in the store under (channel, subtopic) after a cache miss.
    async fn save_ids(&self, channel: &str, subtopic: &str, ids: &[String]) -> CacheResult<()>;
    /// Ids of twins cached under (channel, subtopic) or under (channel, ">").
    async fn ids(&self, channel: &str, subtopic: &str) -> CacheResult<Vec<String>>;
    /// Forgets the twin everywhere.
    async fn remove(&self, twin_id: &str) -> CacheResult<()>;
}
