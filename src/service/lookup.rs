//! Finds the twins a message is for, without a store read per message, and keeps the
//! channel/subtopic cache exact as twins change.
//!
//! (channel, subtopic) -> twin ids comes from the cache (Redis, shared by instances) when
//! it has an answer it can vouch for ([`TwinCache::is_complete`]); otherwise from a
//! bounded in-process memory of the store's recent answers ("no twin", and any answer
//! while the cache is away or not trusted), and last from the store. That memory is only asked when the shared cache has nothing, so
//! a twin that another instance creates is seen at once while Redis is up (its keys
//! are there); while Redis is away, another instance's new twin is seen within
//! [`ANSWER_TTL`]. A store answer is written back to Redis under the keys of the
//! attributes that produced it, never under each concrete subtopic a device publishes
//! on, so Redis holds as many keys as twins have attributes, whatever devices send.
//!
//! Twins themselves are not kept between batches: ingestion reads the twins a batch
//! needs from the store, all in one read ([`TwinLookup::twins`]). So a twin updated or
//! deleted through any instance of the group is seen by the next batch, with no
//! in-process copy that only the instance which made the change would know to drop: a
//! message published after the change was answered is applied with the new definition,
//! or to no twin. (An earlier version kept twins for five seconds, and another
//! instance's change went unseen for that long.)
//!
//! [`CacheMaintaining`] is the decorator of the twins repository that keeps the cache
//! and these memories in step with every write, so the use cases never mention them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use hashlink::LruCache;

use crate::cache::TwinCache;
use crate::domain::twin::{Twin, TwinFilter, WILDCARD_SUBTOPIC};
use crate::domain::{Page, PageRequest};
use crate::store::{OutboxEvent, StoreResult, TwinRepository};

/// How long a store answer for a (channel, subtopic) is reused when the shared cache
/// has none: the longest another instance's new twin can go unseen while Redis is
/// away, and the longest a channel nobody listens to costs no store read.
pub const ANSWER_TTL: Duration = Duration::from_secs(5);
/// Store answers remembered by default (`MG_TWINS_LOOKUP_CACHE_SIZE`): each is a key
/// and a few ids, so about a megabyte, and more distinct keys than a fleet of devices
/// publishes within [`ANSWER_TTL`].
pub const DEFAULT_ANSWERS: usize = 10_000;
/// Ids of removed twins kept for ingestion to drop their cursors; older ones are
/// dropped first (their cursors then wait for the wholesale bound of ingestion).
const MAX_REMOVED: usize = 1_024;

/// Counter of store reads made to find the twins of a (channel, subtopic).
pub const STORE_LOOKUPS: &str = "twins_lookup_store_queries_total";
/// Counter of remembered store answers dropped because the bound was reached.
pub const ANSWERS_EVICTED: &str = "twins_lookup_answers_evicted_total";
/// Gauge of remembered store answers.
pub const ANSWERS: &str = "twins_lookup_answers";

/// The ingestion-side view of twins.
#[derive(Clone)]
pub struct TwinLookup {
    twins: Arc<dyn TwinRepository>,
    cache: Arc<dyn TwinCache>,
    answers: Arc<Mutex<Answers>>,
    removed: Arc<Mutex<VecDeque<String>>>,
}

/// Recent store answers by (channel, subtopic), least recently used dropped first.
struct Answers {
    entries: LruCache<(String, String), (Vec<String>, Instant)>,
    /// Bumped whenever entries are dropped because a twin changed, so that an answer
    /// read from the store before the change is not remembered after it.
    generation: u64,
    /// Whether the bound was reported (once per process, then only counted).
    full_reported: bool,
}

impl Answers {
    fn new(capacity: usize) -> Self {
        Self {
            entries: LruCache::new(capacity.max(1)),
            generation: 0,
            full_reported: false,
        }
    }
}

impl TwinLookup {
    /// A lookup reading `twins` (undecorated: reads only) through `cache`.
    pub fn new(twins: Arc<dyn TwinRepository>, cache: Arc<dyn TwinCache>) -> Self {
        Self {
            twins,
            cache,
            answers: Arc::new(Mutex::new(Answers::new(DEFAULT_ANSWERS))),
            removed: Arc::default(),
        }
    }

