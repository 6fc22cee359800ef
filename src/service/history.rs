//! History use cases (SPEC section 11): a twin's states over a window, the state in
//! force at an instant, what changed between two instants, and a summary of a window.
//! Each checks that the caller owns the twin first, so a foreign twin is a missing one.

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::domain::history::{StateDiff, StateInForce, Window, WindowSummary};
use crate::domain::state::State;
use crate::domain::twin::Twin;
use crate::domain::{Page, PageRequest};
use crate::store::Store;

use super::twins::parse_twin_id;
use super::{ServiceError, ServiceResult};

/// Body of the 404 of an instant before the twin's first state.
pub const NO_STATE: &str = "no state at that time";

/// The history use cases, as the transports and the decorators see them.
#[async_trait]
pub trait History: Send + Sync {
    /// A page of the caller's twin's states in `window`, in history order.
    async fn range(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
        page: PageRequest,
    ) -> ServiceResult<Page<State>>;
    /// The state in force at `at`, with its definition.
    async fn at(
        &self,
        owner: &str,
        twin_id: &str,
        at: DateTime<Utc>,
    ) -> ServiceResult<StateInForce>;
    /// The states in force at `from` and `to` and what changed between them.
    async fn diff(&self, owner: &str, twin_id: &str, window: Window) -> ServiceResult<StateDiff>;
    /// Each attribute summarised over `window`.
    async fn summary(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
    ) -> ServiceResult<WindowSummary>;
}

/// The history use cases over the store.
#[derive(Clone)]
pub struct HistoryService {
    store: Store,
}

impl HistoryService {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    async fn twin(&self, owner: &str, raw_id: &str) -> ServiceResult<Twin> {
        let id = parse_twin_id(raw_id)?;
        self.store
            .twins
            .retrieve(owner, &id)
            .await?
            .ok_or(ServiceError::NotFound)
    }

    async fn in_force(
        &self,
        twin: &Twin,
        at: Option<DateTime<Utc>>,
    ) -> ServiceResult<Option<State>> {
        match at {
            Some(at) => Ok(self.store.states.at(&twin.id, &at).await?),
            None => Ok(None),
        }
    }
}

#[async_trait]
impl History for HistoryService {
    async fn range(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
        page: PageRequest,
    ) -> ServiceResult<Page<State>> {
        let twin = self.twin(owner, twin_id).await?;
        Ok(self.store.states.range(&twin.id, &window, page).await?)
    }

    async fn at(
        &self,
        owner: &str,
        twin_id: &str,
        at: DateTime<Utc>,
    ) -> ServiceResult<StateInForce> {
        let twin = self.twin(owner, twin_id).await?;
        let state = self
            .store
            .states
            .at(&twin.id, &at)
            .await?
            .ok_or(ServiceError::Absent(NO_STATE))?;
        let definition_in_force = twin
            .definitions
            .iter()
            .find(|d| d.id == state.definition)
            .cloned();
        Ok(StateInForce {
            state,
            definition_in_force,
        })
    }

    async fn diff(&self, owner: &str, twin_id: &str, window: Window) -> ServiceResult<StateDiff> {
        let twin = self.twin(owner, twin_id).await?;
        let from = self.in_force(&twin, window.from).await?;
        let to = self.in_force(&twin, window.to).await?;
        Ok(StateDiff::between(from, to))
    }

    async fn summary(
        &self,
        owner: &str,
        twin_id: &str,
        window: Window,
    ) -> ServiceResult<WindowSummary> {
        let twin = self.twin(owner, twin_id).await?;
        let summary = self.store.states.summary(&twin.id, &window).await?;
        Ok(WindowSummary::new(&window, summary))
    }
}
