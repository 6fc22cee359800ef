//! MongoDB backend, reading and writing the collections of the Go twins service.
//!
//! Operators switching from the Go service keep their database: `twins` and `states`
//! hold documents in the Go service's shape ([`codec`]), so either service can read what
//! the other wrote. Our additions live beside them (`documents`, `ingest_groups`, a `seq`
//! field on states) and the Go service never looks at them. Every query is one of the plain filters of
//! [`filters`]; the conformance suite in `tests/store_conformance.rs` runs the same cases
//! here and on SQLite.
//!
//! Standalone MongoDB has no multi-document transactions, so each method is a short
//! sequence of single-document atomic operations, ordered so that a failure half-way
//! leaves nothing a client could see as wrong (see `remove` and [`ingest`]).

mod codec;
mod filters;
mod ingest;
mod outbox;
mod transfer;

use outbox::Check;

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bson::{Document, doc};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use mongodb::error::{ErrorKind, RETRYABLE_WRITE_ERROR, TRANSIENT_TRANSACTION_ERROR, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};

use super::{
    DocumentRepository, DocumentWrite, HealthCheck, OutboxEvent, StateRepository, StoreError,
    StoreResult, TwinFilter, TwinRepository, Versioned,
};
use crate::domain::document::{Document as TwinDocument, DocumentSummary, VersionSummary};
use crate::domain::history::{Summary, Window};
use crate::domain::sampling::Write;
use crate::domain::state::State;
use crate::domain::twin::Twin;
use crate::domain::{Page, PageRequest};

/// Database used when the URL names none, as in the Go service.
pub const DEFAULT_DATABASE: &str = "magistrala";
/// How long an operation waits for a reachable server before failing as unavailable,
/// unless the URL sets `serverSelectionTimeoutMS`. The driver's 30 s would hold API
/// requests and `/health` far longer than a client waits.
const SERVER_SELECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Most earlier revisions a document's record keeps, whatever is configured: each is at
/// most the 64 KiB document limit as JSON text, so 201 of them and the current data (at
/// most about 0.5 MiB as BSON) stay well within MongoDB's 16 MiB per record.
pub const MAX_KEPT: u32 = 200;

/// Duplicate key on a unique index.
const DUPLICATE_KEY: i32 = 11000;

/// Server error codes that mean "not now" rather than "never": the node is stepping
/// down, shutting down, or timed out.
const TRANSIENT_CODES: &[i32] = &[
    6, 7, 50, 89, 91, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
];

/// The collections of one database.
pub struct MongoStore {
    db: Database,
    twins: Collection<Document>,
    states: Collection<Document>,
    documents: Collection<Document>,
    cursors: Collection<Document>,
    /// The outbox's first entry when the relay last found it not ready (see
    /// [`outbox`]'s `pending`).
    blocked_head: std::sync::Mutex<Option<i64>>,
}

