//! In-memory fakes of the ports the use cases run on, for their unit tests.
//!
//! [`Memory`] is one backend implementing every store port with the semantics
//! `tests/store_conformance.rs` pins for the real ones: twins scoped to their owner,
//! revision-checked updates, removal taking states, documents and the ingest sequence
//! along, version-checked document writes answering the stored version, and an ingest
//! log whose position only moves from where it is and whose per-twin sequences turn
//! stale writes into conflicts. A step is all or nothing, as in a transaction.
//!
//! Tests steer it in three ways, each naming calls as `"<port>.<method>"`
//! (`"ingest.apply"`, `"twins.update"`; a bare `"<port>"` covers all its methods):
//! [`Memory::fail`] makes the next calls fail with a [`StoreError`] kind,
//! [`Memory::refuse_writes_of`] makes the ingest log refuse a twin's state writes for
//! good (a constraint violation), and the `interleave_*` methods land another writer's
//! change just before the next write is compared, as a concurrent request would.
//! [`Memory::calls`] counts what was called.

use super::notify::{Outcome, Publish};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::domain::document::{Document, DocumentSummary, VersionSummary, WriteOp, Writer};
use crate::domain::history::{self, Summary, Window};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::time::now_millis;
use crate::domain::twin::{Twin, WILDCARD_SUBTOPIC};
use crate::domain::{Page, PageRequest};
use crate::service::ingest::{IngestError, Rejected, SetAside};
use crate::store::{
    Applied, DocumentRepository, DocumentWrite, HealthCheck, IngestCursor, IngestRepository,
    IngestStep, Lease, OutboxEntry, OutboxEvent, OutboxRepository, StateRepository, Store,
    StoreError, StoreResult, TwinFilter, TwinRepository, Versioned,
};

/// The kind of store error an injected failure raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Unavailable,
    Conflict,
    Internal,
}

impl Failure {
    pub fn error(self, call: &str) -> StoreError {
        let cause = format!("injected failure of {call}").into();
        match self {
            Self::Unavailable => StoreError::Unavailable(cause),
            Self::Conflict => StoreError::Conflict(cause),
            Self::Internal => StoreError::Internal(cause),
        }
    }
}

/// Another writer's change to a stored twin.
type TwinChange = Arc<dyn Fn(&mut Twin) + Send + Sync>;

/// Another writer's change to a stored document: new data, or None to delete it.
type DocumentChange = Option<Map<String, Value>>;

/// The whole backend: every port over one set of tables.
#[derive(Default)]
pub struct Memory {
    data: Mutex<Tables>,
    steering: Mutex<Steering>,
}

#[derive(Default)]
struct Tables {
    /// In creation order, which listings follow.
    twins: Vec<Twin>,
    /// twin id -> state id -> state.
    states: HashMap<String, BTreeMap<i64, State>>,
    /// (twin id, name) -> document.
    documents: BTreeMap<(String, String), Document>,
    /// (twin id, name) -> version -> the revision and how it was written.
    revisions: BTreeMap<(String, String), BTreeMap<i64, (Document, VersionSummary)>>,
    /// twin id -> stream sequence of the last message applied.
    sequences: HashMap<String, u64>,
    groups: HashMap<String, Group>,
    /// The change events recorded, with their ids, oldest first.
    outbox: Vec<OutboxEntry>,
    /// The id of the last event recorded.
    outbox_id: i64,
}

struct Group {
    position: u64,
    holder: String,
    until: DateTime<Utc>,
}

#[derive(Default)]
struct Steering {
    /// Call name or port name -> failures still to raise, first first.
    failures: HashMap<String, VecDeque<Failure>>,
    refused: HashSet<String>,
    /// Changes landing before the next twin updates, one per update.
    twin_updates: VecDeque<TwinChange>,
    /// Changes landing before the next document writes or deletes, one per call.
    document_writes: VecDeque<DocumentChange>,
    calls: HashMap<&'static str, usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Top-level metadata equality as the backends filter: integers and reals compare as
/// numbers, everything else as a whole.
fn same_value(stored: &Value, wanted: &Value) -> bool {
    match (stored, wanted) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        _ => stored == wanted,
    }
}