    /// Remembers at most `answers` store answers (at least one).
    pub fn with_answers(self, answers: usize) -> Self {
        Self {
            answers: Arc::new(Mutex::new(Answers::new(answers))),
            ..self
        }
    }

    /// Ids of twins listening on (channel, subtopic), through the cache when it answers
    /// for the key, else through the remembered store answers, else from the store.
    pub async fn ids(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        let answered = match self.cache.ids(channel, subtopic).await {
            Ok(ids) if !ids.is_empty() && self.cache.is_complete() => return Ok(ids),
            Ok(_) => true,
            Err(e) => {
                tracing::debug!(error = %e, "cache down: looking twins up in the store");
                false
            }
        };
        let generation = {
            let mut answers = self.lock_answers();
            let key = (channel.to_owned(), subtopic.to_owned());
            match answers.entries.get(&key) {
                Some((ids, at)) if at.elapsed() < ANSWER_TTL => return Ok(ids.clone()),
                Some(_) => {
                    answers.entries.remove(&key);
                }
                None => {}
            }
            answers.generation
        };
        metrics::counter!(STORE_LOOKUPS).increment(1);
        let ids = self.twins.ids_by_attribute(channel, subtopic).await?;
        if answered && !ids.is_empty() {
            // The cache has the answer from now on, kept exact by every instance's
            // writes: remembering it here too would only let it go stale.
            self.refill(channel, subtopic, &ids).await;
        } else {
            self.remember(channel, subtopic, &ids, generation);
        }
        Ok(ids)
    }

    /// Writes a store answer back to the cache under the keys of the attributes that
    /// produced it: twins listening on every subtopic under (channel, ">"), the others
    /// under (channel, subtopic). Never the wildcard twins under the concrete subtopic,
    /// which would make one key per subtopic a device invents.
    async fn refill(&self, channel: &str, subtopic: &str, ids: &[String]) {
        let wildcard = if subtopic == WILDCARD_SUBTOPIC {
            ids.to_vec()
        } else {
            metrics::counter!(STORE_LOOKUPS).increment(1);
            match self
                .twins
                .ids_by_attribute(channel, WILDCARD_SUBTOPIC)
                .await
            {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::debug!(error = %e, "cache not refilled after a miss");
                    return;
                }
            }
        };
        let exact: Vec<String> = ids
            .iter()
            .filter(|id| !wildcard.contains(id))
            .cloned()
            .collect();
        for (subtopic, ids) in [(subtopic, exact), (WILDCARD_SUBTOPIC, wildcard)] {
            if !ids.is_empty()
                && let Err(e) = self.cache.save_ids(channel, subtopic, &ids).await
            {
                tracing::debug!(error = %e, "cache not refilled after a miss");
            }
        }
    }

    /// Keeps a store answer for [`ANSWER_TTL`], unless a twin changed since it was read.
    fn remember(&self, channel: &str, subtopic: &str, ids: &[String], generation: u64) {
        let mut answers = self.lock_answers();
        if answers.generation != generation {
            return;
        }
        let key = (channel.to_owned(), subtopic.to_owned());
        if answers.entries.len() >= answers.entries.capacity()
            && !answers.entries.contains_key(&key)
        {
            metrics::counter!(ANSWERS_EVICTED).increment(1);
            if !answers.full_reported {
                answers.full_reported = true;
                tracing::warn!(
                    bound = answers.entries.capacity(),
                    "lookup memory full: least recently used answers are dropped \
                     (MG_TWINS_LOOKUP_CACHE_SIZE); counted in twins_lookup_answers_evicted_total"
                );
            }
        }
        answers.entries.insert(key, (ids.to_vec(), Instant::now()));
        metrics::gauge!(ANSWERS).set(answers.entries.len() as f64);
    }

    /// Drops the remembered answers a change of this twin can make wrong: those of
    /// the channels it listens on now (a "no twin" there is no longer true) and those
    /// naming it (it may have left their channel).
    fn forget_answers(&self, twin_id: &str, channels: &[&str]) {
        let mut answers = self.lock_answers();
        answers.generation += 1;
        answers.entries.retain(|(channel, _), (ids, _)| {
            !channels.contains(&channel.as_str()) && !ids.iter().any(|id| id == twin_id)
        });
        metrics::gauge!(ANSWERS).set(answers.entries.len() as f64);
    }

    /// Store answers remembered now.
    pub fn answers(&self) -> usize {
        self.lock_answers().entries.len()
    }

    /// Ids of twins this instance removed since the last call, for ingestion to drop
    /// what it keeps about them.
    pub fn take_removed(&self) -> Vec<String> {
        self.lock_removed().drain(..).collect()
    }

    fn lock_answers(&self) -> MutexGuard<'_, Answers> {
        self.answers.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_removed(&self) -> MutexGuard<'_, VecDeque<String>> {
        self.removed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The twins with these ids as stored now, in one store read, each with its own
    /// result (a twin that cannot be read fails alone). A twin that no longer exists is
    /// absent, and the cache entries that named it are dropped.
    pub async fn twins(&self, ids: &[String]) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        let found = match self.twins.retrieve_many(ids).await {
            Ok(found) => found,
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "twins not read together; reading them one by one");
                crate::store::retrieve_one_by_one(&*self.twins, ids).await?
            }
        };
        for id in ids.iter().filter(|id| !found.contains_key(*id)) {
            if let Err(e) = self.cache.remove(id).await {
                tracing::debug!(error = %e, "stale cache entry not removed");
            }
        }
        Ok(found)
    }
}

