//! Notifications (SPEC section 6) as a decorator: the use cases never publish; this
//! wrapper reports each operation's outcome through the [`Publish`] port once the
//! operation has returned.
//!
//! Operations and payloads are the Go service's: `create`, `get`, `update`, `remove`
//! (`{"deleted": id}`), `save` (one per state written, or the reason a message was
//! rejected for a twin), `document.put|patch|delete`; success carries the JSON of the
//! result, failure the error's public text (never its cause).

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use tracing::Instrument;

use super::documents::{Access, AsOf, Change, DeltaView, Documents, RevisionDiff};
use super::ingest::{Batch, BatchReport, Ingest, IngestError, SetAside};
use super::twins::{NewTwin, TwinUpdate, Twins, parse_twin_id};
use super::{ServiceError, ServiceResult};
use crate::domain::document::{Document, DocumentSummary, VersionSummary};
use crate::domain::state::State;
use crate::domain::twin::{Twin, TwinFilter};
use crate::domain::{Page, PageRequest};

/// What an operation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The JSON of the result.
    Success(Vec<u8>),
    /// The error's public text.
    Failure(String),
}

/// Where notifications go (the broker's notification channel).
#[async_trait]
pub trait Publish: Send + Sync {
    /// Publishes the outcome of `op` on twin `twin_id`. Never fails the operation: a
    /// publisher that cannot deliver logs it.
    async fn publish(&self, twin_id: &str, op: &str, outcome: Outcome);
}

/// A use case wrapped so that its outcomes are published.
pub struct Notifying<S> {
    inner: S,
    publish: Arc<dyn Publish>,
}

impl<S> Notifying<S> {
    pub fn new(inner: S, publish: Arc<dyn Publish>) -> Self {
        Self { inner, publish }
    }

    /// Publishes the outcome without a span of its own (ingestion notifies once per
    /// state written; the message carries the context of the current span).
    async fn publish<T: Serialize>(
        &self,
        twin_id: &str,
        op: &str,
        result: Result<&T, &ServiceError>,
    ) {
        let outcome = match result.map(serde_json::to_vec) {
            Ok(Ok(json)) => Outcome::Success(json),
            Ok(Err(e)) => Outcome::Failure(ServiceError::Internal(e.into()).public_message()),
            Err(e) => Outcome::Failure(e.public_message()),
        };
        self.publish.publish(twin_id, op, outcome).await;
    }

    /// Publishes the outcome of an API operation in its own producer span.
    async fn report<T: Serialize>(&self, twin_id: &str, op: &str, result: &ServiceResult<T>) {
        self.publish(twin_id, op, result.as_ref())
            .instrument(publish_span(op))
            .await;
    }
}

/// The span of publishing an API operation's notification (`op` such as `create`).
fn publish_span(op: &str) -> tracing::Span {
    tracing::info_span!(
        "broker.publish",
        otel.kind = "producer",
        messaging.system = "nats",
        messaging.operation.type = "send",
        twins.operation = op,
    )
}

#[async_trait]
impl<S: Twins> Twins for Notifying<S> {
    async fn create(&self, owner: &str, new: NewTwin) -> ServiceResult<Twin> {
        let id = new.id.clone();
        let result = self.inner.create(owner, new).await;
        self.report(&id, "create", &result).await;
        result
    }

    async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let result = self.inner.view(owner, id).await;
        // Ids that are no twin id never reach a broker subject.
        if let Ok(id) = parse_twin_id(id) {
            self.report(&id, "get", &result).await;
        }
        result
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>> {
        self.inner.list(owner, filter, page).await
    }

    async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let result = self.inner.update(owner, id, update).await;
        if let Ok(id) = parse_twin_id(id) {
            self.report(&id, "update", &result).await;
        }
        result
    }

    async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let result = self.inner.remove(owner, id).await;
        match (&result, parse_twin_id(id)) {
            (Ok(Some(id)), _) => {
                let deleted = serde_json::json!({ "deleted": id });
                self.report(id, "remove", &Ok::<_, ServiceError>(deleted))
                    .await;
            }
            // Nothing was deleted: reported like a deletion to the client, not at all
            // on the broker (no existence leak).
            (Ok(None), _) | (Err(_), Err(_)) => {}
            (Err(e), Ok(id)) => {
                self.publish::<()>(&id, "remove", Err(e))
                    .instrument(publish_span("remove"))
                    .await;
            }
        }
        result
    }

    async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        self.inner.list_states(owner, twin_id, page).await
    }
}

#[async_trait]
impl<S: Documents> Documents for Notifying<S> {
    async fn list(&self, access: Access<'_>, twin_id: &str) -> ServiceResult<Vec<DocumentSummary>> {
        self.inner.list(access, twin_id).await
    }

    async fn get(&self, access: Access<'_>, twin_id: &str, name: &str) -> ServiceResult<Document> {
        self.inner.get(access, twin_id, name).await
    }

    async fn write(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        change: Change,
        version: Option<i64>,
    ) -> ServiceResult<(Document, bool)> {
        let op = change.operation();
        let result = self
            .inner
            .write(access, twin_id, name, change, version)
            .await;
        if let Ok(id) = parse_twin_id(twin_id) {
            let doc = result.as_ref().map(|(d, _)| d);
            self.publish(&id, op, doc)
                .instrument(publish_span(op))
                .await;
        }
        result
    }

    async fn delete(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        version: Option<i64>,
    ) -> ServiceResult<Document> {
        let result = self.inner.delete(access, twin_id, name, version).await;
        if let Ok(id) = parse_twin_id(twin_id) {
            self.report(&id, "document.delete", &result).await;
        }
        result
    }

    async fn delta(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        against: &str,
    ) -> ServiceResult<DeltaView> {
        self.inner.delta(access, twin_id, name, against).await
    }

    async fn versions(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<VersionSummary>> {
        self.inner.versions(access, twin_id, name, page).await
    }

    async fn revision(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        as_of: AsOf,
    ) -> ServiceResult<Document> {
        self.inner.revision(access, twin_id, name, as_of).await
    }

    async fn diff(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        from: i64,
        to: Option<i64>,
    ) -> ServiceResult<RevisionDiff> {
        self.inner.diff(access, twin_id, name, from, to).await
    }
}

#[async_trait]
impl<S: Ingest> Ingest for Notifying<S> {
    /// `save` failures for the messages rejected for a twin, then one `save` success
    /// per state written, once the batch is durable.
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let report = self.inner.apply(batch, aside).await?;
        for r in &report.rejected {
            if let Some(twin_id) = &r.twin_id {
                // The reason is one of our fixed labels: nothing internal is shown.
                let why = format!("message rejected: {}", r.reason);
                self.publish
                    .publish(twin_id, "save", Outcome::Failure(why))
                    .await;
            }
        }
        for (twin_id, write) in report.writes() {
            self.publish(twin_id, "save", Ok::<_, &ServiceError>(write.state()))
                .await;
        }
        Ok(report)
    }

    fn reset(&self) {
        self.inner.reset();
    }
}