fn listed(twin: &Twin, owner: &str, filter: &TwinFilter) -> bool {
    twin.owner == owner
        && filter.name.as_ref().is_none_or(|n| &twin.name == n)
        && filter.metadata.as_ref().is_none_or(|m| {
            m.iter()
                .all(|(k, v)| twin.metadata.get(k).is_some_and(|s| same_value(s, v)))
        })
}

impl Memory {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    /// A [`Store`] whose every port is this backend.
    pub fn store(self: &Arc<Self>) -> Store {
        Store::new(
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
            self.clone(),
        )
    }

    /// The next `times` calls matching `target` (`"port.method"` or `"port"`) fail.
    pub fn fail(&self, target: &str, failure: Failure, times: usize) {
        lock(&self.steering)
            .failures
            .entry(target.to_owned())
            .or_default()
            .extend(std::iter::repeat_n(failure, times));
    }

    /// Every ingest step writing states of this twin is refused as internal, as a
    /// constraint violation would be, however often it is tried.
    pub fn refuse_writes_of(&self, twin_id: &str) {
        lock(&self.steering).refused.insert(twin_id.to_owned());
    }

    /// The next `times` twin updates each find that another update landed first: the
    /// stored twin got `change` and its revision moved on.
    pub fn interleave_twin_updates(
        &self,
        times: usize,
        change: impl Fn(&mut Twin) + Send + Sync + 'static,
    ) {
        let change: TwinChange = Arc::new(change);
        lock(&self.steering)
            .twin_updates
            .extend(std::iter::repeat_n(change, times));
    }

    /// The next document write or delete finds that another writer stored `data` (or,
    /// with None, deleted the document) since it was read.
    pub fn interleave_document_write(&self, data: DocumentChange) {
        lock(&self.steering).document_writes.push_back(data);
    }

    /// How often the call `"port.method"` was made.
    pub fn calls(&self, call: &str) -> usize {
        lock(&self.steering).calls.get(call).copied().unwrap_or(0)
    }

    /// The twin's states by id, read past every injected failure.
    pub fn states_of(&self, twin_id: &str) -> Vec<State> {
        lock(&self.data)
            .states
            .get(twin_id)
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The group's position, read past every injected failure.
    pub fn position(&self, group: &str) -> Option<u64> {
        lock(&self.data).groups.get(group).map(|g| g.position)
    }

    /// Records the call and raises the failure injected for it, if any.
    fn enter(&self, call: &'static str) -> StoreResult<()> {
        let mut s = lock(&self.steering);
        *s.calls.entry(call).or_default() += 1;
        let port = call.split('.').next().unwrap_or(call);
        for target in [call, port] {
            if let Some(f) = s.failures.get_mut(target).and_then(VecDeque::pop_front) {
                return Err(f.error(call));
            }
        }
        Ok(())
    }

    fn data(&self) -> MutexGuard<'_, Tables> {
        lock(&self.data)
    }

    /// Lands the next interleaved document change on (twin, name).
    fn interleave_document(&self, data: &mut Tables, twin_id: &str, name: &str) {
        let Some(change) = lock(&self.steering).document_writes.pop_front() else {
            return;
        };
        let key = (twin_id.to_owned(), name.to_owned());
        match change {
            None => {
                data.documents.remove(&key);
                data.revisions.remove(&key);
            }
            Some(new) => {
                let version = data.documents.get(&key).map_or(0, |d| d.version) + 1;
                let doc = Document {
                    twin_id: twin_id.to_owned(),
                    document_name: name.to_owned(),
                    version,
                    updated: now_millis(),
                    data: new,
                };
                data.keep_revision(&doc, WriteOp::Put, &Writer::Service, u32::MAX);
                data.documents.insert(key, doc);
            }
        }
    }
}

impl Tables {
    /// The twin's states of `window` in history order.
    fn history(&self, twin_id: &str, window: &Window) -> Vec<State> {
        let mut states: Vec<State> = self
            .states
            .get(twin_id)
            .into_iter()
            .flat_map(BTreeMap::values)
            .filter(|s| window.contains(&s.created))
            .cloned()
            .collect();
        states.sort_by(history::chronological);
        states
    }

