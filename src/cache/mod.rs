//! Which twins listen on a (channel, subtopic): the lookup ingestion does per message.
//!
//! Redis with the Go service's key layout (shared by every instance), or an in-process
//! map when no cache URL is configured (single instance only). Every attribute of a
//! twin's current definition is cached, persisted or not.

#[cfg(test)]
#[cfg(test)]
pub mod flaky;
pub mod memory;
pub mod redis;
pub mod repair;

use std::time::Duration;

use async_trait::async_trait;

use crate::domain::twin::Twin;
use crate::error::Cause;

/// Why the cache did not answer; callers fall back to the store whatever the kind.
/// Each kind keeps the driver's error as its source.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The configured URL cannot be used; no retry will help.
    #[error("invalid cache URL: {0}")]
    InvalidUrl(#[source] Cause),
    /// The cache could not be reached or dropped the connection; a later call may succeed.
    #[error("cache {operation}: unavailable: {source}")]
    Unavailable {
        operation: &'static str,
        #[source]
        source: Cause,
    },
    /// The cache did not answer within the bound given to every operation.
    #[error("cache {operation}: no answer within {after:?}")]
    Timeout {
        operation: &'static str,
        after: Duration,
    },
    /// The cache answered with an error that the same call would get again (wrong key
    /// type, a script error): a bug or a foreign writer, not an outage.
    #[error("cache {operation}: {source}")]
    Failed {
        operation: &'static str,
        #[source]
        source: Cause,
    },
}

impl CacheError {
    /// Whether the same call can succeed later (the cache was away or slow), as opposed
    /// to a configuration or data problem that stays until someone fixes it.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Timeout { .. })
    }
}

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
    /// Whether the cache answers now; an in-process cache always does.
    async fn ping(&self) -> CacheResult<()> {
        Ok(())
    }
    /// Whether a non-empty answer of [`TwinCache::ids`] lists every twin of the key. False
    /// while writes that failed are not yet made again (see [`repair`]): an answer may
    /// then name another twin and not the one whose write was lost, so the caller must
    /// ask the store.
    fn is_complete(&self) -> bool {
        true
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
    fn only_outages_are_transient() {
        let unavailable = CacheError::Unavailable {
            operation: "ids",
            source: io("connection refused"),
        };
        let timeout = CacheError::Timeout {
            operation: "ids",
            after: Duration::from_millis(500),
        };
        let failed = CacheError::Failed {
            operation: "ids",
            source: io("WRONGTYPE"),
        };
        assert!(unavailable.is_transient());
        assert!(timeout.is_transient());
        assert!(!failed.is_transient());
        assert!(!CacheError::InvalidUrl(io("bad scheme")).is_transient());
    }

    #[test]
    fn the_driver_error_is_the_source() {
        let e = CacheError::Unavailable {
            operation: "save",
            source: io("connection refused"),
        };
        let source = e.source().expect("a source");
        assert_eq!(source.to_string(), "connection refused");
        assert!(source.downcast_ref::<std::io::Error>().is_some());
    }
}
