//! Keeps a shared cache exact across its outages, as a decorator of [`TwinCache`].
//!
//! A write that does not reach Redis (create, update or delete of a twin while Redis is
//! away) would otherwise leave its keys wrong for good: Redis keys never expire, and a
//! key that still names another twin is trusted by every lookup, so the new twin would
//! never get the messages of that key. Here every such write is remembered (the latest
//! per twin, bounded) and made again by a background task once Redis answers; until
//! then [`TwinCache::is_complete`] is false and lookups ask the store.
//!
//! It also turns per-call failures into one log line when the cache goes away and one
//! when it comes back, instead of one per message.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{CacheResult, TwinCache};
use crate::domain::twin::Twin;

/// Twins whose failed writes are remembered. Each costs one twin in memory; an outage
/// during which more twins change than this cannot be repaired write by write, and the
/// cache then stays incomplete (lookups of this instance go to the store) until restart.
pub const MAX_PENDING: usize = 10_000;
/// How often the repair task tries again while the cache is away.
pub const REPAIR_INTERVAL: Duration = Duration::from_secs(1);
/// After the cache comes back, how long its answers are still not trusted: other
/// instances sharing it repair what they failed to write within their own interval.
pub const SETTLE: Duration = Duration::from_secs(3);

/// Counter of cache writes that failed and were queued for repair.
pub const WRITES_QUEUED: &str = "twins_cache_repairs_queued_total";

/// A write to make again.
#[derive(Debug, Clone, PartialEq)]
enum Pending {
    /// The twin's keys become those of this version's current definition.
    Replace(Twin),
    /// The twin is forgotten.
    Remove,
}

impl Pending {
    /// Whether this write is made obsolete by a later one that reached the cache: a
    /// remove is final, and a version is replaced only by a newer one.
    fn superseded_by(&self, done: &Pending) -> bool {
        match (self, done) {
            (_, Pending::Remove) => true,
            (Pending::Remove, Pending::Replace(_)) => false,
            (Pending::Replace(old), Pending::Replace(new)) => old.revision <= new.revision,
        }
    }
}

#[derive(Debug)]
struct State {
    /// Whether the last call reached the cache.
    up: bool,
    /// When it came back, if it has since the last outage.
    back_since: Option<Instant>,
    pending: HashMap<String, Pending>,
    /// More than [`MAX_PENDING`] twins failed: precise repair is impossible.
    overflowed: bool,
    /// Whether a repair task runs.
    repairing: bool,
}

struct Shared {
    inner: Arc<dyn TwinCache>,
    state: Mutex<State>,
    interval: Duration,
    settle: Duration,
    max_pending: usize,
}

/// [`TwinCache`] that repairs what failed, see the module docs.
#[derive(Clone)]
pub struct Repairing {
    shared: Arc<Shared>,
}

impl Repairing {
    pub fn new(inner: Arc<dyn TwinCache>) -> Self {
        Self::with_limits(inner, REPAIR_INTERVAL, SETTLE, MAX_PENDING)
    }

    /// With another repair interval, settling time and bound (tests).
    pub fn with_limits(
        inner: Arc<dyn TwinCache>,
        interval: Duration,
        settle: Duration,
        max_pending: usize,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                inner,
                state: Mutex::new(State {
                    up: true,
                    back_since: None,
                    pending: HashMap::new(),
                    overflowed: false,
                    repairing: false,
                }),
                interval,
                settle,
                max_pending,
            }),
        }
    }

    /// Twins waiting for their keys to be written again.
    pub fn pending(&self) -> usize {
        self.shared.lock().pending.len()
    }

    /// Records the outcome of a write of `twin_id` and, when it failed, queues it.
    fn wrote<T>(&self, twin_id: &str, write: Pending, result: &CacheResult<T>) {
        self.shared.observe(result);
        let mut state = self.shared.lock();
        if result.is_ok() {
            if let Entry::Occupied(e) = state.pending.entry(twin_id.to_owned())
                && e.get().superseded_by(&write)
            {
                e.remove();
            }
            return;
        }
        metrics::counter!(WRITES_QUEUED).increment(1);
        if state.overflowed {
            return;
        }
        match state.pending.entry(twin_id.to_owned()) {
            Entry::Occupied(mut e) => {
                if e.get().superseded_by(&write) {
                    e.insert(write);
                }
            }
            Entry::Vacant(e) => {
                e.insert(write);
            }
        }
        if state.pending.len() > self.shared.max_pending {
            state.overflowed = true;
            state.pending.clear();
            tracing::error!(
                bound = self.shared.max_pending,
                "too many cache writes failed to repair them one by one; this instance \
                 looks twins up in the store until it restarts"
            );
            return;
        }
        if !state.repairing {
            state.repairing = true;
            tokio::spawn(repair(Arc::downgrade(&self.shared)));
        }
    }
}