    /// Records `doc` as a revision and prunes those more than `keep` versions older.
    fn keep_revision(&mut self, doc: &Document, op: WriteOp, by: &Writer, keep: u32) {
        let kept = self
            .revisions
            .entry((doc.twin_id.clone(), doc.document_name.clone()))
            .or_default();
        let summary = VersionSummary {
            version: doc.version,
            updated: doc.updated,
            op,
            by: by.clone(),
        };
        kept.insert(doc.version, (doc.clone(), summary));
        let oldest = doc.version.saturating_sub(i64::from(keep));
        kept.retain(|v, _| *v >= oldest);
    }

    fn revisions_of(
        &self,
        twin_id: &str,
        name: &str,
    ) -> Option<&BTreeMap<i64, (Document, VersionSummary)>> {
        self.revisions.get(&(twin_id.to_owned(), name.to_owned()))
    }

    fn latest(&self, twin_id: &str) -> Option<State> {
        self.states
            .get(twin_id)
            .and_then(|s| s.last_key_value())
            .map(|(_, s)| s.clone())
    }

    fn record(&mut self, events: &[OutboxEvent]) {
        for e in events {
            self.outbox_id += 1;
            if let Ok(entry) = OutboxEntry::of(self.outbox_id, e) {
                self.outbox.push(entry);
            }
        }
    }

    fn version(&self, twin_id: &str, name: &str) -> Option<i64> {
        self.documents
            .get(&(twin_id.to_owned(), name.to_owned()))
            .map(|d| d.version)
    }
}

#[async_trait]
impl TwinRepository for Memory {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        self.enter("twins.save")?;
        let mut data = self.data();
        if data.twins.iter().any(|t| t.id == twin.id) {
            return Err(StoreError::Conflict(
                format!("twin {} exists", twin.id).into(),
            ));
        }
        data.twins.push(twin.clone());
        data.record(events);
        Ok(())
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        self.enter("twins.update")?;
        let mut data = self.data();
        let Some(stored) = data
            .twins
            .iter_mut()
            .find(|t| t.id == twin.id && t.owner == twin.owner)
        else {
            return Ok(false);
        };
        if let Some(change) = lock(&self.steering).twin_updates.pop_front() {
            change(stored);
            stored.revision += 1;
        }
        if stored.revision != expected_revision {
            return Ok(false);
        }
        *stored = twin.clone();
        data.record(events);
        Ok(true)
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        self.enter("twins.retrieve")?;
        Ok(self
            .data()
            .twins
            .iter()
            .find(|t| t.id == id && t.owner == owner)
            .cloned())
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>> {
        self.enter("twins.list")?;
        let data = self.data();
        let all: Vec<&Twin> = data
            .twins
            .iter()
            .filter(|t| listed(t, owner, filter))
            .collect();
        Ok(Page {
            total: all.len() as u64,
            offset: page.offset,
            limit: page.limit,
            items: all
                .into_iter()
                .skip(page.offset as usize)
                .take(page.limit as usize)
                .cloned()
                .collect(),
        })
    }

    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        self.enter("twins.remove")?;
        let mut data = self.data();
        let before = data.twins.len();
        data.twins.retain(|t| {
            !(t.id == id && t.owner == owner && expected_revision.is_none_or(|r| t.revision == r))
        });
        if data.twins.len() == before {
            return Ok(false);
        }
        data.states.remove(id);
        data.sequences.remove(id);
        data.documents.retain(|(twin_id, _), _| twin_id != id);
        data.revisions.retain(|(twin_id, _), _| twin_id != id);
        data.record(events);
        Ok(true)
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        self.enter("twins.ids_by_attribute")?;
        Ok(self
            .data()
            .twins
            .iter()
            .filter(|t| {
                t.current_definition().is_some_and(|d| {
                    d.attributes.iter().any(|a| {
                        a.channel == channel
                            && (a.subtopic == subtopic || a.subtopic == WILDCARD_SUBTOPIC)
                    })
                })
            })
            .map(|t| t.id.clone())
            .collect())
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        self.enter("twins.retrieve_any")?;
        Ok(self.data().twins.iter().find(|t| t.id == id).cloned())
    }

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        self.enter("twins.retrieve_many")?;
        Ok(self
            .data()
            .twins
            .iter()
            .filter(|t| ids.contains(&t.id))
            .map(|t| (t.id.clone(), Ok(t.clone())))
            .collect())
    }
}

