//! Persistence of twins and states behind backend-neutral traits.
//!
//! Every twin query made on behalf of a client takes the owner, so a foreign twin is
//! indistinguishable from a missing one at this level already. Backends: `sqlite`
//! (embedded default), `mongo` (the Go service's database) and `postgres` (several
//! instances on the database an operator already runs); the two SQL stores share their
//! statements through `sql`. `tests/store_conformance.rs` runs one suite against each.

pub mod mongo;
pub mod postgres;
pub mod sql;
pub mod sqlite;
pub mod traced;
pub mod transfer;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::domain::document::{Document, DocumentSummary, VersionSummary, WriteOp, Writer};
use crate::domain::feed::{ChangeEvent, EventKind};
use crate::domain::history::{AttributeSummary, Summary, Window};

use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::twin::Twin;
pub use crate::domain::twin::TwinFilter;
use crate::domain::{Page, PageRequest};

pub use crate::error::Cause;

/// Why a store operation failed. Each kind keeps the backend's error as its source.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend cannot be reached, is busy or cannot write now (full disk); the same
    /// operation may succeed later.
    #[error("store unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// A write collided with an existing key.
    #[error("duplicate key: {0}")]
    Conflict(#[source] Cause),
    /// Anything else: a bug or corrupt data, logged and never shown to clients.
    #[error("store failure: {0}")]
    Internal(#[source] Cause),
}

impl StoreError {
    /// Whether trying the same operation again later can succeed (the backend was
    /// unreachable, busy or out of space), as opposed to a write that can never be made.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Most ids one query of [`TwinRepository::retrieve_many`] names: within SQLite's bound
/// on parameters, and a filter of bounded size on the other backends.
const MANY: usize = 500;

/// Twins. Each write takes the change events it makes ([`OutboxEvent`]) and records them
/// in the outbox in the same durable step, or neither happens; the plain `save`,
/// `update` and `remove` record none.
#[async_trait]
pub trait TwinRepository: Send + Sync {
    /// Inserts a new twin.
    async fn save(&self, twin: &Twin) -> StoreResult<()> {
        self.save_recorded(twin, &[]).await
    }
    /// Inserts a new twin and records `events` with it.
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()>;
    /// Replaces the twin with the same id and owner if its stored revision is still
    /// `expected_revision`; false when there is no such twin (missing, foreign or
    /// changed meanwhile).
    async fn update(&self, twin: &Twin, expected_revision: i64) -> StoreResult<bool> {
        self.update_recorded(twin, expected_revision, &[]).await
    }
    /// [`update`](Self::update), recording `events` when it happens.
    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool>;
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
    async fn remove(&self, owner: &str, id: &str) -> StoreResult<bool> {
        self.remove_recorded(owner, id, None, &[]).await
    }
    /// [`remove`](Self::remove), only while the stored revision is `expected_revision`
    /// (any when None), recording `events` when it happens.
    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool>;
    /// Ids of twins whose current definition has an attribute on `channel` with this
    /// subtopic or the wildcard subtopic. Used by ingestion, which acts for every owner.
    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>>;
    /// The twin with this id whoever owns it. Used by ingestion only.
    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>>;
    /// The twins with these ids whoever owns them, as stored now: each found twin with
    /// its own decoding result (a corrupt twin fails alone), missing ids absent. Err only
    /// when the read as a whole failed. Used by ingestion, once per batch, so that a
    /// twin changed through any instance is seen by the next batch. Backends answer in
    /// one round trip; this default asks twin by twin.
    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        retrieve_one_by_one(self, ids).await
    }
}

/// A page of `rows` decoded with `decode`, with the total of the whole listing: what every
/// store's listing answers.
pub(crate) fn page_of<R, T>(
    total: u64,
    request: PageRequest,
    rows: &[R],
    decode: impl Fn(&R) -> StoreResult<T>,
) -> StoreResult<Page<T>> {
    Ok(Page {
        total,
        offset: request.offset,
        limit: request.limit,
        items: rows.iter().map(decode).collect::<StoreResult<_>>()?,
    })
}

/// [`TwinRepository::retrieve_many`] for a backend whose query `read` answers for at most
/// [`MANY`] ids: the twins it found, each with its own decoding result.
pub(crate) async fn many_in_chunks<'a, F, Fut>(
    ids: &'a [String],
    mut read: F,
) -> StoreResult<HashMap<String, StoreResult<Twin>>>
where
    F: FnMut(&'a [String]) -> Fut,
    Fut: std::future::Future<Output = StoreResult<Vec<(String, StoreResult<Twin>)>>>,
{
    let mut found = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MANY) {
        found.extend(read(chunk).await?);
    }
    Ok(found)
}