impl MongoStore {
    /// Connects to the deployment at `url` (database from the URL path, default
    /// `magistrala`) and creates the indexes that are missing.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let mut options = ClientOptions::parse(url).await.map_err(map_err)?;
        options
            .server_selection_timeout
            .get_or_insert(SERVER_SELECTION_TIMEOUT);
        options.app_name.get_or_insert_with(|| "twins".into());
        let name = options
            .default_database
            .clone()
            .unwrap_or_else(|| DEFAULT_DATABASE.into());
        let db = Client::with_options(options)
            .map_err(map_err)?
            .database(&name);
        let store = Self {
            twins: db.collection(filters::TWINS),
            states: db.collection(filters::STATES),
            documents: db.collection(filters::DOCUMENTS),
            cursors: db.collection(filters::CURSORS),
            blocked_head: std::sync::Mutex::new(None),
            db,
        };
        store.create_indexes().await?;
        Ok(store)
    }

    async fn create_indexes(&self) -> StoreResult<()> {
        for (collection, keys, unique) in filters::indexes() {
            let index = IndexModel::builder()
                .keys(keys)
                .options(unique.then(|| IndexOptions::builder().unique(true).build()))
                .build();
            self.db
                .collection::<Document>(collection)
                .create_index(index)
                .await
                .map_err(|e| match map_err(e) {
                    // E.g. duplicate twin ids or states already stored: say where.
                    StoreError::Internal(m) | StoreError::Conflict(m) => StoreError::Internal(
                        format!("cannot create an index on {collection}: {m}").into(),
                    ),
                    unavailable => unavailable,
                })?;
        }
        Ok(())
    }

    /// The stored version of a document, read after a conditional write missed.
    async fn document_version(&self, twin_id: &str, name: &str) -> StoreResult<Option<i64>> {
        self.documents
            .find_one(filters::document(twin_id, name))
            .projection(filters::only(&["version"]))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::version_from_bson)
            .transpose()
    }

    /// The `fields` of the twin's latest state, through the (twinid, id) index.
    async fn latest_fields(&self, twin_id: &str, fields: &[&str]) -> StoreResult<Option<Document>> {
        self.states
            .find_one(filters::states_of(twin_id))
            .sort(filters::by("id", -1))
            .projection(filters::only(fields))
            .await
            .map_err(map_err)
    }

    /// The conditional update of a document at version `expected`; false when there is
    /// no such version. A record from before revisions were kept gets its current
    /// version as a revision too, read under a filter that only such a record at that
    /// version matches: nothing can change it without adding revisions, so what is read
    /// is what the update replaces.
    async fn replace_document(
        &self,
        write: &DocumentWrite<'_>,
        expected: i64,
    ) -> StoreResult<bool> {
        let doc = write.doc;
        let at = |revised| {
            filters::document_revised_at(&doc.twin_id, &doc.document_name, expected, revised)
        };
        let marks: Vec<&OutboxEvent> = write.events.iter().collect();
        let update = |earlier| {
            let mut update = filters::document_update(
                doc,
                write.op,
                write.by,
                write.keep.min(MAX_KEPT),
                earlier,
            )?;
            outbox::mark(&mut update, &marks);
            Ok::<_, StoreError>(update)
        };
        let updated = self
            .documents
            .update_one(at(true), update(None)?)
            .await
            .map_err(map_err)?;
        if updated.matched_count == 1 {
            return Ok(true);
        }
        let Some(legacy) = self.documents.find_one(at(false)).await.map_err(map_err)? else {
            return Ok(false);
        };
        let earlier = codec::legacy_revision(&legacy)?;
        let updated = self
            .documents
            .update_one(at(false), update(Some(earlier))?)
            .await
            .map_err(map_err)?;
        Ok(updated.matched_count == 1)
    }

    /// The document's record projected to the list of its versions, through the unique
    /// (twinid, name) index.
    async fn version_list(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        self.documents
            .find_one(filters::document(twin_id, name))
            .projection(filters::versions_projection())
            .await
            .map_err(map_err)
    }

    /// Deletes the twin's data, then the twin record `at`; false when that record
    /// changed meanwhile.
    async fn remove_owned(&self, id: &str, at: Document) -> StoreResult<bool> {
        self.states
            .delete_many(filters::states_of(id))
            .await
            .map_err(map_err)?;
        self.documents
            .delete_many(filters::documents_of(id))
            .await
            .map_err(map_err)?;
        self.cursors
            .delete_many(doc! { "twinid": id })
            .await
            .map_err(map_err)?;
        let r = self.twins.delete_one(at).await.map_err(map_err)?;
        Ok(r.deleted_count == 1)
    }

    async fn write_state(&self, write: &Write) -> StoreResult<()> {
        match write {
            Write::Insert(s) => {
                self.states
                    .insert_one(codec::state_to_bson(s))
                    .await
                    .map_err(map_err)?;
            }
            Write::Update(s) => {
                self.states
                    .update_one(filters::state(&s.twin_id, s.id), filters::state_update(s))
                    .await
                    .map_err(map_err)?;
            }
        }
        Ok(())
    }
}

