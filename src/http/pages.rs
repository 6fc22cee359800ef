//! Bodies of the listing endpoints, in the Go service's shapes.

use serde::Serialize;
use utoipa::ToSchema;

use crate::domain::Page;
use crate::domain::state::State;
use crate::domain::twin::Twin;

/// Page of twins as served by `GET /twins`.
#[derive(Debug, Serialize, ToSchema)]
pub struct TwinsPage {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub twins: Vec<Twin>,
}

/// Page of states as served by `GET /states/{id}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatesPage {
    pub total: u64,
    pub offset: u64,
    pub limit: u64,
    pub states: Vec<State>,
}

impl From<Page<Twin>> for TwinsPage {
    fn from(p: Page<Twin>) -> Self {
        Self {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            twins: p.items,
        }
    }
}

impl From<Page<State>> for StatesPage {
    fn from(p: Page<State>) -> Self {
        Self {
            total: p.total,
            offset: p.offset,
            limit: p.limit,
            states: p.items,
        }
    }
}