/// [`TwinRepository::retrieve_many`] made of one [`TwinRepository::retrieve_any`] per
/// id: the default, and what a caller falls back to when the one read failed for good
/// (so that one twin that cannot be read does not stop the others).
pub async fn retrieve_one_by_one<R: TwinRepository + ?Sized>(
    twins: &R,
    ids: &[String],
) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
    let mut found = HashMap::with_capacity(ids.len());
    for id in ids {
        match twins.retrieve_any(id).await {
            Ok(Some(twin)) => {
                found.insert(id.clone(), Ok(twin));
            }
            Ok(None) => {}
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                found.insert(id.clone(), Err(e));
            }
        }
    }
    Ok(found)
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
    /// A page of the twin's states in `window`, in history order (created, then id),
    /// with the number of states in the window; through the (twin, created) index.
    async fn range(
        &self,
        twin_id: &str,
        window: &Window,
        page: PageRequest,
    ) -> StoreResult<Page<State>>;
    /// The state in force at `at` ([`in_force`](crate::domain::history::in_force)), found through the (twin,
    /// created) index.
    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>>;
    /// The states of `window` summarised ([`summarize`](crate::domain::history::summarize)), aggregated in the
    /// store: what comes back is one row per attribute, whatever the number of states.
    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary>;
    /// Ids of twins in id order after `after` (`""` for the first), at most `limit`:
    /// how retention walks every twin a page at a time.
    async fn twin_ids_after(&self, after: &str, limit: usize) -> StoreResult<Vec<String>>;
    /// Deletes at most `limit` of the twin's oldest states created before `before`,
    /// never its latest state, and says how many went. States go from the first id on:
    /// one goes once it and every state before it are older than `before`, so a twin's
    /// ids stay one gap-free run and a plain page is still found by id (an out-of-order
    /// old state waits for the newer ones before it).
    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64>;
}

/// How many of a twin's states [`StateRepository::prune`] may delete, given its first
/// states `(id, created)` in id order (at most the batch) and its latest id: the
/// exclusive upper id of the run to delete, None when nothing goes.
pub fn prune_bound(
    first: &[(i64, DateTime<Utc>)],
    latest: i64,
    before: &DateTime<Utc>,
) -> Option<i64> {
    let keep = first
        .iter()
        .find(|(id, created)| *id >= latest || created >= before)
        .map_or_else(
            || first.last().map_or(latest, |(id, _)| id + 1),
            |(id, _)| *id,
        )
        .min(latest);
    first.first().filter(|(id, _)| *id < keep).map(|_| keep)
}

/// One attribute as a store aggregates it: what [`AttributeSummary`] needs but `first`
/// and `last`, and where to find those (the `created` of the first and last states of
/// the window that have the attribute).
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub name: String,
    pub count: u64,
    pub min: Value,
    pub max: Value,
    pub mean: Option<f64>,
    pub first_created: i64,
    pub last_created: i64,
}