#[async_trait]
impl StateRepository for Memory {
    async fn save(&self, state: &State) -> StoreResult<()> {
        self.enter("states.save")?;
        let mut data = self.data();
        let states = data.states.entry(state.twin_id.clone()).or_default();
        if states.contains_key(&state.id) {
            return Err(StoreError::Conflict(
                format!("state {} of {} exists", state.id, state.twin_id).into(),
            ));
        }
        states.insert(state.id, state.clone());
        Ok(())
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        self.enter("states.update")?;
        if let Some(s) = self
            .data()
            .states
            .get_mut(&state.twin_id)
            .and_then(|s| s.get_mut(&state.id))
        {
            *s = state.clone();
        }
        Ok(())
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        self.enter("states.latest")?;
        Ok(self.data().latest(twin_id))
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        self.enter("states.list")?;
        let data = self.data();
        let states = data.states.get(twin_id);
        Ok(Page {
            total: states.map_or(0, BTreeMap::len) as u64,
            offset: page.offset,
            limit: page.limit,
            items: states
                .into_iter()
                .flat_map(BTreeMap::values)
                .skip(page.offset as usize)
                .take(page.limit as usize)
                .cloned()
                .collect(),
        })
    }

    async fn range(
        &self,
        twin_id: &str,
        window: &Window,
        page: PageRequest,
    ) -> StoreResult<Page<State>> {
        self.enter("states.range")?;
        let states = self.data().history(twin_id, window);
        Ok(Page {
            total: states.len() as u64,
            offset: page.offset,
            limit: page.limit,
            items: states
                .into_iter()
                .skip(page.offset as usize)
                .take(page.limit as usize)
                .collect(),
        })
    }

    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>> {
        self.enter("states.at")?;
        let states = self.data().history(twin_id, &Window::default());
        Ok(history::in_force(&states, at).cloned())
    }

    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary> {
        self.enter("states.summary")?;
        Ok(history::summarize(&self.data().history(twin_id, window)))
    }

    async fn twin_ids_after(&self, after: &str, limit: usize) -> StoreResult<Vec<String>> {
        self.enter("states.twin_ids_after")?;
        let mut ids: Vec<String> = self
            .data()
            .twins
            .iter()
            .map(|t| t.id.clone())
            .filter(|id| id.as_str() > after)
            .collect();
        ids.sort();
        ids.truncate(limit);
        Ok(ids)
    }

    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64> {
        self.enter("states.prune")?;
        let mut data = self.data();
        let Some(states) = data.states.get_mut(twin_id) else {
            return Ok(0);
        };
        let Some(last) = states.last_key_value().map(|(id, _)| *id) else {
            return Ok(0);
        };
        let first: Vec<_> = states
            .values()
            .take(limit)
            .map(|s| (s.id, s.created))
            .collect();
        let Some(keep) = crate::store::prune_bound(&first, last, before) else {
            return Ok(0);
        };
        let before_len = states.len();
        states.retain(|id, _| *id >= keep);
        Ok((before_len - states.len()) as u64)
    }
}

