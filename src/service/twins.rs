//! Twin and state use cases: create, view, list, update, remove, list states.

use tracing::Instrument;

use crate::broker::notifier::{self, Notifier};
use crate::domain::state::State;
use crate::domain::time::now_millis;
use crate::domain::twin::{Metadata, NewDefinition, Twin, TwinName};
use crate::domain::{Page, PageRequest};
use crate::store::{Store, TwinFilter};

use super::lookup::TwinLookup;
use super::{ServiceError, ServiceResult};

/// How many times an update is retried when another update to the same twin landed
/// between our read and our write.
const UPDATE_ATTEMPTS: usize = 8;

/// A twin id taken from a client: a UUID, normalised to lowercase hyphenated form.
/// Anything else names no twin.
pub fn parse_twin_id(raw: &str) -> ServiceResult<String> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ServiceError::NotFound)
}

/// What a client asks to change on a twin; absent or empty fields stay as they are.
#[derive(Debug, Default)]
pub struct TwinUpdate {
    pub name: Option<TwinName>,
    pub definition: Option<NewDefinition>,
    pub metadata: Option<Metadata>,
}

impl TwinUpdate {
    /// Drops the fields that would change nothing; None when nothing is left.
    fn effective(self) -> Option<Self> {
        let u = Self {
            name: self.name.filter(|n| !n.is_empty()),
            definition: self.definition.filter(NewDefinition::has_attributes),
            metadata: self.metadata.filter(|m| !m.is_empty()),
        };
        (u.name.is_some() || u.definition.is_some() || u.metadata.is_some()).then_some(u)
    }
}

/// The twins use cases. Each keeps the channel/subtopic cache exact and publishes its
/// outcome on the notification channel.
#[derive(Clone)]
pub struct TwinsService {
    store: Store,
    lookup: TwinLookup,
    notifier: Notifier,
}

impl TwinsService {
    pub fn new(store: Store, lookup: TwinLookup, notifier: Notifier) -> Self {
        Self {
            store,
            lookup,
            notifier,
        }
    }

    /// Publishes `<op>.success` with the JSON of the result or `<op>.failure`.
    async fn report<T: serde::Serialize>(
        &self,
        twin_id: &str,
        op: &str,
        result: &ServiceResult<T>,
    ) {
        if !self.notifier.enabled() {
            return;
        }
        async {
            match result {
                Ok(v) => self.notifier.notify_json(twin_id, op, v).await,
                Err(e) => self.notifier.notify(twin_id, op, Err(e)).await,
            }
        }
        .instrument(notifier::publish_span(op))
        .await
    }

    #[tracing::instrument(name = "twins.create", skip_all)]
    pub async fn create(
        &self,
        owner: &str,
        name: TwinName,
        definition: Option<NewDefinition>,
        metadata: Option<Metadata>,
    ) -> ServiceResult<Twin> {
        let now = now_millis();
        let definition = definition.unwrap_or_else(NewDefinition::empty);
        let id = uuid::Uuid::new_v4().to_string();
        let twin = Twin {
            owner: owner.to_owned(),
            id: id.clone(),
            name: name.into_inner(),
            revision: 0,
            created: now,
            updated: now,
            definitions: vec![definition.into_definition(0, now)],
            metadata: metadata.unwrap_or_default(),
        };
        let result = self
            .store
            .twins
            .save(&twin)
            .await
            .map(|()| twin)
            .map_err(Into::into);
        if let Ok(twin) = &result
            && let Err(e) = self.lookup.cache().save(twin).await
        {
            tracing::warn!(twin = %twin.id, error = %e, "cache not updated on create");
        }
        self.report(&id, "create", &result).await;
        result
    }

    #[tracing::instrument(name = "twins.view", skip_all, fields(twin.id = id))]
    pub async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        let result = self.retrieve(owner, &id).await;
        self.report(&id, "get", &result).await;
        result
    }

    async fn retrieve(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        self.store
            .twins
            .retrieve(owner, id)
            .await?
            .ok_or(ServiceError::NotFound)
    }

    #[tracing::instrument(name = "twins.list", skip_all)]
    pub async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>> {
        Ok(self.store.twins.list(owner, filter, page).await?)
    }

    /// Applies the update and returns the twin as stored. Concurrent updates of one
    /// twin never lose each other's definitions: the write is conditional on the
    /// revision that was read, and retried on a fresh read when it changed.
    #[tracing::instrument(name = "twins.update", skip_all, fields(twin.id = id))]
    pub async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        let result = self.apply_update(owner, &id, update).await;
        if let Ok(twin) = &result {
            self.lookup.invalidate(&twin.id);
            if let Err(e) = self.lookup.cache().update(twin).await {
                tracing::warn!(twin = %twin.id, error = %e, "cache not updated on update");
            }
        }
        self.report(&id, "update", &result).await;
        result
    }

    async fn apply_update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let update = update
            .effective()
            .ok_or_else(|| crate::domain::ValidationError::new("nothing to update"))?;
        for _ in 0..UPDATE_ATTEMPTS {
            let mut twin = self
                .store
                .twins
                .retrieve(owner, id)
                .await?
                .ok_or(ServiceError::NotFound)?;
            let read_revision = twin.revision;
            let now = now_millis().max(twin.updated);
            if let Some(name) = &update.name {
                twin.name = name.clone().into_inner();
            }
            if let Some(metadata) = &update.metadata {
                twin.metadata = metadata.clone();
            }
            if let Some(def) = &update.definition {
                let next_id = twin.current_definition().map_or(0, |d| d.id + 1);
                twin.definitions
                    .push(def.clone().into_definition(next_id, now));
            }
            twin.revision += 1;
            twin.updated = now;
            if self.store.twins.update(&twin, read_revision).await? {
                return Ok(twin);
            }
        }
        Err(ServiceError::Unavailable(
            "the twin is being updated concurrently; retry".into(),
        ))
    }

    /// Removes the twin if the caller owns it; Ok(None) when nothing was deleted, which
    /// callers report exactly like a deletion (no existence leak).
    #[tracing::instrument(name = "twins.remove", skip_all, fields(twin.id = id))]
    pub async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let Ok(id) = parse_twin_id(id) else {
            return Ok(None);
        };
        let result = self
            .store
            .twins
            .remove(owner, &id)
            .await
            .map_err(ServiceError::from);
        match &result {
            Ok(true) => {
                self.lookup.invalidate(&id);
                if let Err(e) = self.lookup.cache().remove(&id).await {
                    tracing::warn!(twin = %id, error = %e, "cache not updated on remove");
                }
                self.notifier
                    .notify_json(&id, "remove", &serde_json::json!({ "deleted": id }))
                    .instrument(notifier::publish_span("remove"))
                    .await;
            }
            Ok(false) => {}
            Err(e) => {
                self.notifier
                    .notify(&id, "remove", Err(e))
                    .instrument(notifier::publish_span("remove"))
                    .await
            }
        }
        Ok(result?.then_some(id))
    }

    #[tracing::instrument(name = "twins.list_states", skip_all, fields(twin.id = twin_id))]
    pub async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let twin_id = parse_twin_id(twin_id)?;
        let twin = self.retrieve(owner, &twin_id).await?;
        Ok(self.store.states.list(&twin.id, page).await?)
    }
}