/// Maps driver errors onto the store's error kinds: a duplicate key is a conflict;
/// anything that says the server cannot be reached or cannot answer now is unavailable.
fn map_err(e: mongodb::error::Error) -> StoreError {
    let duplicate = match e.kind.as_ref() {
        ErrorKind::Command(c) => c.code == DUPLICATE_KEY,
        ErrorKind::Write(WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => false,
    };
    if duplicate {
        return StoreError::Conflict(e.into());
    }
    let unavailable = match e.kind.as_ref() {
        ErrorKind::Command(c) => TRANSIENT_CODES.contains(&c.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(_))
        | ErrorKind::Io(_)
        // A reply cut off halfway reads as a malformed one.
        | ErrorKind::InvalidResponse { .. }
        | ErrorKind::ConnectionPoolCleared { .. }
        | ErrorKind::ServerSelection { .. }
        | ErrorKind::DnsResolve { .. }
        | ErrorKind::Authentication { .. }
        | ErrorKind::Shutdown => true,
        _ => false,
    };
    if unavailable
        || e.contains_label(RETRYABLE_WRITE_ERROR)
        || e.contains_label(TRANSIENT_TRANSACTION_ERROR)
    {
        StoreError::Unavailable(e.into())
    } else {
        StoreError::Internal(e.into())
    }
}

async fn collect(cursor: mongodb::Cursor<Document>) -> StoreResult<Vec<Document>> {
    cursor.try_collect().await.map_err(map_err)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// How to tell that a change of the twin's record was made.
fn twin_check(id: &str) -> Check {
    Check::Marked {
        collection: filters::TWINS,
        filter: doc! { "id": id },
    }
}

#[async_trait]
impl TwinRepository for MongoStore {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        let intent = self.intend(events, vec![twin_check(&twin.id)]).await?;
        let mut record = codec::twin_to_bson(twin);
        outbox::mark_new(&mut record, &events.iter().collect::<Vec<_>>());
        match self.twins.insert_one(record).await.map_err(map_err) {
            Err(StoreError::Conflict(e)) => {
                self.settle(&intent, |_| false).await?;
                Err(StoreError::Conflict(e))
            }
            outcome => self.conclude(&intent, outcome.map(|_| ()), |()| true).await,
        }
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        let intent = self.intend(events, vec![twin_check(&twin.id)]).await?;
        let mut update = filters::twin_update(twin);
        outbox::mark(&mut update, &events.iter().collect::<Vec<_>>());
        let outcome = self
            .twins
            .update_one(filters::twin_at_revision(twin, expected_revision), update)
            .await
            .map_err(map_err)
            .map(|r| r.matched_count == 1);
        self.conclude(&intent, outcome, |done| *done).await
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        self.twins
            .find_one(filters::twin(owner, id))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::twin_from_bson)
            .transpose()
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>> {
        let query = filters::twin_list(owner, filter);
        let total = self
            .twins
            .count_documents(query.clone())
            .await
            .map_err(map_err)?;
        let docs = collect(
            self.twins
                .find(query)
                .sort(filters::creation_order())
                .skip(page.offset)
                .limit(to_i64(page.limit))
                .await
                .map_err(map_err)?,
        )
        .await?;
        super::page_of(total, page, &docs, codec::twin_from_bson)
    }

    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        // Ownership first, then the twin's data, the twin last: a failure half-way leaves
        // a twin that still exists and can be removed again, never data nobody owns.
        let mut at = filters::twin(owner, id);
        if let Some(revision) = expected_revision {
            at.insert("revision", revision);
        }
        let Some(record) = self
            .twins
            .find_one(at.clone())
            .projection(filters::only(&["_id"]))
            .await
            .map_err(map_err)?
        else {
            return Ok(false);
        };
        let gone = Check::gone(filters::TWINS, &record, &mut at);
        let intent = self.intend(events, vec![gone]).await?;
        let outcome = self.remove_owned(id, at).await;
        self.conclude(&intent, outcome, |done| *done).await
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        let docs = collect(
            self.twins
                .find(filters::twins_on_channel(channel, subtopic))
                .projection(filters::twin_attributes_projection())
                .await
                .map_err(map_err)?,
        )
        .await?;
        let mut ids = Vec::new();
        for d in &docs {
            let current = codec::definitions_from_bson(d)?.pop();
            if current
                .is_some_and(|def| def.attributes.iter().any(|a| a.matches(channel, subtopic)))
            {
                ids.push(codec::id_from_bson(d, "twin")?);
            }
        }
        Ok(ids)
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        self.twins
            .find_one(filters::twin_any_owner(id))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::twin_from_bson)
            .transpose()
    }

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        super::many_in_chunks(ids, |chunk| async move {
            let docs = collect(
                self.twins
                    .find(filters::twins_any_owner(chunk))
                    .await
                    .map_err(map_err)?,
            )
            .await?;
            // The filter matched string ids only.
            Ok(docs
                .iter()
                .filter_map(|d| {
                    codec::id_from_bson(d, "twin")
                        .ok()
                        .map(|id| (id, codec::twin_from_bson(d)))
                })
                .collect())
        })
        .await
    }
}