/// A [`Summary`] from a store's aggregates; `value_at(name, created, last)` reads the
/// attribute's value in the state created then that has it (the one with the smallest
/// id, or the greatest when `last`): one indexed lookup per attribute and end.
pub async fn assemble_summary<F, Fut>(
    states: u64,
    aggregates: Vec<Aggregate>,
    mut value_at: F,
) -> StoreResult<Summary>
where
    F: FnMut(String, i64, bool) -> Fut,
    Fut: std::future::Future<Output = StoreResult<Option<Value>>>,
{
    let mut attributes = std::collections::BTreeMap::new();
    for a in aggregates {
        let first = value_at(a.name.clone(), a.first_created, false).await?;
        let last = value_at(a.name.clone(), a.last_created, true).await?;
        attributes.insert(
            a.name,
            AttributeSummary {
                count: a.count,
                first: first.unwrap_or(Value::Null),
                last: last.unwrap_or(Value::Null),
                min: a.min,
                max: a.max,
                mean: a.mean.filter(|m| m.is_finite()),
            },
        );
    }
    Ok(Summary { states, attributes })
}

/// The ingestion log of an instance group: who may ingest (a lease), how far the group
/// has applied the stream (its position), and the application of a run of messages.
///
/// The position moves in the same durable step as the states it covers wherever the
/// backend has transactions; where it has not (MongoDB without a replica set), each
/// state carries the stream sequence that wrote it and the position follows the states,
/// so a replay from an older position skips what a twin already has.
#[async_trait]
pub trait IngestRepository: Send + Sync {
    /// Takes or renews the group's lease for `lease.holder` until `ttl` from now. Some
    /// position when the holder has the lease (a group seen for the first time starts
    /// at `lease.start`); None while another holder's lease runs.
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>>;
    /// Gives the lease up at once, if `holder` has it.
    async fn release(&self, group: &str, holder: &str) -> StoreResult<()>;
    /// The twin's latest state with the stream sequence of the last message that
    /// changed it: where its ingestion resumes.
    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor>;
    /// Applies the state writes of several twins and moves the group's position from
    /// `step.from` to `step.to`. [`Applied::Fenced`] when the position was no longer
    /// `from` (another holder moved it): nothing that was not already true is claimed.
    /// A twin whose stored sequence is no longer its `expected_seq` is left untouched
    /// and returned, for the caller to redo from a fresh cursor. A store that records
    /// the step's events last in its transaction stamps them with that moment, the
    /// closest it knows to their commit; others keep the caller's stamp.
    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied>;
    /// Moves the group's position back from `from` to `to` and forgets every twin's
    /// sequence: the stream was recreated and numbers its messages again from 1.
    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied>;
}

/// A request for the group's ingestion lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub group: String,
    pub holder: String,
    pub ttl: Duration,
    /// Position of a group that has none yet (the stream's last sequence: a new group
    /// starts with new messages).
    pub start: u64,
}

/// One durable step of ingestion.
#[derive(Debug, Clone, PartialEq)]
pub struct IngestStep {
    pub group: String,
    /// The group's position the writes were computed from.
    pub from: u64,
    /// The position after this step (the last stream sequence it covers).
    pub to: u64,
    pub twins: Vec<TwinWrites>,
}

/// What [`IngestRepository::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The twins without a conflict were written. The position moved to `to` only when
    /// no twin conflicted; otherwise it stays at `from`, so that the conflicting twins'
    /// messages are never passed before they are applied (the caller redoes them in a
    /// step from `from`).
    Done { conflicts: Vec<String> },
    /// The group's position was not `from`: another holder is ingesting.
    Fenced,
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

/// A version-checked document write, with how and by whom it was made.
#[derive(Debug, Clone, Copy)]
pub struct DocumentWrite<'a> {
    /// The document as it will be; `doc.version` is the new version.
    pub doc: &'a Document,
    /// The stored version the write is conditional on (None: the document must not
    /// exist yet).
    pub expected: Option<i64>,
    pub op: WriteOp,
    pub by: &'a Writer,
    /// Earlier revisions to keep besides the new version; older ones are pruned.
    pub keep: u32,
    /// Change events recorded in the outbox with the write.
    pub events: &'a [OutboxEvent],
}

impl DocumentWrite<'_> {
    /// The oldest version kept once this write is made.
    pub fn oldest_kept(&self) -> i64 {
        self.doc.version.saturating_sub(i64::from(self.keep))
    }
}

