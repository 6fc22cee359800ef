//! Twin and state use cases: create, view, list, update, remove, list states.

use crate::domain::state::State;
use crate::domain::time::now_millis;
use crate::domain::twin::{Metadata, NewDefinition, Twin, TwinName};
use crate::domain::{Page, PageRequest};
use crate::store::{Store, TwinFilter};

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

/// The twins use cases.
#[derive(Clone)]
pub struct TwinsService {
    store: Store,
}

impl TwinsService {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    pub async fn create(
        &self,
        owner: &str,
        name: TwinName,
        definition: Option<NewDefinition>,
        metadata: Option<Metadata>,
    ) -> ServiceResult<Twin> {
        let now = now_millis();
        let definition = definition.unwrap_or_else(NewDefinition::empty);
        let twin = Twin {
            owner: owner.to_owned(),
            id: uuid::Uuid::new_v4().to_string(),
            name: name.into_inner(),
            revision: 0,
            created: now,
            updated: now,
            definitions: vec![definition.into_definition(0, now)],
            metadata: metadata.unwrap_or_default(),
        };
        self.store.twins.save(&twin).await?;
        Ok(twin)
    }

    pub async fn view(&self, owner: &str, id: &str) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        self.store
            .twins
            .retrieve(owner, &id)
            .await?
            .ok_or(ServiceError::NotFound)
    }

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
    pub async fn update(&self, owner: &str, id: &str, update: TwinUpdate) -> ServiceResult<Twin> {
        let id = parse_twin_id(id)?;
        let update = update
            .effective()
            .ok_or_else(|| crate::domain::ValidationError::new("nothing to update"))?;
        for _ in 0..UPDATE_ATTEMPTS {
            let mut twin = self
                .store
                .twins
                .retrieve(owner, &id)
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
    pub async fn remove(&self, owner: &str, id: &str) -> ServiceResult<Option<String>> {
        let Ok(id) = parse_twin_id(id) else {
            return Ok(None);
        };
        Ok(self.store.twins.remove(owner, &id).await?.then_some(id))
    }

    pub async fn list_states(
        &self,
        owner: &str,
        twin_id: &str,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let twin = self.view(owner, twin_id).await?;
        Ok(self.store.states.list(&twin.id, page).await?)
    }
}