/// The twins repository decorated with cache maintenance: after every successful write,
/// the twin's (channel, subtopic) keys are updated and the lookup's memories of it are
/// dropped. A cache failure never fails the write: the cache repairs itself
/// ([`crate::cache::repair`]) and the lookup asks the store meanwhile.
pub struct CacheMaintaining {
    inner: Arc<dyn TwinRepository>,
    lookup: TwinLookup,
}

impl CacheMaintaining {
    pub fn new(inner: Arc<dyn TwinRepository>, lookup: TwinLookup) -> Self {
        Self { inner, lookup }
    }

    /// Drops what the lookup remembers that this version of the twin contradicts.
    fn changed(&self, twin: &Twin) {
        let channels: Vec<&str> = twin
            .current_definition()
            .into_iter()
            .flat_map(|d| &d.attributes)
            .map(|a| a.channel.as_str())
            .collect();
        self.lookup.forget_answers(&twin.id, &channels);
    }
}

#[async_trait]
impl TwinRepository for CacheMaintaining {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        self.inner.save_recorded(twin, events).await?;
        self.changed(twin);
        // Failures are logged once per outage by the cache and repaired there.
        if let Err(e) = self.lookup.cache.save(twin).await {
            tracing::debug!(twin = %twin.id, error = %e, "cache not updated on create");
        }
        Ok(())
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let updated = self
            .inner
            .update_recorded(twin, expected_revision, events)
            .await?;
        if updated {
            self.changed(twin);
            if let Err(e) = self.lookup.cache.update(twin).await {
                tracing::debug!(twin = %twin.id, error = %e, "cache not updated on update");
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

    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let removed = self
            .inner
            .remove_recorded(owner, id, expected_revision, events)
            .await?;
        if removed {
            self.lookup.forget_answers(id, &[]);
            {
                let mut removed = self.lookup.lock_removed();
                if removed.len() >= MAX_REMOVED {
                    removed.pop_front();
                }
                removed.push_back(id.to_owned());
            }
            if let Err(e) = self.lookup.cache.remove(id).await {
                tracing::debug!(twin = %id, error = %e, "cache not updated on remove");
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

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        self.inner.retrieve_many(ids).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::cache::flaky::{self, Flaky};
    use crate::service::fakes::Memory;

    struct Fixture {
        db: Arc<Memory>,
        probe: Arc<Flaky>,
        lookup: TwinLookup,
        /// The repository as the use cases see it.
        maintained: CacheMaintaining,
    }

    fn fixture(answers: usize) -> Fixture {
        let db = Memory::new();
        let store = db.store();
        let probe = Arc::new(Flaky::default());
        let lookup = TwinLookup::new(store.twins.clone(), probe.clone()).with_answers(answers);
        let maintained = CacheMaintaining::new(store.twins.clone(), lookup.clone());
        Fixture {
            db,
            probe,
            lookup,
            maintained,
        }
    }

    fn twin(id: &str, listens: &[(&str, &str)]) -> Twin {
        flaky::twin(id, 1, listens)
    }

    fn store_reads(f: &Fixture) -> usize {
        f.db.calls("twins.ids_by_attribute")
    }

    #[tokio::test]
    async fn a_channel_nobody_listens_on_costs_one_store_read_not_one_per_batch() {
        let f = fixture(100);
        for _ in 0..50 {
            assert!(f.lookup.ids("nobody", "s").await.unwrap().is_empty());
        }
        assert_eq!(store_reads(&f), 1);
    }

    #[tokio::test]
    async fn a_twin_created_here_is_found_at_once_despite_a_remembered_no_twin() {
        let f = fixture(100);
        f.probe.set_down(true);
        assert!(f.lookup.ids("c", "s").await.unwrap().is_empty());
        f.maintained.save(&twin("t1", &[("c", ">")])).await.unwrap();
        assert_eq!(
            f.lookup.ids("c", "s").await.unwrap(),
            vec!["t1".to_string()]
        );
    }

    #[tokio::test]
    async fn a_removed_twin_leaves_the_remembered_answers_and_is_reported_to_ingestion() {
        let f = fixture(100);
        f.probe.set_down(true);
        f.maintained.save(&twin("t1", &[("c", "s")])).await.unwrap();
        assert_eq!(
            f.lookup.ids("c", "s").await.unwrap(),
            vec!["t1".to_string()]
        );
        assert!(f.maintained.remove("o", "t1").await.unwrap());
        assert!(f.lookup.ids("c", "s").await.unwrap().is_empty());
        assert_eq!(f.lookup.take_removed(), vec!["t1".to_string()]);
        assert!(f.lookup.take_removed().is_empty());
    }

    #[tokio::test]
    async fn a_wildcard_twin_is_written_back_under_its_wildcard_key_only() {
        let f = fixture(100);
        // Stored by another writer: the cache does not know it.
        f.db.save(&twin("w", &[("c", ">")])).await.unwrap();
        f.db.save(&twin("e", &[("c", "s0")])).await.unwrap();
        for i in 0..1_000 {
            let mut ids = f.lookup.ids("c", &format!("s{i}")).await.unwrap();
            ids.sort();
            let mut expected = vec!["w".to_string()];
            if i == 0 {
                expected.insert(0, "e".into());
            }
            assert_eq!(ids, expected, "subtopic s{i}");
        }
        let refilled = f.probe.refilled();
        assert_eq!(
            refilled,
            vec![
                ("c".to_string(), "s0".to_string()),
                ("c".into(), ">".into())
            ]
        );
        assert!(store_reads(&f) <= 2, "{} store reads", store_reads(&f));
        assert_eq!(f.lookup.answers(), 0, "the cache has the answer");
    }

    #[tokio::test]
    async fn remembered_answers_are_bounded() {
        let f = fixture(10);
        f.probe.set_down(true);
        f.db.save(&twin("w", &[("c", ">")])).await.unwrap();
        for i in 0..1_000 {
            let ids = f.lookup.ids("c", &format!("s{i}")).await.unwrap();
            assert_eq!(ids, vec!["w".to_string()]);
            f.lookup.ids(&format!("nobody{i}"), "").await.unwrap();
        }
        assert_eq!(f.lookup.answers(), 10);
    }

    #[tokio::test]
    async fn an_incomplete_cache_is_not_trusted_with_another_twin_in_the_key() {
        let f = fixture(100);
        f.maintained
            .save(&twin("old", &[("c", "s")]))
            .await
            .unwrap();
        // Created while the cache was away: its key still names only the old twin.
        f.db.save(&twin("new", &[("c", "s")])).await.unwrap();
        f.probe.incomplete.store(true, Ordering::SeqCst);
        let mut ids = f.lookup.ids("c", "s").await.unwrap();
        ids.sort();
        assert_eq!(ids, vec!["new".to_string(), "old".to_string()]);
    }
}
