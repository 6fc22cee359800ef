//! A span around every store call, whatever the backend: [`Store::new`](super::Store::new)
//! wraps each repository in [`Traced`], so backends contain no tracing code.
//!
//! Spans are named after the operation (`store.twins.retrieve`, `store.ingest.apply`, ...), record
//! no arguments (ids and payloads stay out of traces) and are marked as errors when the
//! call fails. Ingestion calls the store once per batch or per twin, never per message.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::{Instrument, Span};

use super::{
    Applied, DocumentRepository, DocumentWrite, HealthCheck, IngestCursor, IngestRepository,
    IngestStep, Lease, OutboxEntry, OutboxEvent, OutboxRepository, StateRepository, StoreResult,
    TwinFilter, TwinRepository, Versioned,
};
use crate::domain::document::{Document, DocumentSummary, VersionSummary};
use crate::domain::history::{Summary, Window};

use crate::domain::state::State;
use crate::domain::twin::Twin;
use crate::domain::{Page, PageRequest};

/// A repository whose calls each run in a span.
pub struct Traced<R: ?Sized>(pub Arc<R>);

fn span(op: &'static str) -> Span {
    tracing::info_span!(
        "store",
        otel.name = op,
        otel.kind = "client",
        db.operation.name = op,
        otel.status_code = tracing::field::Empty,
    )
}

async fn traced<T>(op: &'static str, call: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
    let span = span(op);
    let result = call.instrument(span.clone()).await;
    if let Err(e) = &result {
        span.record("otel.status_code", "ERROR");
        tracing::debug!(parent: &span, error = %e, "store call failed");
    }
    result
}

#[async_trait]
impl TwinRepository for Traced<dyn TwinRepository> {
    async fn save_recorded(&self, twin: &Twin, events: &[OutboxEvent]) -> StoreResult<()> {
        traced("store.twins.save", self.0.save_recorded(twin, events)).await
    }

    async fn update_recorded(
        &self,
        twin: &Twin,
        expected_revision: i64,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        traced(
            "store.twins.update",
            self.0.update_recorded(twin, expected_revision, events),
        )
        .await
    }