/// Named, versioned documents of a twin. Each write is one atomic compare-and-set on the
/// version, so concurrent conditional writes never both succeed.
///
/// Every write also records the new version as a revision (data, time, how and by
/// whom) in the same atomic step, and prunes revisions older than `keep` versions back:
/// a document's kept revisions are always its newest versions, the current one
/// included. Deleting a document (or its twin) deletes its revisions.
#[async_trait]
pub trait DocumentRepository: Send + Sync {
    /// The twin's documents by name.
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>>;
    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>>;
    /// Stores `write.doc` and its revision if the stored version is `write.expected`.
    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned>;
    /// Deletes the document and its revisions if its version is `expected` (any version
    /// when None).
    async fn delete(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
    ) -> StoreResult<Versioned> {
        self.delete_recorded(twin_id, name, expected, &[]).await
    }
    /// [`delete`](Self::delete), recording `events` in the outbox when it happens.
    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned>;
    /// A page of the document's kept revisions, newest first, with how many are kept.
    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>>;
    /// The kept revision `version` of the document, as it was.
    async fn revision(
        &self,
        twin_id: &str,
        name: &str,
        version: i64,
    ) -> StoreResult<Option<Document>>;
    /// The newest kept revision written at or before `at`.
    async fn revision_at(
        &self,
        twin_id: &str,
        name: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<Document>>;
}

/// Where ingestion stands for one twin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IngestCursor {
    pub last: Option<State>,
    /// Stream sequence of the last message applied; 0 before the first.
    pub seq: u64,
}

/// State writes of one twin from a run of messages, with the sequence guard.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TwinWrites {
    pub twin_id: String,
    /// The twin's stored sequence the writes were computed from.
    pub expected_seq: u64,
    /// At most one write per state id, in id order, each with the stream sequence of
    /// the last message that made it (increasing).
    pub writes: Vec<SeqWrite>,
    /// Change events recorded in the outbox with the writes, when they are made.
    pub events: Vec<OutboxEvent>,
    /// The greatest id among the new states created before the state before them
    /// ([`crate::domain::history::last_break`] of the stored latest state and the
    /// writes): the store keeps the twin's greatest such id, so that a history in time
    /// order is known to be one.
    pub last_break: Option<i64>,
}

impl TwinWrites {
    /// The twin's sequence once the writes are applied.
    pub fn new_seq(&self) -> u64 {
        self.writes.last().map_or(self.expected_seq, |w| w.seq)
    }
}

/// A state write and the stream sequence of the last message folded into it.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqWrite {
    pub write: Write,
    pub seq: u64,
}

/// A change event as a write hands it to the store, recorded in the outbox in the
/// write's durable step (SPEC 12).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEvent {
    /// Unique across every store and instance that may share a broker (a random UUID):
    /// the stream's `Nats-Msg-Id`, so that publishing it again is de-duplicated.
    pub msg_id: String,
    /// The twin's owner, whose key the subject carries.
    pub owner: String,
    pub event: ChangeEvent,
}

impl OutboxEvent {
    /// A new event of `owner`'s twin with a fresh message id.
    pub fn new(owner: &str, event: ChangeEvent) -> Self {
        Self {
            msg_id: uuid::Uuid::new_v4().simple().to_string(),
            owner: owner.to_owned(),
            event,
        }
    }

    /// The subject the event is published on.
    pub fn subject(&self) -> String {
        crate::domain::feed::subject(&self.owner, &self.event.twin_id, self.event.kind)
    }

    /// The event as stored on the stream.
    pub fn payload(&self) -> StoreResult<String> {
        serde_json::to_string(&self.event).map_err(|e| StoreError::Internal(e.into()))
    }

    /// [`payload`](Self::payload) stamped with `time` instead of the event's own.
    pub fn payload_at(&self, time: DateTime<Utc>) -> StoreResult<String> {
        self.event
            .to_json_at(time)
            .map_err(|e| StoreError::Internal(e.into()))
    }