#[async_trait]
impl StateRepository for MongoStore {
    async fn save(&self, state: &State) -> StoreResult<()> {
        self.write_state(&Write::Insert(state.clone())).await
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        self.write_state(&Write::Update(state.clone())).await
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        self.states
            .find_one(filters::states_of(twin_id))
            .sort(filters::by("id", -1))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::state_from_bson)
            .transpose()
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        // As in SQLite: state ids are a gap-free run, so the total and the first id of
        // a page come straight from the index.
        let first = self.state_id_at_end(twin_id, 1).await?;
        let last = self.state_id_at_end(twin_id, -1).await?;
        let (total, start) = crate::store::sql::states_span(first, last, page.offset);
        let docs = collect(
            self.states
                .find(filters::states_from(twin_id, start))
                .sort(filters::by("id", 1))
                .limit(to_i64(page.limit))
                .await
                .map_err(map_err)?,
        )
        .await?;
        super::page_of(total, page, &docs, codec::state_from_bson)
    }

    async fn range(
        &self,
        twin_id: &str,
        window: &Window,
        page: PageRequest,
    ) -> StoreResult<Page<State>> {
        let filter = filters::states_in(twin_id, window);
        let total = self
            .states
            .count_documents(filter.clone())
            .await
            .map_err(map_err)?;
        let docs = collect(
            self.states
                .find(filter)
                .sort(filters::history_order(1))
                .skip(page.offset)
                .limit(to_i64(page.limit))
                .await
                .map_err(map_err)?,
        )
        .await?;
        super::page_of(total, page, &docs, codec::state_from_bson)
    }

    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>> {
        self.states
            .find_one(filters::states_until(twin_id, at))
            .sort(filters::history_order(-1))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::state_from_bson)
            .transpose()
    }

    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary> {
        let states = self
            .states
            .count_documents(filters::states_in(twin_id, window))
            .await
            .map_err(map_err)?;
        let groups = collect(
            self.states
                .aggregate(filters::summary_pipeline(twin_id, window))
                .allow_disk_use(true)
                .await
                .map_err(map_err)?,
        )
        .await?;
        Ok(Summary {
            states,
            attributes: groups
                .iter()
                .map(codec::attribute_summary_from_bson)
                .collect::<StoreResult<_>>()?,
        })
    }

    async fn twin_ids_after(&self, after: &str, limit: usize) -> StoreResult<Vec<String>> {
        let docs = collect(
            self.twins
                .find(filters::twins_after(after))
                .sort(filters::by("id", 1))
                .projection(filters::only(&["id"]))
                .limit(to_i64(limit as u64))
                .await
                .map_err(map_err)?,
        )
        .await?;
        docs.iter()
            .map(|d| codec::id_from_bson(d, "twin"))
            .collect()
    }

    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64> {
        // A twin's latest id only grows and ingestion rewrites only the latest state, so
        // what is read here stays true of the states deleted.
        let Some(last) = self.state_id_at_end(twin_id, -1).await? else {
            return Ok(0);
        };
        let first = collect(
            self.states
                .find(filters::states_of(twin_id))
                .sort(filters::by("id", 1))
                .projection(filters::only(&["id", "created"]))
                .limit(to_i64(limit as u64))
                .await
                .map_err(map_err)?,
        )
        .await?
        .iter()
        .map(codec::state_id_and_created)
        .collect::<StoreResult<Vec<_>>>()?;
        let Some(keep) = crate::store::prune_bound(&first, last, before) else {
            return Ok(0);
        };
        let done = self
            .states
            .delete_many(filters::states_before(twin_id, keep))
            .await
            .map_err(map_err)?;
        Ok(done.deleted_count)
    }
}