impl Shared {
    // Every mutation is a single insert or remove, so a poisoned lock holds no
    // half-made change.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One log line when the cache goes away and one when it is back, not one per call.
    /// Only an outage counts: an error the same call would get again is the caller's.
    fn observe<T>(&self, result: &CacheResult<T>) {
        let mut state = self.lock();
        match result {
            Ok(_) if !state.up => {
                state.up = true;
                state.back_since = Some(Instant::now());
                tracing::info!(
                    pending = state.pending.len(),
                    "cache available again; repairing the writes it missed"
                );
            }
            Err(e) if e.is_transient() && state.up => {
                state.up = false;
                state.back_since = None;
                tracing::warn!(
                    error = %e,
                    "cache unavailable; lookups go to the store until it is back and repaired"
                );
            }
            _ => {}
        }
    }

    /// Makes every queued write again. True when nothing is left to do.
    async fn repair_once(&self) -> bool {
        let queued: Vec<(String, Pending)> = self
            .lock()
            .pending
            .iter()
            .map(|(id, w)| (id.clone(), w.clone()))
            .collect();
        for (id, write) in queued {
            let result = match &write {
                // Replacing is exact whatever was written before, and idempotent.
                Pending::Replace(twin) => self.inner.update(twin).await,
                Pending::Remove => self.inner.remove(&id).await,
            };
            self.observe(&result);
            match result {
                Err(e) if e.is_transient() => return false,
                Err(e) => {
                    // Trying again cannot help; the store answers for this twin's keys
                    // through the lookup's fallback once the key is missed.
                    tracing::warn!(twin = %id, error = %e, "cache write given up");
                }
                Ok(()) => {}
            }
            let mut state = self.lock();
            if state.pending.get(&id) == Some(&write) {
                state.pending.remove(&id);
            }
        }
        let mut state = self.lock();
        if state.pending.is_empty() {
            state.repairing = false;
            tracing::info!("cache repaired");
            true
        } else {
            false
        }
    }
}

