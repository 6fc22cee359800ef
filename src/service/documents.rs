//! Twin documents (SPEC section 7): read, replace, merge-patch and delete named
//! documents with optimistic locking, for owners over HTTP and devices over the broker.
//!
//! Every write is read-compute-compare-and-set: a conditional write (the client gave
//! a version) answers a version mismatch when the compare fails; an unconditional one
//! re-reads and tries again, so concurrent unconditional patches never lose a key.
//!
//! History (SPEC section 11): each write keeps the new version as a revision with how
//! and by whom it was written (the [`Access`] it was made with), in the store's atomic
//! step; the newest `revisions + 1` versions are kept. Revisions are read by version or
//! by time and compared as RFC 6902 and RFC 7396 patches.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::contention::Contention;
use super::outbox::change as change_event;
use super::twins::parse_twin_id;
use super::{ServiceError, ServiceResult, VersionMismatch};
use crate::domain::document::{
    self, Difference, Document, DocumentName, DocumentSummary, VersionSummary, WriteOp, Writer,
};
use crate::domain::feed::EventKind;
use crate::domain::time::now_millis;
use crate::domain::twin::Twin;
use crate::domain::{Page, PageRequest, ValidationError};
use crate::store::{DocumentWrite, Store, Versioned};

/// Earlier revisions kept per document unless configured (`MG_TWINS_DOCUMENT_REVISIONS`).
pub const DEFAULT_REVISIONS: u32 = 100;

/// The answer for a version that was pruned or never existed.
pub const NOT_KEPT: &str = "version not kept";
/// The answer for a time before the document was created.
pub const NOT_YET: &str = "document did not exist at that time";

/// On whose behalf a document is accessed.
#[derive(Debug, Clone, Copy)]
pub enum Access<'a> {
    /// An authenticated user: only their own twins.
    Owner(&'a str),
    /// A device publishing on a Magistrala channel: only twins whose current
    /// definition binds that channel.
    Channel(&'a str),
    /// A trusted back-end caller on the broker's request/reply subject.
    Trusted,
}

impl Access<'_> {
    /// Who a write made with this access is recorded as.
    pub fn writer(&self) -> Writer {
        match self {
            Self::Owner(id) => Writer::User {
                id: (*id).to_owned(),
            },
            Self::Channel(channel) => Writer::Channel {
                id: (*channel).to_owned(),
            },
            Self::Trusted => Writer::Service,
        }
    }
}

/// Which revision of a document to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// The revision with this version.
    Version(i64),
    /// The revision in force at this time: the newest written at or before it.
    Time(DateTime<Utc>),
}

/// Two revisions of a document compared (`GET .../diff?from=&to=`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RevisionDiff {
    pub from_version: i64,
    pub to_version: i64,
    /// RFC 6902 operations turning the `from` data into the `to` data.
    #[schema(value_type = Vec<Object>)]
    pub patch: Value,
    /// The RFC 7396 merge patch turning the `from` data into the `to` data (exact unless
    /// `to` holds a `null` value, which a merge patch cannot set).
    #[schema(value_type = Object)]
    pub merge_patch: Value,
}

/// What a write does with the stored data.
#[derive(Debug, Clone)]
pub enum Change {
    /// Replace the data.
    Put(Map<String, Value>),
    /// Apply an RFC 7396 merge patch to the data (an absent document starts from `{}`).
    Patch(Map<String, Value>),
}

/// A document compared with another (`GET .../delta?against=`).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DeltaView {
    pub twin_id: String,
    pub document_name: String,
    pub version: i64,
    pub against: String,
    /// Absent when the other document does not exist (compared as `{}`).
    pub against_version: Option<i64>,
    pub differences: Vec<Difference>,
}

impl Change {
    /// The operation's name in notifications (`document.put`, `document.patch`).
    pub fn operation(&self) -> &'static str {
        match self {
            Self::Put(_) => "document.put",
            Self::Patch(_) => "document.patch",
        }
    }
}