impl MongoStore {
    /// The twin's first (`direction` 1) or latest (-1) state id, from the index.
    async fn state_id_at_end(&self, twin_id: &str, direction: i32) -> StoreResult<Option<i64>> {
        self.states
            .find_one(filters::states_of(twin_id))
            .sort(filters::by("id", direction))
            .projection(filters::only(&["id"]))
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::state_id_from_bson)
            .transpose()
    }
}

#[async_trait]
impl DocumentRepository for MongoStore {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        let docs = collect(
            self.documents
                .find(filters::documents_of(twin_id))
                .sort(filters::by("name", 1))
                .projection(filters::only(&["name", "version", "updated"]))
                .await
                .map_err(map_err)?,
        )
        .await?;
        docs.iter().map(codec::summary_from_bson).collect()
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<TwinDocument>> {
        self.documents
            .find_one(filters::document(twin_id, name))
            .projection(filters::without_revisions())
            .await
            .map_err(map_err)?
            .as_ref()
            .map(codec::document_from_bson)
            .transpose()
    }

    /// Revisions live inside the document's own record (`revisions`, the newest
    /// `keep + 1` versions with their data as JSON text), because MongoDB without a
    /// replica set has no multi-document transactions: the compare-and-set on the
    /// version, the new data and the new revision with the pruning of the oldest
    /// (`$push` with `$slice`) are one update of one record, which MongoDB applies
    /// atomically and durably together or not at all. A create is one insert of the
    /// record with its first revision, refused by the unique (twinid, name) index when
    /// the document exists. No crash can leave a version without its revision, and
    /// deleting the record deletes its revisions.
    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned> {
        let doc = write.doc;
        let check = Check::Marked {
            collection: filters::DOCUMENTS,
            filter: filters::document(&doc.twin_id, &doc.document_name),
        };
        let intent = self.intend(write.events, vec![check]).await?;
        let outcome = match write.expected {
            None => {
                let mut record = codec::new_document_to_bson(doc, write.op, write.by)?;
                outbox::mark_new(&mut record, &write.events.iter().collect::<Vec<_>>());
                match self.documents.insert_one(record).await.map_err(map_err) {
                    Ok(_) => Ok(true),
                    Err(StoreError::Conflict(_)) => Ok(false),
                    Err(e) => Err(e),
                }
            }
            Some(v) => self.replace_document(write, v).await,
        };
        if self.conclude(&intent, outcome, |done| *done).await? {
            return Ok(Versioned::Done);
        }
        let actual = self
            .document_version(&doc.twin_id, &doc.document_name)
            .await?;
        Ok(Versioned::Stale { actual })
    }

    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned> {
        let mut at = filters::document_at_version(twin_id, name, expected);
        let found = self
            .documents
            .find_one(at.clone())
            .projection(filters::only(&["_id"]))
            .await
            .map_err(map_err)?;
        if let Some(record) = found {
            let gone = Check::gone(filters::DOCUMENTS, &record, &mut at);
            let intent = self.intend(events, vec![gone]).await?;
            let outcome = self
                .documents
                .delete_one(at)
                .await
                .map_err(map_err)
                .map(|r| r.deleted_count == 1);
            if self.conclude(&intent, outcome, |done| *done).await? {
                return Ok(Versioned::Done);
            }
        }
        let actual = self.document_version(twin_id, name).await?;
        Ok(Versioned::Stale { actual })
    }

    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>> {
        // At most MAX_KEPT + 1 small entries: paged here, from one projected read.
        let versions = match self.version_list(twin_id, name).await? {
            Some(record) => codec::versions_from_bson(&record)?,
            None => Vec::new(),
        };
        let total = versions.len() as u64;
        let skip = usize::try_from(page.offset).unwrap_or(usize::MAX);
        let take = usize::try_from(page.limit).unwrap_or(usize::MAX);
        Ok(Page {
            total,
            offset: page.offset,
            limit: page.limit,
            items: versions.into_iter().rev().skip(skip).take(take).collect(),
        })
    }