/// Repairs until nothing is pending, or the cache is dropped (the service stopped).
async fn repair(shared: Weak<Shared>) {
    loop {
        let Some(interval) = shared.upgrade().map(|s| s.interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if shared.repair_once().await {
            return;
        }
    }
}

#[async_trait]
impl TwinCache for Repairing {
    async fn save(&self, twin: &Twin) -> CacheResult<()> {
        let result = self.shared.inner.save(twin).await;
        self.wrote(&twin.id, Pending::Replace(twin.clone()), &result);
        result
    }

    async fn update(&self, twin: &Twin) -> CacheResult<()> {
        let result = self.shared.inner.update(twin).await;
        self.wrote(&twin.id, Pending::Replace(twin.clone()), &result);
        result
    }

    async fn save_ids(&self, channel: &str, subtopic: &str, ids: &[String]) -> CacheResult<()> {
        // A refill after a miss: losing it only costs another miss.
        let result = self.shared.inner.save_ids(channel, subtopic, ids).await;
        self.shared.observe(&result);
        result
    }

    async fn ids(&self, channel: &str, subtopic: &str) -> CacheResult<Vec<String>> {
        let result = self.shared.inner.ids(channel, subtopic).await;
        self.shared.observe(&result);
        result
    }

    async fn remove(&self, twin_id: &str) -> CacheResult<()> {
        let result = self.shared.inner.remove(twin_id).await;
        self.wrote(twin_id, Pending::Remove, &result);
        result
    }

    async fn ping(&self) -> CacheResult<()> {
        let result = self.shared.inner.ping().await;
        self.shared.observe(&result);
        result
    }

    fn is_complete(&self) -> bool {
        let state = self.shared.lock();
        state.up
            && state.pending.is_empty()
            && !state.overflowed
            && state
                .back_since
                .is_none_or(|at| at.elapsed() >= self.shared.settle)
            && self.shared.inner.is_complete()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::flaky::{self, Flaky};

    fn twin(id: &str, revision: i64, channel: &str) -> Twin {
        flaky::twin(id, revision, &[(channel, "s")])
    }

    fn fixture(max_pending: usize) -> (Arc<Flaky>, Repairing) {
        let switch = Arc::new(Flaky::default());
        let repairing = Repairing::with_limits(
            switch.clone(),
            Duration::from_millis(10),
            Duration::ZERO,
            max_pending,
        );
        (switch, repairing)
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "{what} not within 5 s");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_write_lost_while_down_is_made_once_the_cache_is_back() {
        let (switch, cache) = fixture(100);
        cache.save(&twin("old", 1, "c")).await.unwrap();
        switch.set_down(true);
        assert!(cache.save(&twin("new", 1, "c")).await.is_err());
        assert!(cache.update(&twin("old", 2, "d")).await.is_err());
        assert!(!cache.is_complete());
        assert_eq!(cache.pending(), 2);

        switch.set_down(false);
        until("repair", || cache.pending() == 0).await;
        until("complete", || cache.is_complete()).await;
        assert_eq!(cache.ids("c", "s").await.unwrap(), vec!["new".to_string()]);
        assert_eq!(cache.ids("d", "s").await.unwrap(), vec!["old".to_string()]);
    }

    #[tokio::test]
    async fn a_remove_lost_while_down_wins_over_an_earlier_lost_update() {
        let (switch, cache) = fixture(100);
        cache.save(&twin("t", 1, "c")).await.unwrap();
        switch.set_down(true);
        assert!(cache.update(&twin("t", 2, "d")).await.is_err());
        assert!(cache.remove("t").await.is_err());
        switch.set_down(false);
        until("repair", || cache.pending() == 0).await;
        assert!(cache.ids("c", "s").await.unwrap().is_empty());
        assert!(cache.ids("d", "s").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_later_successful_write_makes_the_queued_one_obsolete() {
        let (switch, cache) = fixture(100);
        switch.set_down(true);
        assert!(cache.save(&twin("t", 1, "c")).await.is_err());
        switch.set_down(false);
        cache.update(&twin("t", 2, "d")).await.unwrap();
        assert_eq!(cache.pending(), 0);
        assert!(cache.is_complete());
        // The repair task must not bring the older version back.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(cache.ids("c", "s").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn beyond_the_bound_the_cache_is_never_trusted_again() {
        let (switch, cache) = fixture(2);
        switch.set_down(true);
        for id in ["a", "b", "c"] {
            assert!(cache.save(&twin(id, 1, "c")).await.is_err());
        }
        assert_eq!(cache.pending(), 0, "the queue is dropped, not grown");
        switch.set_down(false);
        assert!(cache.ping().await.is_ok());
        assert!(!cache.is_complete());
    }

    #[tokio::test]
    async fn answers_are_not_trusted_until_the_settling_time_has_passed() {
        let switch = Arc::new(Flaky::default());
        let cache = Repairing::with_limits(
            switch.clone(),
            Duration::from_millis(10),
            Duration::from_secs(3600),
            100,
        );
        assert!(cache.is_complete());
        switch.set_down(true);
        assert!(cache.ping().await.is_err());
        assert!(!cache.is_complete());
        switch.set_down(false);
        assert!(cache.ping().await.is_ok());
        assert!(
            !cache.is_complete(),
            "other instances may still be repairing"
        );
    }
}