#[async_trait]
impl DocumentRepository for Memory {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        self.enter("documents.list")?;
        Ok(self
            .data()
            .documents
            .values()
            .filter(|d| d.twin_id == twin_id)
            .map(DocumentSummary::from)
            .collect())
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        self.enter("documents.get")?;
        Ok(self
            .data()
            .documents
            .get(&(twin_id.to_owned(), name.to_owned()))
            .cloned())
    }

    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned> {
        self.enter("documents.write")?;
        let doc = write.doc;
        let mut data = self.data();
        self.interleave_document(&mut data, &doc.twin_id, &doc.document_name);
        let actual = data.version(&doc.twin_id, &doc.document_name);
        if actual != write.expected {
            return Ok(Versioned::Stale { actual });
        }
        data.keep_revision(doc, write.op, write.by, write.keep);
        data.documents.insert(
            (doc.twin_id.clone(), doc.document_name.clone()),
            doc.clone(),
        );
        data.record(write.events);
        Ok(Versioned::Done)
    }

    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned> {
        self.enter("documents.delete")?;
        let mut data = self.data();
        self.interleave_document(&mut data, twin_id, name);
        let actual = data.version(twin_id, name);
        if actual.is_none() || expected.is_some_and(|v| Some(v) != actual) {
            return Ok(Versioned::Stale { actual });
        }
        let key = (twin_id.to_owned(), name.to_owned());
        data.documents.remove(&key);
        data.revisions.remove(&key);
        data.record(events);
        Ok(Versioned::Done)
    }

    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>> {
        self.enter("documents.versions")?;
        let data = self.data();
        let kept = data.revisions_of(twin_id, name);
        let skip = usize::try_from(page.offset).unwrap_or(usize::MAX);
        let take = usize::try_from(page.limit).unwrap_or(usize::MAX);
        Ok(Page {
            total: kept.map_or(0, |k| k.len() as u64),
            offset: page.offset,
            limit: page.limit,
            items: kept
                .into_iter()
                .flat_map(|k| k.values().rev())
                .skip(skip)
                .take(take)
                .map(|(_, summary)| summary.clone())
                .collect(),
        })
    }

    async fn revision(
        &self,
        twin_id: &str,
        name: &str,
        version: i64,
    ) -> StoreResult<Option<Document>> {
        self.enter("documents.revision")?;
        Ok(self
            .data()
            .revisions_of(twin_id, name)
            .and_then(|k| k.get(&version))
            .map(|(doc, _)| doc.clone()))
    }

    async fn revision_at(
        &self,
        twin_id: &str,
        name: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<Document>> {
        self.enter("documents.revision_at")?;
        Ok(self
            .data()
            .revisions_of(twin_id, name)
            .and_then(|k| k.values().rev().find(|(doc, _)| doc.updated <= *at))
            .map(|(doc, _)| doc.clone()))
    }
}

#[async_trait]
impl IngestRepository for Memory {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        self.enter("ingest.lease")?;
        let now = Utc::now();
        let until = now + chrono::Duration::from_std(lease.ttl).unwrap_or(chrono::Duration::MAX);
        let mut data = self.data();
        let group = data
            .groups
            .entry(lease.group.clone())
            .or_insert_with(|| Group {
                position: lease.start,
                holder: lease.holder.clone(),
                until,
            });
        if group.holder != lease.holder && group.until >= now {
            return Ok(None);
        }
        group.holder.clone_from(&lease.holder);
        group.until = until;
        Ok(Some(group.position))
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        self.enter("ingest.release")?;
        if let Some(g) = self
            .data()
            .groups
            .get_mut(group)
            .filter(|g| g.holder == holder)
        {
            g.until = DateTime::UNIX_EPOCH;
        }
        Ok(())
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        self.enter("ingest.cursor")?;
        let data = self.data();
        Ok(IngestCursor {
            last: data.latest(twin_id),
            seq: data.sequences.get(twin_id).copied().unwrap_or(0),
        })
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        self.enter("ingest.apply")?;
        let refused = lock(&self.steering).refused.clone();
        let mut data = self.data();
        if data.groups.get(&step.group).map(|g| g.position) != Some(step.from) {
            return Ok(Applied::Fenced);
        }
        // Everything is checked before anything is written: a step is all or nothing.
        let mut conflicts = Vec::new();
        let mut inserted = HashSet::new();
        for tw in &step.twins {
            if data.sequences.get(&tw.twin_id).copied().unwrap_or(0) != tw.expected_seq {
                conflicts.push(tw.twin_id.clone());
                continue;
            }
            if !tw.writes.is_empty() && refused.contains(&tw.twin_id) {
                return Err(StoreError::Internal(
                    format!("state writes of {} violate a constraint", tw.twin_id).into(),
                ));
            }
            for w in &tw.writes {
                if let Write::Insert(s) = &w.write {
                    let exists = data
                        .states
                        .get(&s.twin_id)
                        .is_some_and(|states| states.contains_key(&s.id));
                    if exists || !inserted.insert((s.twin_id.clone(), s.id)) {
                        return Err(StoreError::Conflict(
                            format!("state {} of {} exists", s.id, s.twin_id).into(),
                        ));
                    }
                }
            }
        }
        for tw in step
            .twins
            .iter()
            .filter(|tw| !conflicts.contains(&tw.twin_id))
        {
            for w in &tw.writes {
                let s = w.write.state();
                let states = data.states.entry(s.twin_id.clone()).or_default();
                match &w.write {
                    Write::Insert(_) => {
                        states.insert(s.id, s.clone());
                    }
                    Write::Update(_) => {
                        if let Some(stored) = states.get_mut(&s.id) {
                            *stored = s.clone();
                        }
                    }
                }
            }
            data.sequences.insert(tw.twin_id.clone(), tw.new_seq());
            data.record(&tw.events);
        }
        if let Some(g) = data.groups.get_mut(&step.group)
            && conflicts.is_empty()
        {
            g.position = step.to;
        }
        Ok(Applied::Done { conflicts })
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        self.enter("ingest.rewind")?;
        let mut data = self.data();
        match data.groups.get_mut(group).filter(|g| g.position == from) {
            Some(g) => g.position = to,
            None => return Ok(Applied::Fenced),
        }
        data.sequences.clear();
        Ok(Applied::Done {
            conflicts: Vec::new(),
        })
    }
}