    async fn revision(
        &self,
        twin_id: &str,
        name: &str,
        version: i64,
    ) -> StoreResult<Option<TwinDocument>> {
        let Some(record) = self
            .documents
            .find_one(filters::document(twin_id, name))
            .projection(filters::revision_projection(version))
            .await
            .map_err(map_err)?
        else {
            return Ok(None);
        };
        if codec::version_from_bson(&record)? == version {
            return codec::document_from_bson(&record).map(Some);
        }
        codec::revisions_of(&record)?
            .into_iter()
            .find(|r| codec::version_from_bson(r).ok() == Some(version))
            .map(|r| codec::revision_from_bson(r, twin_id, name))
            .transpose()
    }

    async fn revision_at(
        &self,
        twin_id: &str,
        name: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<TwinDocument>> {
        let Some(record) = self.version_list(twin_id, name).await? else {
            return Ok(None);
        };
        let in_force = codec::versions_from_bson(&record)?
            .into_iter()
            .filter(|v| v.updated <= *at)
            .map(|v| v.version)
            .max();
        match in_force {
            Some(version) => self.revision(twin_id, name, version).await,
            None => Ok(None),
        }
    }
}

#[async_trait]
impl HealthCheck for MongoStore {
    async fn ping(&self) -> StoreResult<()> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(map_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mongodb::error::{CommandError, Error, WriteError};

    fn command_error(code: i32) -> Error {
        let e: CommandError =
            bson::deserialize_from_document(doc! { "code": code, "codeName": "X", "errmsg": "m" })
                .unwrap();
        Error::from(ErrorKind::Command(e))
    }

    fn write_error(code: i32) -> Error {
        let e: WriteError =
            bson::deserialize_from_document(doc! { "code": code, "errmsg": "m" }).unwrap();
        Error::from(ErrorKind::Write(WriteFailure::WriteError(e)))
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable() {
        let url = "mongodb://127.0.0.1:1/twins?serverSelectionTimeoutMS=200";
        match crate::store::Store::connect(url).await {
            Err(StoreError::Unavailable(_)) => {}
            Err(e) => panic!("want unavailable, got {e}"),
            Ok(_) => panic!("connected to port 1"),
        }
    }

    #[test]
    fn duplicate_keys_are_conflicts() {
        assert!(matches!(
            map_err(write_error(11000)),
            StoreError::Conflict(_)
        ));
        assert!(matches!(
            map_err(command_error(11000)),
            StoreError::Conflict(_)
        ));
    }

    #[test]
    fn unreachable_or_stepping_down_servers_are_unavailable() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert!(matches!(
            map_err(Error::from(io)),
            StoreError::Unavailable(_)
        ));
        // NotWritablePrimary, ShutdownInProgress, MaxTimeMSExpired.
        for code in [10107, 91, 50] {
            assert!(
                matches!(map_err(command_error(code)), StoreError::Unavailable(_)),
                "{code}"
            );
        }
    }

    #[test]
    fn other_server_errors_are_internal() {
        // BadValue, and a write refused by document validation.
        assert!(matches!(map_err(command_error(2)), StoreError::Internal(_)));
        assert!(matches!(map_err(write_error(121)), StoreError::Internal(_)));
    }
}