    /// The event from a stored payload.
    pub fn decode(msg_id: String, owner: String, payload: &str) -> StoreResult<Self> {
        let event = serde_json::from_str(payload).map_err(corrupt_entry)?;
        Ok(Self {
            msg_id,
            owner,
            event,
        })
    }
}

/// An outbox entry waiting to be relayed: the event as stored, published as it is (the
/// relay reads only what it needs of it).
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    /// Its place in the outbox: entries are relayed in increasing id order, which is
    /// the order their writes committed in for any one twin.
    pub id: i64,
    pub msg_id: String,
    pub owner: String,
    /// The event's twin and kind, read from the payload: its subject and its queue.
    pub twin_id: String,
    pub kind: EventKind,
    /// The event's time stamp, read from the payload: the relay's lag is measured
    /// from it.
    pub time: DateTime<Utc>,
    /// The event's JSON as stored, the stream message's body.
    pub payload: String,
}

impl OutboxEntry {
    /// An entry from its stored columns; of the payload, only the twin and the kind are
    /// decoded.
    pub fn stored(id: i64, msg_id: String, owner: String, payload: String) -> StoreResult<Self> {
        #[derive(serde::Deserialize)]
        struct Head {
            kind: EventKind,
            twin_id: String,
            time: DateTime<Utc>,
        }
        let head: Head = serde_json::from_str(&payload).map_err(corrupt_entry)?;
        Ok(Self {
            id,
            msg_id,
            owner,
            twin_id: head.twin_id,
            kind: head.kind,
            time: head.time,
            payload,
        })
    }

    /// The entry of `event` at `id`.
    pub fn of(id: i64, event: &OutboxEvent) -> StoreResult<Self> {
        Ok(Self {
            id,
            msg_id: event.msg_id.clone(),
            owner: event.owner.clone(),
            twin_id: event.event.twin_id.clone(),
            kind: event.event.kind,
            time: event.event.time,
            payload: event.payload()?,
        })
    }

    /// The whole event.
    pub fn event(&self) -> StoreResult<OutboxEvent> {
        OutboxEvent::decode(self.msg_id.clone(), self.owner.clone(), &self.payload)
    }

    /// The subject the event is published on.
    pub fn subject(&self) -> String {
        crate::domain::feed::subject(&self.owner, &self.twin_id, self.kind)
    }
}

fn corrupt_entry(e: serde_json::Error) -> StoreError {
    StoreError::Internal(format!("corrupt outbox entry: {e}").into())
}

/// The outbox as the relay sees it.
#[async_trait]
pub trait OutboxRepository: Send + Sync {
    /// The oldest pending entries, in id order, at most `limit`.
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>>;
    /// The oldest pending entries with an id above `after`, in id order, at most
    /// `limit`: what was recorded since the entry `after` was read. Where ids are drawn
    /// before the commit (PostgreSQL, MongoDB), an entry may commit after one with a
    /// larger id was read, so a reader also reads from the start ([`Self::pending`])
    /// now and then.
    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>>;
    /// Removes entries once the stream holds them.
    async fn relayed(&self, ids: &[i64]) -> StoreResult<()>;
    /// How many entries are pending.
    async fn backlog(&self) -> StoreResult<u64>;
}

/// The repositories of one backend, shared by the services.
#[derive(Clone)]
pub struct Store {
    pub twins: Arc<dyn TwinRepository>,
    pub states: Arc<dyn StateRepository>,
    pub documents: Arc<dyn DocumentRepository>,
    pub ingest: Arc<dyn IngestRepository>,
    /// The change events recorded with the writes, until they are relayed.
    pub outbox: Arc<dyn OutboxRepository>,
    /// Bulk copy for `twins migrate`; the SQL stores have it.
    pub transfer: Option<Arc<dyn transfer::Transfer>>,
    /// Rung by the services of this process after each write that recorded events.
    pub recorded: Recorded,
    health: Arc<dyn HealthCheck>,
}

