//! Spans of the use cases as a decorator, outermost, so that everything an operation
//! does (store calls, the notification it publishes) is traced under its span:
//! `twins.create`, `documents.write`, `ingest.batch`...

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tracing::Instrument;

use super::ServiceResult;
use super::documents::{Access, AsOf, Change, DeltaView, Documents, RevisionDiff};
use super::history::History;
use super::ingest::{Batch, BatchReport, Ingest, IngestError, SetAside};
use super::twins::{NewTwin, TwinUpdate, Twins};
use crate::domain::document::{Document, DocumentSummary, VersionSummary};
use crate::domain::history::{StateDiff, StateInForce, Window, WindowSummary};
use crate::domain::state::State;
use crate::domain::twin::{Twin, TwinFilter};
use crate::domain::{Page, PageRequest};

/// A use case whose operations each run in their own span.
pub struct Traced<S>(pub S);

#[async_trait]
impl<S: Twins> Twins for Traced<S> {
    async fn create(&self, owner: &str, new: NewTwin) -> ServiceResult<Twin> {
        let span = tracing::info_span!("twins.create", twin.id = %new.id);
        self.0.create(owner, new).instrument(span).await
    }

    async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let span = tracing::info_span!("twins.view", twin.id = id);
        self.0.view(owner, id).instrument(span).await
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>> {
        let span = tracing::info_span!("twins.list");
        self.0.list(owner, filter, page).instrument(span).await
    }

    async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let span = tracing::info_span!("twins.update", twin.id = id);
        self.0.update(owner, id, update).instrument(span).await
    }

    async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let span = tracing::info_span!("twins.remove", twin.id = id);
        self.0.remove(owner, id).instrument(span).await
    }

    async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let span = tracing::info_span!("twins.list_states", twin.id = twin_id);
        self.0
            .list_states(owner, twin_id, page)
            .instrument(span)
            .await
    }
}

#[async_trait]
impl<S: Documents> Documents for Traced<S> {
    async fn list(&self, access: Access<'_>, twin_id: &str) -> ServiceResult<Vec<DocumentSummary>> {
        let span = tracing::info_span!("documents.list", twin.id = twin_id);
        self.0.list(access, twin_id).instrument(span).await
    }

    async fn get(&self, access: Access<'_>, twin_id: &str, name: &str) -> ServiceResult<Document> {
        let span = tracing::info_span!("documents.get", twin.id = twin_id, document = name);
        self.0.get(access, twin_id, name).instrument(span).await
    }

    async fn write(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        change: Change,
        version: Option<i64>,
    ) -> ServiceResult<(Document, bool)> {
        let span = tracing::info_span!("documents.write", twin.id = twin_id, document = name);
        self.0
            .write(access, twin_id, name, change, version)
            .instrument(span)
            .await
    }

    async fn delete(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        version: Option<i64>,
    ) -> ServiceResult<Document> {
        let span = tracing::info_span!("documents.delete", twin.id = twin_id, document = name);
        self.0
            .delete(access, twin_id, name, version)
            .instrument(span)
            .await
    }

    async fn delta(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        against: &str,
    ) -> ServiceResult<DeltaView> {
        let span = tracing::info_span!("documents.delta", twin.id = twin_id, document = name);
        self.0
            .delta(access, twin_id, name, against)
            .instrument(span)
            .await
    }

    async fn versions(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<VersionSummary>> {
        let span = tracing::info_span!("documents.versions", twin.id = twin_id, document = name);
        self.0
            .versions(access, twin_id, name, page)
            .instrument(span)
            .await
    }

    async fn revision(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        as_of: AsOf,
    ) -> ServiceResult<Document> {
        let span = tracing::info_span!("documents.revision", twin.id = twin_id, document = name);
        self.0
            .revision(access, twin_id, name, as_of)
            .instrument(span)
            .await
    }

    async fn diff(
        &self,
        access: Access<'_>,
        twin_id: &str,
        name: &str,
        from: i64,
        to: Option<i64>,
    ) -> ServiceResult<RevisionDiff> {
        let span = tracing::info_span!("documents.diff", twin.id = twin_id, document = name);
        self.0
            .diff(access, twin_id, name, from, to)
            .instrument(span)
            .await
    }
}

#[async_trait]
impl<S: Ingest> Ingest for Traced<S> {
    async fn apply(
        &self,
        batch: &Batch<'_>,
        aside: &dyn SetAside,
    ) -> Result<BatchReport, IngestError> {
        let span = tracing::info_span!("ingest.batch", messages = batch.messages.len());
        self.0.apply(batch, aside).instrument(span).await
    }

    fn reset(&self) {
        self.0.reset();
    }
}

#[async_trait]
impl<S: History> History for Traced<S> {
    async fn range(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let span = tracing::info_span!("states.range", twin.id = twin_id);
        self.0
            .range(owner, twin_id, window, page)
            .instrument(span)
            .await
    }

    async fn at(
        &self,
        owner: &str,
        twin_id: &str,
        at: DateTime<Utc>,
    ) -> ServiceResult<StateInForce> {
        let span = tracing::info_span!("states.at", twin.id = twin_id);
        self.0.at(owner, twin_id, at).instrument(span).await
    }

    async fn diff(&self, owner: &str, twin_id: &str, window: Window) -> ServiceResult<StateDiff> {
        let span = tracing::info_span!("states.diff", twin.id = twin_id);
        self.0.diff(owner, twin_id, window).instrument(span).await
    }

    async fn summary(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
    ) -> ServiceResult<WindowSummary> {
        let span = tracing::info_span!("states.summary", twin.id = twin_id);
        self.0
            .summary(owner, twin_id, window)
            .instrument(span)
            .await
    }
}