#[async_trait]
impl OutboxRepository for Memory {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        self.enter("outbox.pending")?;
        Ok(self.data().outbox.iter().take(limit).cloned().collect())
    }

    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        self.enter("outbox.pending")?;
        let data = self.data();
        let later = data.outbox.iter().filter(|e| e.id > after);
        Ok(later.take(limit).cloned().collect())
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        self.enter("outbox.relayed")?;
        self.data().outbox.retain(|e| !ids.contains(&e.id));
        Ok(())
    }

    async fn backlog(&self) -> StoreResult<u64> {
        self.enter("outbox.backlog")?;
        Ok(self.data().outbox.len() as u64)
    }
}

#[async_trait]
impl HealthCheck for Memory {
    async fn ping(&self) -> StoreResult<()> {
        self.enter("health.ping")
    }
}

/// A dead-letter port that keeps what it is given, or refuses it when told to.
#[derive(Default)]
pub struct RecordingSetAside {
    kept: Mutex<Vec<Rejected>>,
    failures: Mutex<usize>,
}

impl RecordingSetAside {
    /// The next `times` calls fail as a broker outage would.
    pub fn fail(&self, times: usize) {
        *lock(&self.failures) += times;
    }

    /// Everything set aside so far, in order.
    pub fn kept(&self) -> Vec<Rejected> {
        lock(&self.kept).clone()
    }
}

#[async_trait]
impl SetAside for RecordingSetAside {
    async fn set_aside(&self, rejected: &[Rejected]) -> Result<(), IngestError> {
        let mut failures = lock(&self.failures);
        if *failures > 0 {
            *failures -= 1;
            return Err(IngestError::Transient(
                "dead-letter stream unreachable".into(),
            ));
        }
        lock(&self.kept).extend_from_slice(rejected);
        Ok(())
    }
}

/// A notification port that keeps what it is given: `(twin, operation, outcome)`.
#[derive(Default)]
pub struct RecordingPublish {
    published: Mutex<Vec<(String, String, Outcome)>>,
}

impl RecordingPublish {
    /// Everything published so far, in order.
    pub fn published(&self) -> Vec<(String, String, Outcome)> {
        lock(&self.published).clone()
    }
}

#[async_trait]
impl Publish for RecordingPublish {
    async fn publish(&self, twin_id: &str, op: &str, outcome: Outcome) {
        lock(&self.published).push((twin_id.to_owned(), op.to_owned(), outcome));
    }
}

mod tests {
    //! The fake's own contract, where the use-case tests lean on it.

    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::store::{SeqWrite, TwinWrites};

    fn state(twin_id: &str, id: i64) -> State {
        State {
            twin_id: twin_id.into(),
            id,
            definition: 0,
            created: DateTime::UNIX_EPOCH,
            payload: Map::new(),
        }
    }

    fn step(from: u64, to: u64, twin_id: &str, expected_seq: u64, id: i64) -> IngestStep {
        IngestStep {
            group: "g".into(),
            from,
            to,
            twins: vec![TwinWrites {
                twin_id: twin_id.into(),
                expected_seq,
                writes: vec![SeqWrite {
                    write: Write::Insert(state(twin_id, id)),
                    seq: to,
                }],
                events: Vec::new(),
                last_break: None,
            }],
        }
    }

    async fn leased(db: &Arc<Memory>) -> Store {
        let store = db.store();
        let lease = Lease {
            group: "g".into(),
            holder: "h".into(),
            ttl: Duration::from_secs(60),
            start: 0,
        };
        assert_eq!(store.ingest.lease(&lease).await.unwrap(), Some(0));
        store
    }