    async fn retrieve(&self, owner: &str, id: &str) -> StoreResult<Option<Twin>> {
        traced("store.twins.retrieve", self.0.retrieve(owner, id)).await
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> StoreResult<Page<Twin>> {
        traced("store.twins.list", self.0.list(owner, filter, page)).await
    }

    async fn remove_recorded(
        &self,
        owner: &str,
        id: &str,
        expected_revision: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<bool> {
        traced(
            "store.twins.remove",
            self.0.remove_recorded(owner, id, expected_revision, events),
        )
        .await
    }

    async fn ids_by_attribute(&self, channel: &str, subtopic: &str) -> StoreResult<Vec<String>> {
        traced(
            "store.twins.ids_by_attribute",
            self.0.ids_by_attribute(channel, subtopic),
        )
        .await
    }

    async fn retrieve_any(&self, id: &str) -> StoreResult<Option<Twin>> {
        traced("store.twins.retrieve_any", self.0.retrieve_any(id)).await
    }

    async fn retrieve_many(
        &self,
        ids: &[String],
    ) -> StoreResult<HashMap<String, StoreResult<Twin>>> {
        traced("store.twins.retrieve_many", self.0.retrieve_many(ids)).await
    }
}

#[async_trait]
impl StateRepository for Traced<dyn StateRepository> {
    async fn save(&self, state: &State) -> StoreResult<()> {
        traced("store.states.save", self.0.save(state)).await
    }

    async fn update(&self, state: &State) -> StoreResult<()> {
        traced("store.states.update", self.0.update(state)).await
    }

    async fn latest(&self, twin_id: &str) -> StoreResult<Option<State>> {
        traced("store.states.latest", self.0.latest(twin_id)).await
    }

    async fn list(&self, twin_id: &str, page: PageRequest) -> StoreResult<Page<State>> {
        traced("store.states.list", self.0.list(twin_id, page)).await
    }

    async fn range(
        &self,
        twin_id: &str,
        window: &Window,
        page: PageRequest,
    ) -> StoreResult<Page<State>> {
        traced("store.states.range", self.0.range(twin_id, window, page)).await
    }

    async fn at(&self, twin_id: &str, at: &DateTime<Utc>) -> StoreResult<Option<State>> {
        traced("store.states.at", self.0.at(twin_id, at)).await
    }

    async fn summary(&self, twin_id: &str, window: &Window) -> StoreResult<Summary> {
        traced("store.states.summary", self.0.summary(twin_id, window)).await
    }

    async fn twin_ids_after(&self, after: &str, limit: usize) -> StoreResult<Vec<String>> {
        traced(
            "store.states.twin_ids_after",
            self.0.twin_ids_after(after, limit),
        )
        .await
    }

    async fn prune(&self, twin_id: &str, before: &DateTime<Utc>, limit: usize) -> StoreResult<u64> {
        traced("store.states.prune", self.0.prune(twin_id, before, limit)).await
    }
}

#[async_trait]
impl IngestRepository for Traced<dyn IngestRepository> {
    async fn lease(&self, lease: &Lease) -> StoreResult<Option<u64>> {
        traced("store.ingest.lease", self.0.lease(lease)).await
    }

    async fn release(&self, group: &str, holder: &str) -> StoreResult<()> {
        traced("store.ingest.release", self.0.release(group, holder)).await
    }

    async fn cursor(&self, twin_id: &str) -> StoreResult<IngestCursor> {
        traced("store.ingest.cursor", self.0.cursor(twin_id)).await
    }

    async fn apply(&self, step: &IngestStep) -> StoreResult<Applied> {
        traced("store.ingest.apply", self.0.apply(step)).await
    }

    async fn rewind(&self, group: &str, from: u64, to: u64) -> StoreResult<Applied> {
        traced("store.ingest.rewind", self.0.rewind(group, from, to)).await
    }
}

#[async_trait]
impl DocumentRepository for Traced<dyn DocumentRepository> {
    async fn list(&self, twin_id: &str) -> StoreResult<Vec<DocumentSummary>> {
        traced("store.documents.list", self.0.list(twin_id)).await
    }

    async fn get(&self, twin_id: &str, name: &str) -> StoreResult<Option<Document>> {
        traced("store.documents.get", self.0.get(twin_id, name)).await
    }

    async fn write(&self, write: &DocumentWrite<'_>) -> StoreResult<Versioned> {
        traced("store.documents.write", self.0.write(write)).await
    }

    async fn delete_recorded(
        &self,
        twin_id: &str,
        name: &str,
        expected: Option<i64>,
        events: &[OutboxEvent],
    ) -> StoreResult<Versioned> {
        traced(
            "store.documents.delete",
            self.0.delete_recorded(twin_id, name, expected, events),
        )
        .await
    }

    async fn versions(
        &self,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> StoreResult<Page<VersionSummary>> {
        traced(
            "store.documents.versions",
            self.0.versions(twin_id, name, page),
        )
        .await
    }

    async fn revision(
        &self,
        twin_id: &str,
        name: &str,
        version: i64,
    ) -> StoreResult<Option<Document>> {
        traced(
            "store.documents.revision",
            self.0.revision(twin_id, name, version),
        )
        .await
    }

    async fn revision_at(
        &self,
        twin_id: &str,
        name: &str,
        at: &DateTime<Utc>,
    ) -> StoreResult<Option<Document>> {
        traced(
            "store.documents.revision_at",
            self.0.revision_at(twin_id, name, at),
        )
        .await
    }
}

#[async_trait]
impl OutboxRepository for Traced<dyn OutboxRepository> {
    async fn pending(&self, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        traced("store.outbox.pending", self.0.pending(limit)).await
    }

    async fn pending_after(&self, after: i64, limit: usize) -> StoreResult<Vec<OutboxEntry>> {
        traced(
            "store.outbox.pending_after",
            self.0.pending_after(after, limit),
        )
        .await
    }

    async fn relayed(&self, ids: &[i64]) -> StoreResult<()> {
        traced("store.outbox.relayed", self.0.relayed(ids)).await
    }

    async fn backlog(&self) -> StoreResult<u64> {
        traced("store.outbox.backlog", self.0.backlog()).await
    }
}

#[async_trait]
impl HealthCheck for Traced<dyn HealthCheck> {
    async fn ping(&self) -> StoreResult<()> {
        traced("store.ping", self.0.ping()).await
    }
}