/// Takes or renews `lease` through `repo`, failing when the store does not answer
/// within the lease's own duration: by then the lease may have passed to another
/// holder, and its holder (ingestion, the change feed relay) must not wait on it
/// silently.
pub async fn lease_within(
    repo: &dyn IngestRepository,
    lease: &Lease,
) -> Result<Option<u64>, crate::error::Cause> {
    match tokio::time::timeout(lease.ttl, repo.lease(lease)).await {
        Ok(taken) => Ok(taken?),
        Err(_) => Err(format!(
            "the store did not answer the lease {} within {:?}",
            lease.group, lease.ttl
        )
        .into()),
    }
}

/// Tells the change feed relay of this process that a write recorded events, so that
/// it reads the outbox at once rather than at its next look. Writes of other
/// processes are found by the looks alone.
///
/// A store that knows the ids its step gave the events it recorded also hands the
/// entries over ([`Recorded::hand_over`]) once the step committed: the relay takes them
/// instead of reading them back when they follow the last entry it read with no id
/// between ([`Recorded::take_after`]); otherwise it reads the outbox as before. At
/// most [`HANDED_MAX`] entries wait; older ones are dropped (the outbox holds them).
#[derive(Clone, Default)]
pub struct Recorded {
    ring: Arc<tokio::sync::Notify>,
    handed: Arc<std::sync::Mutex<VecDeque<OutboxEntry>>>,
}

/// Most entries handed over and not yet taken.
pub const HANDED_MAX: usize = 4096;

impl Recorded {
    /// After a write that recorded events has committed. Rings left unheard while the
    /// relay is busy fold into one.
    pub fn ring(&self) {
        self.ring.notify_one();
    }

    /// Completes at the next ring, or at once when one came since the last.
    pub async fn rung(&self) {
        self.ring.notified().await;
    }

    /// Hands over the entries a committed step recorded, in id order; does not ring.
    pub fn hand_over(&self, entries: Vec<OutboxEntry>) {
        let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
        // A step whose ids do not follow what waits leaves a gap the relay must read
        // anyway: what waits before it is of no use.
        if let (Some(last), Some(first)) = (handed.back(), entries.first())
            && first.id != last.id + 1
        {
            handed.clear();
        }
        handed.extend(entries);
        let over = handed.len().saturating_sub(HANDED_MAX);
        handed.drain(..over);
    }