    #[tokio::test]
    async fn injected_failures_hit_the_named_call_then_stop() {
        let db = Memory::new();
        let store = db.store();
        db.fail("health", Failure::Unavailable, 1);
        db.fail("documents.get", Failure::Conflict, 1);
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(store.ping().await.is_ok());
        assert!(store.documents.list("t").await.is_ok());
        assert!(matches!(
            store.documents.get("t", "d").await,
            Err(StoreError::Conflict(_))
        ));
        assert!(store.documents.get("t", "d").await.is_ok());
        assert_eq!(db.calls("health.ping"), 2);
    }

    #[tokio::test]
    async fn a_step_moves_only_from_the_position_and_is_all_or_nothing() {
        let db = Memory::new();
        let store = leased(&db).await;
        assert_eq!(
            store.ingest.apply(&step(1, 2, "t", 0, 0)).await.unwrap(),
            Applied::Fenced
        );
        assert_eq!(
            store.ingest.apply(&step(0, 2, "t", 0, 0)).await.unwrap(),
            Applied::Done { conflicts: vec![] }
        );
        // Inserting an existing state fails the whole step: the position stays.
        let err = store
            .ingest
            .apply(&step(2, 3, "t", 2, 0))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err}");
        assert_eq!(db.position("g"), Some(2));
        // A stale sequence is a conflict; the position waits for the redo.
        assert_eq!(
            store.ingest.apply(&step(2, 3, "t", 0, 1)).await.unwrap(),
            Applied::Done {
                conflicts: vec!["t".into()]
            }
        );
        assert_eq!(db.position("g"), Some(2));
        assert_eq!(db.states_of("t"), vec![state("t", 0)]);
        assert_eq!(
            store.ingest.rewind("g", 2, 0).await.unwrap(),
            Applied::Done { conflicts: vec![] }
        );
        assert_eq!(store.ingest.cursor("t").await.unwrap().seq, 0);
    }

    #[tokio::test]
    async fn refused_twins_fail_every_step_that_writes_them() {
        let db = Memory::new();
        let store = leased(&db).await;
        db.refuse_writes_of("bad");
        let err = store
            .ingest
            .apply(&step(0, 1, "bad", 0, 0))
            .await
            .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert_eq!(db.position("g"), Some(0));
        assert!(store.ingest.apply(&step(0, 1, "good", 0, 0)).await.is_ok());
    }

    #[tokio::test]
    async fn interleaved_writers_land_before_the_compare() {
        let db = Memory::new();
        let store = db.store();
        let doc = Document {
            twin_id: "t".into(),
            document_name: "d".into(),
            version: 1,
            updated: DateTime::UNIX_EPOCH,
            data: Map::new(),
        };
        db.interleave_document_write(Some(json!({"k": 1}).as_object().cloned().unwrap()));
        let write = DocumentWrite {
            doc: &doc,
            expected: None,
            op: WriteOp::Create,
            by: &Writer::Service,
            keep: 1,
            events: &[],
        };
        assert_eq!(
            store.documents.write(&write).await.unwrap(),
            Versioned::Stale { actual: Some(1) }
        );
        db.interleave_document_write(None);
        assert_eq!(
            store.documents.delete("t", "d", Some(1)).await.unwrap(),
            Versioned::Stale { actual: None }
        );
    }
}

/// The ingestion log of `inner`, whose lease call number `silent` (counted from 0) never
/// answers, as from a store connection that went silent; every other call goes through.
pub struct SilentLease {
    inner: Arc<Memory>,
    calls: std::sync::atomic::AtomicUsize,
    silent: usize,
}

impl SilentLease {
    pub fn new(inner: Arc<Memory>, silent: usize) -> Self {
        Self {
            inner,
            calls: Default::default(),
            silent,
        }
    }

    /// Lease calls made so far, the silent one included.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
}

#[async_trait]
impl IngestRepository for SilentLease {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == self.silent {
            std::future::pending::<()>().await;
        }
        self.inner.lease(lease).await
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        self.inner.release(group, holder).await
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        self.inner.cursor(twin_id).await
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        self.inner.apply(step).await
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        self.inner.rewind(group, from, to).await
    }
}
