//! Twin and state use cases: create, view, list, update, remove, list states.
//!
//! Each reads as its business rule: the channel/subtopic cache is kept exact by the
//! repository decorator in [`super::lookup`], notifications are published by
//! [`super::notify::Notifying`] around this service.

use async_trait::async_trait;

use crate::domain::feed::EventKind;
use crate::domain::state::State;
use crate::domain::time::now_millis;
use crate::domain::twin::{Metadata, NewDefinition, Twin, TwinFilter, TwinName};
use crate::domain::{Page, PageRequest};
use crate::store::Store;

use super::contention::Contention;
use super::outbox::change;
use super::{ServiceError, ServiceResult};

/// A twin id taken from a client: a UUID, normalised to lowercase hyphenated form.
/// Anything else names no twin.
pub fn parse_twin_id(raw: &str) -> ServiceResult<String> {
    uuid::Uuid::parse_str(raw)
        .map(|u| u.hyphenated().to_string())
        .map_err(|_| ServiceError::NotFound)
}

/// A twin to create, with the id it will have (known before it is stored, so that
/// even a failed creation is reported under its id).
#[derive(Debug, Clone)]
pub struct NewTwin {
    pub id: String,
    pub name: TwinName,
    pub definition: Option<NewDefinition>,
    pub metadata: Option<Metadata>,
}

impl NewTwin {
    /// A new twin with a fresh random id.
    pub fn new(
        name: TwinName,
        definition: Option<NewDefinition>,
        metadata: Option<Metadata>,
    ) -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            name,
            definition,
            metadata,
        }
    }
}

/// What a client asks to change on a twin; absent or empty fields stay as they are.
#[derive(Debug, Clone, Default)]
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

/// The twins use cases, as the transports and the decorators see them.
#[async_trait]
pub trait Twins: Send + Sync {
    /// Stores a new twin owned by `owner`.
    async fn create(&self, owner: &str, new: NewTwin) -> ServiceResult<Twin>;
    /// The caller's twin.
    async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin>;
    /// A page of the caller's twins that match `filter`.
    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>>;
    /// Applies the update and returns the twin as stored.
    async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin>;
    /// Removes the twin if the caller owns it; Ok(None) when nothing was deleted, which
    /// callers report exactly like a deletion (no existence leak).
    async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>>;
    /// A page of the caller's twin's states, by id ascending.
    async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>>;
}

/// The twins use cases over the store.
#[derive(Clone)]
pub struct TwinsService {
    store: Store,
    /// Most definitions a twin keeps (appending one more is refused).
    max_definitions: usize,
}

impl TwinsService {
    pub fn new(store: Store, max_definitions: usize) -> Self {
        Self {
            store,
            max_definitions,
        }
    }

    async fn retrieve(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        self.store
            .twins
            .retrieve(owner, id)
            .await?
            .ok_or(ServiceError::NotFound)
    }

    async fn apply_update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let update = update
            .effective()
            .ok_or_else(|| crate::domain::ValidationError::new("nothing to update"))?;
        // Another update landing between our read and our write makes us read again.
        let mut contention = Contention::of_twin(id);
        while contention.next().await {
            let mut twin = self.retrieve(owner, id).await?;
            let old = twin.clone();
            let read_revision = twin.revision;
            let now = now_millis().max(twin.updated);
            if let Some(name) = &update.name {
                twin.name = name.clone().into_inner();
            }
            if let Some(metadata) = &update.metadata {
                twin.metadata = metadata.clone();
            }
            if let Some(def) = &update.definition {
                if twin.definitions.len() >= self.max_definitions {
                    return Err(ServiceError::TooLarge(format!(
                        "a twin keeps at most {} definitions; create a new twin for a new model",
                        self.max_definitions
                    )));
                }
                let next_id = twin.current_definition().map_or(0, |d| d.id + 1);
                twin.definitions
                    .push(def.clone().into_definition(next_id, now));
            }
            twin.revision += 1;
            twin.updated = now;
            let events = [change(
                owner,
                EventKind::TwinUpdated,
                &twin.id,
                now,
                Some(&old),
                Some(&twin),
            )?];
            if self
                .store
                .twins
                .update_recorded(&twin, read_revision, &events)
                .await?
            {
                self.store.recorded.ring();
                return Ok(twin);
            }
        }
        Err(ServiceError::Unavailable(
            "the twin is being updated concurrently; retry".into(),
        ))
    }
}

#[async_trait]
impl Twins for TwinsService {
    async fn create(&self, owner: &str, new: NewTwin) -> ServiceResult<Twin> {
        let now = now_millis();
        let definition = new.definition.unwrap_or_else(NewDefinition::empty);
        let twin = Twin {
            owner: owner.to_owned(),
            id: new.id,
            name: new.name.into_inner(),
            revision: 0,
            created: now,
            updated: now,
            definitions: vec![definition.into_definition(0, now)],
            metadata: new.metadata.unwrap_or_default(),
        };
        let events = [change(
            owner,
            EventKind::TwinCreated,
            &twin.id,
            now,
            None,
            Some(&twin),
        )?];
        self.store.twins.save_recorded(&twin, &events).await?;
        self.store.recorded.ring();
        Ok(twin)
    }

    async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        self.retrieve(owner, &id).await
    }

    async fn list(
        &self,
        owner: &str,
        filter: &TwinFilter,
        page: PageRequest,
    ) -> ServiceResult<Page<Twin>> {
        Ok(self.store.twins.list(owner, filter, page).await?)
    }

    /// Concurrent updates of one twin never lose each other's definitions: the write is
    /// conditional on the revision that was read, and retried on a fresh read when it
    /// changed.
    async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        self.apply_update(owner, &id, update).await
    }

    async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let Ok(id) = parse_twin_id(id) else {
            return Ok(None);
        };
        // The event carries the twin as it was deleted: the deletion is conditional on
        // the revision read, and read again when an update landed in between.
        let mut contention = Contention::of_twin(&id);
        while contention.next().await {
            let Some(twin) = self.store.twins.retrieve(owner, &id).await? else {
                return Ok(None);
            };
            let events = [change(
                owner,
                EventKind::TwinDeleted,
                &id,
                now_millis(),
                Some(&twin),
                None,
            )?];
            if self
                .store
                .twins
                .remove_recorded(owner, &id, Some(twin.revision), &events)
                .await?
            {
                self.store.recorded.ring();
                return Ok(Some(id));
            }
        }
        Err(ServiceError::Unavailable(
            "the twin is being updated concurrently; retry".into(),
        ))
    }

    async fn list_states(
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