    /// Up to `max` handed-over entries that follow `last` without a gap, in id order;
    /// empty when the first waiting entry after `last` does not have id `last + 1`
    /// (the relay then reads the outbox). Entries at or below `last` are dropped.
    pub fn take_after(&self, last: i64, max: usize) -> Vec<OutboxEntry> {
        let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
        while handed.front().is_some_and(|e| e.id <= last) {
            handed.pop_front();
        }
        if handed.front().is_none_or(|e| e.id != last + 1) {
            return Vec::new();
        }
        let n = max.min(handed.len());
        handed.drain(..n).collect()
    }
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
        ingest: Arc<dyn IngestRepository>,
        outbox: Arc<dyn OutboxRepository>,
        health: Arc<dyn HealthCheck>,
    ) -> Self {
        Self {
            twins: Arc::new(traced::Traced(twins)),
            states: Arc::new(traced::Traced(states)),
            documents: Arc::new(traced::Traced(documents)),
            ingest: Arc::new(traced::Traced(ingest)),
            outbox: Arc::new(traced::Traced(outbox)),
            transfer: None,
            recorded: Recorded::default(),
            health: Arc::new(traced::Traced(health)),
        }
    }

    /// The store of a backend that is every port at once, with bulk copy.
    fn of_backend<B>(backend: Arc<B>) -> Self
    where
        B: TwinRepository
            + StateRepository
            + DocumentRepository
            + IngestRepository
            + OutboxRepository
            + HealthCheck
            + transfer::Transfer
            + 'static,
    {
        let mut store = Self::new(
            backend.clone(),
            backend.clone(),
            backend.clone(),
            backend.clone(),
            backend.clone(),
            backend.clone(),
        );
        store.transfer = Some(backend);
        store
    }

    pub async fn ping(&self) -> StoreResult<()> {
        self.health.ping().await
    }

    /// Opens the backend named by the URL scheme, with the default pool size.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, postgres::DEFAULT_POOL_SIZE).await
    }

    /// Opens the backend named by the URL scheme; `pool_size` bounds the connections of
    /// a PostgreSQL store.
    pub async fn connect_with(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            let s = Arc::new(sqlite::SqliteStore::open(path).await?);
            let recorded = s.recorded();
            let mut store = Self::of_backend(s);
            store.recorded = recorded;
            return Ok(store);
        }
        if url.starts_with("mongodb://") || url.starts_with("mongodb+srv://") {
            let s = Arc::new(mongo::MongoStore::connect(url).await?);
            return Ok(Self::of_backend(s));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let s = Arc::new(postgres::PostgresStore::connect(url, pool_size).await?);
            return Ok(Self::of_backend(s));
        }
        Err(StoreError::Internal(
            format!(
                "unsupported database URL scheme in {} (expected sqlite://, mongodb:// or postgres://)",
                crate::error::redact_url(url)
            )
            .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: i64) -> OutboxEntry {
        OutboxEntry {
            id,
            msg_id: format!("m{id}"),
            owner: "o".into(),
            twin_id: "t".into(),
            kind: EventKind::StateCreated,
            time: Utc::now(),
            payload: "{}".into(),
        }
    }

    fn ids(entries: Vec<OutboxEntry>) -> Vec<i64> {
        entries.into_iter().map(|e| e.id).collect()
    }

    #[test]
    fn handed_over_entries_are_taken_only_right_after_the_last_read_and_bounded() {
        let r = Recorded::default();
        r.hand_over((1..=3).map(entry).collect());
        assert!(
            r.take_after(5, 10).is_empty(),
            "entries read already are dropped"
        );
        r.hand_over((6..=9).map(entry).collect());
        assert!(r.take_after(4, 10).is_empty(), "6 does not follow 4");
        assert_eq!(ids(r.take_after(5, 2)), [6, 7]);
        assert_eq!(ids(r.take_after(7, 10)), [8, 9]);
        // A step that does not follow what waits makes it useless: dropped.
        r.hand_over(vec![entry(10)]);
        r.hand_over(vec![entry(12)]);
        assert!(r.take_after(9, 10).is_empty());
        assert_eq!(ids(r.take_after(11, 10)), [12]);
        // At most HANDED_MAX wait: the oldest go.
        let n = HANDED_MAX as i64 + 5;
        r.hand_over((13..13 + n).map(entry).collect());
        assert!(r.take_after(12, usize::MAX).is_empty());
        let kept = ids(r.take_after(17, usize::MAX));
        assert_eq!(kept.len(), HANDED_MAX);
        assert_eq!(kept.first(), Some(&18));
    }

    #[test]
    fn an_outbox_entry_is_published_as_stored_and_decodes_to_its_event() {
        let event = OutboxEvent::new(
            "alice",
            ChangeEvent {
                kind: EventKind::DocumentPatched,
                twin_id: "t".into(),
                time: Utc::now(),
                old: Some(serde_json::json!({ "twin_id": "other", "kind": "twin.created" })),
                new: None,
            },
        );
        let entry = OutboxEntry::of(7, &event).unwrap();
        let stored = OutboxEntry::stored(
            7,
            event.msg_id.clone(),
            "alice".into(),
            entry.payload.clone(),
        )
        .unwrap();
        assert_eq!(stored, entry);
        // The head comes from the event's own fields, not from its values'.
        assert_eq!(
            (stored.twin_id.as_str(), stored.kind, stored.time),
            ("t", EventKind::DocumentPatched, event.event.time)
        );
        assert_eq!(stored.subject(), event.subject());
        assert_eq!(stored.event().unwrap(), event);
        assert!(OutboxEntry::stored(8, "m".into(), "o".into(), "{\"kind\":1}".into()).is_err());
    }
}