/// The documents use cases, as the transports and the decorators see them.
#[async_trait]
pub trait Documents: Send + Sync {
    /// The twin's documents, without their data.
    async fn list(&self, access: Access<'_>, twin_id: &str) -> ServiceResult<Vec<DocumentSummary>>;
    /// One document.
    async fn get(&self, access: Access<'_>, twin_id: &str, name: &str) -> ServiceResult<Document>;
    /// Writes the document; returns it and whether it was created. With `version`, the
    /// write only happens if that is the stored version (0: the document must not
    /// exist).
    async fn write(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        change: Change,
        version: Option<i64>,
    ) -> ServiceResult<(Document, bool)>;
    /// Deletes the document (only at `version` when given) and returns what was
    /// deleted.
    async fn delete(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        version: Option<i64>,
    ) -> ServiceResult<Document>;
    /// What differs between document `name` and document `against` of the same twin.
    async fn delta(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        against: &str,
    ) -> ServiceResult<DeltaView>;
    /// A page of the document's kept versions, newest first (the current one included).
    async fn versions(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<VersionSummary>>;
    /// The document as it was at a version or a time.
    async fn revision(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        as_of: AsOf,
    ) -> ServiceResult<Document>;
    /// The patches from revision `from` to revision `to` (the current version when None).
    async fn diff(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        from: i64,
        to: Option<i64>,
    ) -> ServiceResult<RevisionDiff>;
}

/// The documents use cases over the store.
#[derive(Clone)]
pub struct DocumentsService {
    store: Store,
    /// Earlier revisions kept per document.
    revisions: u32,
}

impl DocumentsService {
    pub fn new(store: Store, revisions: u32) -> Self {
        Self { store, revisions }
    }

    /// The twin if `access` may use its documents; NotFound otherwise, so that a
    /// foreign twin is indistinguishable from a missing one.
    async fn twin(&self, access: Access<'_>, twin_id: &str) -> ServiceResult<Twin> {
        let id = parse_twin_id(twin_id)?;
        let twin = match access {
            Access::Owner(owner) => self.store.twins.retrieve(owner, &id).await?,
            Access::Channel(channel) => self.store.twins.retrieve_any(&id).await?.filter(|t| {
                t.current_definition()
                    .is_some_and(|d| d.attributes.iter().any(|a| a.channel == channel))
            }),
            Access::Trusted => self.store.twins.retrieve_any(&id).await?,
        };
        twin.ok_or(ServiceError::NotFound)
    }

    async fn write_checked(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        change: Change,
        version: Option<i64>,
    ) -> ServiceResult<(Document, bool)> {
        let name = DocumentName::parse(name)?;
        if let Change::Put(data) = &change {
            check_size(data)?;
        }
        let twin = self.twin(access, twin_id).await?;
        let mut contention = Contention::of_twin(&twin.id);
        while contention.next().await {
            let current = self.store.documents.get(&twin.id, name.as_str()).await?;
            let stored = current.as_ref().map(|d| d.version);
            check_version(&twin.id, &name, version, stored)?;
            let data = match &change {
                Change::Put(data) => data.clone(),
                Change::Patch(patch) => {
                    let mut target =
                        Value::Object(current.as_ref().map(|d| d.data.clone()).unwrap_or_default());
                    document::merge_patch(&mut target, &Value::Object(patch.clone()));
                    match target {
                        Value::Object(m) => m,
                        _ => Map::new(),
                    }
                }
            };
            check_size(&data)?;
            let doc = Document {
                twin_id: twin.id.clone(),
                document_name: name.as_str().to_owned(),
                version: stored.unwrap_or(0) + 1,
                updated: now_millis(),
                data,
            };
            let op = match (&change, stored) {
                (_, None) => WriteOp::Create,
                (Change::Put(_), Some(_)) => WriteOp::Put,
                (Change::Patch(_), Some(_)) => WriteOp::Patch,
            };
            let kind = match &change {
                Change::Put(_) => EventKind::DocumentPut,
                Change::Patch(_) => EventKind::DocumentPatched,
            };
            let events = [change_event(
                &twin.owner,
                kind,
                &twin.id,
                doc.updated,
                current.as_ref(),
                Some(&doc),
            )?];
            let write = DocumentWrite {
                doc: &doc,
                expected: stored,
                op,
                by: &access.writer(),
                keep: self.revisions,
                events: &events,
            };
            match self.store.documents.write(&write).await? {
                Versioned::Done => {
                    self.store.recorded.ring();
                    return Ok((doc, stored.is_none()));
                }
                Versioned::Stale { actual } => check_version(&twin.id, &name, version, actual)?,
            }
        }
        Err(ServiceError::Unavailable(
            "document kept changing; retry".into(),
        ))
    }

    /// Revision `version` of the document whose current version is `current`.
    async fn at_version(&self, current: &Document, version: i64) -> ServiceResult<Document> {
        check_revision_number(version)?;
        if version == current.version {
            return Ok(current.clone());
        }
        if version > current.version {
            return Err(ServiceError::Absent(NOT_KEPT));
        }
        self.store
            .documents
            .revision(&current.twin_id, &current.document_name, version)
            .await?
            .ok_or(ServiceError::Absent(NOT_KEPT))
    }

    /// The revision in force at `at` of the document whose current version is `current`.
    async fn at_time(&self, current: &Document, at: &DateTime<Utc>) -> ServiceResult<Document> {
        if current.updated <= *at {
            return Ok(current.clone());
        }
        let (twin_id, name) = (&current.twin_id, &current.document_name);
        if let Some(doc) = self.store.documents.revision_at(twin_id, name, at).await? {
            return Ok(doc);
        }
        // Nothing kept is that old: either the document was created later, or what was
        // in force then has been pruned. Kept versions are the newest, so all of them
        // are kept exactly when there are as many as the current version number.
        let kept = self
            .store
            .documents
            .versions(
                twin_id,
                name,
                PageRequest {
                    offset: 0,
                    limit: 1,
                },
            )
            .await?
            .total;
        if i64::try_from(kept).unwrap_or(i64::MAX) >= current.version {
            Err(ServiceError::Absent(NOT_YET))
        } else {
            Err(ServiceError::Absent(NOT_KEPT))
        }
    }

    async fn delete_checked(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        version: Option<i64>,
    ) -> ServiceResult<Document> {
        let name = DocumentName::parse(name)?;
        let twin = self.twin(access, twin_id).await?;
        let mut contention = Contention::of_twin(&twin.id);
        while contention.next().await {
            let current = self
                .store
                .documents
                .get(&twin.id, name.as_str())
                .await?
                .ok_or(ServiceError::NotFound)?;
            check_version(&twin.id, &name, version, Some(current.version))?;
            let events = [change_event(
                &twin.owner,
                EventKind::DocumentDeleted,
                &twin.id,
                now_millis(),
                Some(&current),
                None,
            )?];
            match self
                .store
                .documents
                .delete_recorded(&twin.id, name.as_str(), Some(current.version), &events)
                .await?
            {
                Versioned::Done => {
                    self.store.recorded.ring();
                    return Ok(current);
                }
                Versioned::Stale { actual: None } => return Err(ServiceError::NotFound),
                Versioned::Stale { actual } => check_version(&twin.id, &name, version, actual)?,
            }
        }
        Err(ServiceError::Unavailable(
            "document kept changing; retry".into(),
        ))
    }
}

#[async_trait]
impl Documents for DocumentsService {
    async fn list(&self, access: Access<'_>, twin_id: &str) -> ServiceResult<Vec<DocumentSummary>> {
        let twin = self.twin(access, twin_id).await?;
        Ok(self.store.documents.list(&twin.id).await?)
    }

    async fn get(&self, access: Access<'_>, twin_id: &str, name: &str) -> ServiceResult<Document> {
        let name = DocumentName::parse(name)?;
        let twin = self.twin(access, twin_id).await?;
        self.store
            .documents
            .get(&twin.id, name.as_str())
            .await?
            .ok_or(ServiceError::NotFound)
    }

    async fn write(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        change: Change,
        version: Option<i64>,
    ) -> ServiceResult<(Document, bool)> {
        self.write_checked(access, twin_id, name, change, version)
            .await
    }

    async fn delete(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        version: Option<i64>,
    ) -> ServiceResult<Document> {
        self.delete_checked(access, twin_id, name, version).await
    }

    async fn delta(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        against: &str,
    ) -> ServiceResult<DeltaView> {
        let against_name = DocumentName::parse(against)?;
        let doc = self.get(access, twin_id, name).await?;
        let other = self
            .store
            .documents
            .get(&doc.twin_id, against_name.as_str())
            .await?;
        let empty = Map::new();
        Ok(DeltaView {
            differences: document::delta(&doc.data, other.as_ref().map_or(&empty, |o| &o.data)),
            against_version: other.as_ref().map(|o| o.version),
            against: against_name.as_str().to_owned(),
            twin_id: doc.twin_id,
            document_name: doc.document_name,
            version: doc.version,
        })
    }

    async fn versions(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<VersionSummary>> {
        let current = self.get(access, twin_id, name).await?;
        Ok(self
            .store
            .documents
            .versions(&current.twin_id, &current.document_name, page)
            .await?)
    }

    async fn revision(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        as_of: AsOf,
    ) -> ServiceResult<Document> {
        let current = self.get(access, twin_id, name).await?;
        match as_of {
            AsOf::Version(v) => self.at_version(&current, v).await,
            AsOf::Time(t) => self.at_time(&current, &t).await,
        }
    }

    async fn diff(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        from: i64,
        to: Option<i64>,
    ) -> ServiceResult<RevisionDiff> {
        check_revision_number(from)?;
        if let Some(to) = to {
            check_revision_number(to)?;
        }
        let current = self.get(access, twin_id, name).await?;
        let from = self.at_version(&current, from).await?;
        let to = match to {
            Some(v) => self.at_version(&current, v).await?,
            None => current,
        };
        let (old, new) = (Value::Object(from.data), Value::Object(to.data));
        let patch = serde_json::to_value(json_patch::diff(&old, &new))
            .map_err(|e| ServiceError::Internal(e.into()))?;
        Ok(RevisionDiff {
            from_version: from.version,
            to_version: to.version,
            patch,
            merge_patch: document::merge_patch_between(&old, &new),
        })
    }
}

/// Versions start at 1.
fn check_revision_number(version: i64) -> ServiceResult<()> {
    if version < 1 {
        return Err(ServiceError::Invalid(ValidationError::new(format!(
            "version must be a positive integer, got {version}"
        ))));
    }
    Ok(())
}

fn check_size(data: &Map<String, Value>) -> ServiceResult<()> {
    document::check_size(data).map_err(|e| ServiceError::TooLarge(e.to_string()))
}

/// A version mismatch when the client asked for `expected` and `stored` is there
/// (0 stands for "no document").
pub(crate) fn check_version(
    twin_id: &str,
    name: &DocumentName,
    expected: Option<i64>,
    stored: Option<i64>,
) -> ServiceResult<()> {
    match expected {
        Some(v) if v != stored.unwrap_or(0) => {
            Err(ServiceError::VersionMismatch(Box::new(VersionMismatch {
                error: "document version mismatch",
                twin_id: twin_id.to_owned(),
                document_name: name.as_str().to_owned(),
                expected_version: v,
                actual_version: stored,
            })))
        }
        _ => Ok(()),
    }
}
